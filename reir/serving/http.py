"""The HTTP API as a FastAPI app over an injected backend (testable without Ray).

Routes (all under ``/v1`` except the page and the probe):

- ``POST /v1/search`` ``{"query", "top_k", "mode": "rank"|"discover", "rerank", "filters":
  [{"field","op","value"}]}`` -> ``{"results": [{"image_id","uri","box","score","refined"}],
  "model_version", "mode", "reranked", "threshold", "candidates", "timings_ms", "took_ms", "truncated"}``
- ``GET /v1/images/{image_id}`` (the id may hold ``/``; URL-encode the rest): the gallery
  image (streamed from the stored uri, only inside ``image_roots`` when set; an http(s)/s3/gs
  uri is proxied, :mod:`reir.serving.images`); ``GET /v1/info``; ``GET /v1/admin/config`` (admin scope)
- ``POST /v1/search/batch`` ``{"queries": [<search body>, ...]}`` (at most ``max_batch``) ->
  ``{"responses": [{"status", "result" | "error", ...}]}``: each query answered or refused on its own
- ``GET /`` the search page; probes (no key): ``GET /livez`` (the process answers),
  ``GET /readyz`` (model loaded and store reachable, else 503), ``GET /healthz`` (= readyz).

Input handling: requests are strict (unknown fields, wrong types, out-of-range values
-> 422 with one message per problem), bodies over ``max_body_bytes`` -> 413, filters
are checked against the allow-list (:mod:`reir.platform.filters`) -> 422. With API keys
configured: no/unknown key -> 401, key without the route's scope -> 403, over the key's
rate -> 429 with ``Retry-After``. A dependency down (:class:`reir.errors.DependencyUnavailable`)
-> 503 with ``Retry-After``; any other exception is a bug -> 500 with a request id
(:mod:`reir.serving.boundary`). docs/errors.md has the whole table.
"""

from __future__ import annotations

import logging
import math
import mimetypes
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import Depends, FastAPI, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException

from reir.limits import MAX_BATCH_QUERIES, MAX_OFFSET, MAX_TOP_K
from reir.platform.auth import KeyRing, Principal
from reir.platform.config import ServeConfig
from reir.platform.filters import FieldType, FilterError, allowed_fields, compile_filters
from reir.platform.uri import UriReadError, is_local
from reir.serving.batch import add_batch_route
from reir.serving.boundary import BoundaryRoute, own_error
from reir.serving.images import fetch_image
from reir.serving.page import SEARCH_PAGE
from reir.serving.pipeline import QueryOutcome, QueryRequest

log = logging.getLogger(__name__)

SEARCH_ROUTE = "/v1/search"
IMAGE_ROUTE = "/v1/images"
INFO_ROUTE = "/v1/info"
ADMIN_ROUTE = "/v1/admin/config"
HEALTH_ROUTE = "/healthz"
LIVE_ROUTE = "/livez"
READY_ROUTE = "/readyz"
BATCH_ROUTE = "/v1/search/batch"
PAGE_ROUTE = "/"
MAX_QUERY_CHARS = 500
# Any id a gallery can have (folders give it "/", manifests may give it anything): only
# control characters are refused; the lookup escapes the id into a filter literal.
IMAGE_ID_PATTERN = r"^[^\x00-\x1f\x7f]{1,256}$"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or unknown API key"},
    403: {"description": "the key may not use this route"},
    413: {"description": "request body too large"},
    422: {"description": "invalid request"},
    429: {"description": "rate limit exceeded (see Retry-After)"},
    500: {"description": "internal error (a bug; not retryable); the body has a request_id"},
    503: {"description": "a dependency (Milvus, a model replica) is down; retry after Retry-After"},
}


class SearchBackend(Protocol):
    async def run(self, request: QueryRequest) -> QueryOutcome: ...

    async def info(self) -> dict[str, Any]: ...

    async def health(self) -> dict[str, Any]: ...

    async def image_uri(self, image_id: str) -> str | None: ...


