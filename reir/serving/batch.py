"""``POST /v1/search/batch``: several searches in one request, each answered or refused on its own.

One bad query (invalid, a refused filter) or one failing backend call does not fail its
neighbours: every query gets its own ``status`` (200, 422, 503 or 500, the same codes
``/v1/search`` would have answered) and either a ``result`` or an ``error``. The request
itself is refused (422) only when it is malformed as a whole (no list, too many queries).
The queries run concurrently, so the encoder batches them into one forward pass.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reir.serving.boundary import error_body, new_request_id

Answer = Callable[[Any], Awaitable[Any]]


class BatchItem(BaseModel):
    status: int = Field(description="what POST /v1/search would have answered for this query")
    result: dict[str, Any] | None = Field(default=None, description="the /v1/search response body (status 200)")
    error: str | None = None
    detail: list[dict[str, str]] | None = Field(default=None, description="one message per problem (status 422)")
    request_id: str | None = Field(default=None, description="status 500/503: quote it when reporting")


class BatchResponse(BaseModel):
    responses: list[BatchItem] = Field(description="one per query, in the order sent")


def _problems(exc: ValidationError) -> list[dict[str, str]]:
    return [{"field": ".".join(str(p) for p in err.get("loc", ())), "message": str(err.get("msg", ""))}
            for err in exc.errors()]  # fmt: skip


async def _one(answer: Answer, request_model: type[BaseModel], query: Any) -> BatchItem:
    try:
        body = request_model.model_validate(query)
    except ValidationError as exc:
        return BatchItem(status=422, error="invalid request", detail=_problems(exc))
    try:
        outcome = await answer(body)
    except Exception as exc:  # noqa: BLE001 - mapped by type like /v1/search, for this query alone
        status, content, _ = error_body(exc, new_request_id())
        return BatchItem(status=status, error=content["error"], request_id=content["request_id"])
    if isinstance(outcome, JSONResponse):  # a refusal answer() made itself (a bad filter)
        content = json.loads(bytes(outcome.body))
        return BatchItem(status=outcome.status_code, error=content.get("error"), detail=content.get("detail"))
    return BatchItem(status=200, result=outcome.model_dump())


def add_batch_route(
    app: FastAPI, route: str, answer: Answer, request_model: type[BaseModel], guard: Callable[..., Any],
    max_queries: int, responses: dict[int | str, dict[str, Any]],
) -> None:  # fmt: skip
    """Register the batch route; ``answer`` is the single search (validated body -> response)."""

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        # Items are validated one by one (below), so one bad query is that query's 422 alone.
        queries: list[dict[str, Any]] = Field(min_length=1, max_length=max_queries,
                                              description="each a POST /v1/search body")

    async def search_batch(body: Any, _: Any) -> BatchResponse:
        items = await asyncio.gather(*(_one(answer, request_model, q) for q in body.queries))
        return BatchResponse(responses=list(items))

    # Built per app (the size limit comes from config): give FastAPI the real classes.
    search_batch.__annotations__ = {"body": BatchRequest, "_": Any, "return": BatchResponse}
    search_batch.__defaults__ = (Depends(guard),)
    app.post(route, response_model=BatchResponse, responses=responses, summary="Search Batch")(search_batch)
