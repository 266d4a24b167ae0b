"""The HTTP API as a FastAPI app over an injected backend (testable without Ray).

``POST /v1/search {"query": str, "top_k": int}`` ->
``{"results": [{"image_id","uri","box","score"}], "model_version", "took_ms"}``;
``GET /healthz``. Requests are strict: unknown fields, wrong types ("5" for top_k)
and out-of-range values are 422 with one readable message per problem.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reir.serving.retriever import Result

SEARCH_ROUTE = "/v1/search"
HEALTH_ROUTE = "/healthz"
MAX_QUERY_CHARS = 1000


@dataclass(frozen=True)
class SearchOutcome:
    results: list[Result]
    model_version: str


class SearchBackend(Protocol):
    async def search(self, query: str, top_k: int) -> SearchOutcome: ...

    async def health(self) -> dict[str, Any]: ...


class RequestMetrics(Protocol):
    def record(self, route: str, status: int, seconds: float) -> None: ...


class NoMetrics:
    def record(self, route: str, status: int, seconds: float) -> None:
        return None


class SearchResult(BaseModel):
    image_id: str
    uri: str
    box: list[float] = Field(description="absolute pixels [x, y, w, h]")
    score: float


class SearchResponse(BaseModel):
    results: list[SearchResult]
    model_version: str
    took_ms: float


def _request_model(max_top_k: int) -> type[BaseModel]:
    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

        query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, strict=True)
        top_k: int = Field(default=10, ge=1, le=max_top_k, strict=True)

        @field_validator("query")
        @classmethod
        def _printable(cls, value: str) -> str:
            if not value.isprintable():
                raise ValueError("query must not contain control characters")
            return value

    return SearchRequest


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"), "message": err.get("msg", "")}
        for err in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"error": "invalid request", "detail": errors})


def create_http_app(
    backend: SearchBackend, *, max_top_k: int = 100, metrics: RequestMetrics | None = None
) -> FastAPI:
    """Build the FastAPI app; ``backend`` does the work, ``metrics`` sees every request."""
    request_model = _request_model(max_top_k)
    recorder = metrics or NoMetrics()
    app = FastAPI(title="reir", version="1")
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.middleware("http")
    async def _record(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # Unknown paths share one label so scanners can not blow up metric cardinality.
            path = request.url.path
            route = next((r for r in (SEARCH_ROUTE, HEALTH_ROUTE) if path.endswith(r)), "other")
            recorder.record(route, status, time.perf_counter() - start)

    async def search(body: Any) -> SearchResponse:
        start = time.perf_counter()
        outcome = await backend.search(body.query, body.top_k)
        return SearchResponse(
            results=[SearchResult(**r.to_wire()) for r in outcome.results],
            model_version=outcome.model_version,
            took_ms=round((time.perf_counter() - start) * 1000.0, 3),
        )

    # The request model is built per app (max_top_k), so it is a local name that
    # FastAPI could not resolve from a string annotation: set the real class.
    search.__annotations__ = {"body": request_model, "return": SearchResponse}
    app.post(SEARCH_ROUTE, response_model=SearchResponse)(search)

    @app.get(HEALTH_ROUTE)
    async def healthz() -> JSONResponse:
        try:
            info = await backend.health()
        except Exception as exc:  # noqa: BLE001 - any dependency down -> not ready
            return JSONResponse(status_code=503, content={"status": "unavailable", "error": str(exc)[:300]})
        return JSONResponse(status_code=200, content={"status": "ok", **info})

    return app