class RequestMetrics(Protocol):
    def record(self, route: str, status: int, seconds: float) -> None: ...


class NoMetrics:
    def record(self, route: str, status: int, seconds: float) -> None:
        return None


@dataclass(frozen=True)
class HttpSettings:
    max_top_k: int = MAX_TOP_K
    max_batch: int = MAX_BATCH_QUERIES
    max_query_chars: int = MAX_QUERY_CHARS
    max_body_bytes: int = 16_384
    max_filters: int = 16
    rerank_default: bool = True
    filter_fields: dict[str, FieldType] = field(default_factory=allowed_fields)
    image_roots: tuple[Path, ...] = ()

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> HttpSettings:
        return cls(max_top_k=cfg.max_top_k, max_query_chars=cfg.max_query_chars, max_body_bytes=cfg.max_body_bytes,
                   max_filters=cfg.max_filters, rerank_default=cfg.rerank_default,
                   filter_fields=allowed_fields(cfg.metadata_fields),
                   image_roots=tuple(Path(p).resolve() for p in cfg.image_roots))


class SearchResult(BaseModel):
    image_id: str
    uri: str
    box: list[float] = Field(description="absolute pixels [x, y, w, h]")
    score: float = Field(description="probability that this box is the described instance")
    refined: bool = Field(default=False, description="the box was refined by the localize stage (zoom)")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    model_version: str
    mode: Literal["rank", "discover"]
    reranked: bool
    threshold: float | None = Field(description="discovery threshold (discover mode)")
    gate: float | None = Field(default=None, description="discover mode: the query-level gate; when no image "
                               "reaches it the answer is empty (0: no gate)")
    candidates: int
    timings_ms: dict[str, float]
    took_ms: float
    truncated: bool = Field(default=False, description="the query had more tokens than the model reads "
                            "(its text.max_length); its end was ignored")
    total: int | None = Field(default=None, description="discover mode: images found above the threshold, all "
                              "pages together")
    next_offset: int | None = Field(default=None, description="the next page's offset (same body, this offset); "
                                    "null: the last page")


class FilterClause(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: StrictStr = Field(min_length=1, max_length=64)
    op: Literal["eq", "ne", "in", "not_in", "prefix", "lt", "le", "gt", "ge"]
    value: StrictBool | StrictInt | StrictFloat | StrictStr | list[StrictInt | StrictFloat | StrictStr] = Field(
        union_mode="left_to_right"
    )


def _request_model(settings: HttpSettings) -> type[BaseModel]:
    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

        query: str = Field(min_length=1, max_length=settings.max_query_chars, strict=True)
        top_k: int = Field(default=10, ge=1, le=settings.max_top_k, strict=True, description="results per page")
        offset: int = Field(default=0, ge=0, le=MAX_OFFSET, strict=True, description="results to skip (pages)")
        mode: Literal["rank", "discover"] = "rank"
        rerank: bool | None = Field(default=None, strict=True, description="default: the service's setting")
        filters: list[FilterClause] = Field(default_factory=list, max_length=settings.max_filters)

        @field_validator("query")
        @classmethod
        def _printable(cls, value: str) -> str:
            if not value.isprintable():
                raise ValueError("query must not contain control characters")
            return value

    return SearchRequest


def _invalid(detail: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"error": "invalid request", "detail": detail})


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _invalid([
        {"field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"), "message": str(err.get("msg", ""))}
        for err in exc.errors()
    ])  # fmt: skip


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: buffer at most ``max_bytes`` of request body, else answer 413.

    Buffering (the limit is small) means the app never sees a partial body, and the 413
    is sent before any handler runs, whether or not the client sent Content-Length.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = b'{"error": "request body too large"}'
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_json(send, 413, too_large)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await _send_json(send, 413, too_large)
                return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RecordRequests:
    """ASGI middleware (outermost): every response's route label, status and latency."""

    ROUTES = (SEARCH_ROUTE, BATCH_ROUTE, INFO_ROUTE, ADMIN_ROUTE, HEALTH_ROUTE, LIVE_ROUTE, READY_ROUTE)

    def __init__(self, app: Callable[..., Awaitable[None]], recorder: RequestMetrics) -> None:
        self.app = app
        self.recorder = recorder

    @classmethod
    def route_of(cls, path: str) -> str:
        # Unknown paths share one label so scanners can not blow up metric cardinality.
        if path in ("", PAGE_ROUTE):
            return PAGE_ROUTE
        if path.startswith(IMAGE_ROUTE + "/"):
            return IMAGE_ROUTE
        return path if path in cls.ROUTES else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
            if root and path.startswith(root):
                path = path[len(root):]
            self.recorder.record(self.route_of(path), status, time.perf_counter() - start)


def _guard(keyring: KeyRing) -> Callable[[str], Callable[..., Awaitable[Principal | None]]]:
    bearer = HTTPBearer(auto_error=False, description="API key (only when the service has keys configured)")

    def require(scope: str) -> Callable[..., Awaitable[Principal | None]]:
        async def check(
            creds: HTTPAuthorizationCredentials | None = Security(bearer),  # noqa: B008 - FastAPI's idiom
        ) -> Principal | None:
            if not keyring.enabled:
                return None
            if creds is None or not creds.credentials:
                raise HTTPException(401, "missing API key", headers={"WWW-Authenticate": "Bearer"})
            principal = keyring.authenticate(creds.credentials)
            if principal is None:
                raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
            if scope not in principal.scopes:
                raise HTTPException(403, f"this key may not use {scope} routes")
            wait = keyring.throttle(principal)
            if wait > 0:
                raise HTTPException(429, "rate limit exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})
            return principal

        return check

    return require


def _local_image(uri: str, roots: tuple[Path, ...]) -> Path | None:
    """The file behind a stored uri, if it is a local image inside ``roots`` (when given)."""
    if not is_local(uri):
        return None
    try:
        path = Path(uri.removeprefix("file://")).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        return None
    if roots and not any(path.is_relative_to(root) for root in roots):
        return None
    return path


def create_http_app(
    backend: SearchBackend,
    *,
    settings: HttpSettings | None = None,
    keyring: KeyRing | None = None,
    metrics: RequestMetrics | None = None,
) -> FastAPI:
    """The FastAPI app, wrapped in the body-size limit and the request metrics."""
    settings = settings or HttpSettings()
    keyring = keyring or KeyRing(())
    require = _guard(keyring)
    search_guard, admin_guard = require("search"), require("admin")
    request_model = _request_model(settings)
    app = FastAPI(title="reir", version="1", description="Referring expression instance retrieval")
    app.router.route_class = BoundaryRoute  # exceptions -> 503 (dependency down) or 500 (bug)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)

    async def answer(body: Any) -> SearchResponse | JSONResponse:
        start = time.perf_counter()
        try:
            flt = compile_filters([c.model_dump() for c in body.filters], settings.filter_fields)
        except FilterError as exc:
            return _invalid([{"field": "filters", "message": str(exc)}])
        rerank = settings.rerank_default if body.rerank is None else body.rerank
        # Exceptions propagate: BoundaryRoute maps them by type (503 retryable, 500 a bug).
        outcome = await backend.run(QueryRequest(query=body.query, top_k=body.top_k, mode=body.mode,
                                                 rerank=rerank, conditions=flt.conditions, offset=body.offset))
        return SearchResponse(
            results=[SearchResult(**r.to_wire()) for r in outcome.results], model_version=outcome.model_version,
            mode=outcome.mode, reranked=outcome.reranked, threshold=outcome.threshold, gate=outcome.gate,
            candidates=outcome.candidates, timings_ms=outcome.timings_ms,
            took_ms=round((time.perf_counter() - start) * 1000.0, 3), truncated=outcome.truncated,
            total=outcome.total, next_offset=outcome.next_offset,
        )  # fmt: skip

    async def search(body: Any, _: Any) -> Any:
        return await answer(body)

    # The request model is built per app (limits from config), so it is a local name that
    # FastAPI could not resolve from a string annotation: set the real classes.
    search.__annotations__ = {"body": request_model, "_": Principal | None, "return": SearchResponse}
    search.__defaults__ = (Depends(search_guard),)
    app.post(SEARCH_ROUTE, response_model=SearchResponse, responses=_ERRORS)(search)
    add_batch_route(app, BATCH_ROUTE, answer, request_model, search_guard, settings.max_batch, _ERRORS)

    @app.get(IMAGE_ROUTE + "/{image_id:path}", response_class=FileResponse,
             responses={**_ERRORS, 404: {"description": "no such image"},
                        502: {"description": "the image's source (http, s3...) could not be read"}})
    async def image(
        image_id: str = PathParam(pattern=IMAGE_ID_PATTERN, max_length=256),
        _: Principal | None = Depends(search_guard),  # noqa: B008
    ) -> Response:
        uri = await backend.image_uri(image_id)
        if uri is not None and not is_local(uri):  # proxied: the browser may not reach the source
            try:
                fetched = await fetch_image(uri)
            except UriReadError as exc:
                log.warning("image %s: %s", image_id, exc)
                raise HTTPException(502, "the image's source could not be read") from exc
            if fetched is None:
                raise HTTPException(404, "no such image")
            return Response(fetched.data, media_type=fetched.media_type,
                            headers={"Cache-Control": "private, max-age=3600"})
        path = None if uri is None else _local_image(uri, settings.image_roots)
        if path is None:
            raise HTTPException(404, "no such image")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get(INFO_ROUTE, responses=_ERRORS)
    async def info(_: Principal | None = Depends(search_guard)) -> dict[str, Any]:  # noqa: B008
        data = await backend.info()
        return {"model_version": data["model_version"], "discover_threshold": data["discover_threshold"],
                "discover_gate": float(data.get("discover_gate", 0.0)),
                "can_rerank": bool(data.get("can_rerank")), "modes": ["rank", "discover"],
                "filter_fields": settings.filter_fields, "max_top_k": settings.max_top_k,
                "auth": keyring.enabled}

    @app.get(ADMIN_ROUTE, responses=_ERRORS)
    async def admin_config(principal: Principal | None = Depends(admin_guard)) -> dict[str, Any]:  # noqa: B008
        return {"max_top_k": settings.max_top_k, "max_query_chars": settings.max_query_chars,
                "max_body_bytes": settings.max_body_bytes, "max_filters": settings.max_filters,
                "rerank_default": settings.rerank_default, "filter_fields": settings.filter_fields,
                "image_roots": [str(p) for p in settings.image_roots],
                "caller": principal.name if principal else None}

    @app.get(PAGE_ROUTE, response_class=HTMLResponse, include_in_schema=True)
    async def page() -> HTMLResponse:
        return HTMLResponse(SEARCH_PAGE)

    @app.get(LIVE_ROUTE)
    async def livez() -> dict[str, str]:
        """Liveness: the process answers (restart it when this fails); touches no dependency."""
        return {"status": "alive"}

    @app.get(READY_ROUTE, responses={503: {"description": "not ready: the model or the store is unavailable"}})
    async def readyz() -> JSONResponse:
        """Readiness: the model is loaded and the store answers (send traffic only when 200)."""
        try:
            data = await backend.health()
        except Exception as exc:  # noqa: BLE001 - whatever is down, the answer is "not ready"
            cause = own_error(exc)
            return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                                content={"status": "unavailable", "error": str(cause).splitlines()[0][:300]
                                         if str(cause) else type(cause).__name__})  # fmt: skip
        return JSONResponse(status_code=200, content={"status": "ok", **data})

    # Kept for probes and scripts written before /livez and /readyz: same answer as /readyz.
    app.get(HEALTH_ROUTE, responses={503: {"description": "a dependency is down"}})(readyz)

    # The last added middleware is the outermost: metrics see the 413s of the body limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RecordRequests, recorder=metrics or NoMetrics())
    return app
