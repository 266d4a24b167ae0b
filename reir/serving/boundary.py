"""Where an exception in the HTTP app becomes a status: 503 + ``Retry-After`` or 500 + request id.

Mapped by type (see :mod:`reir.errors`): a :class:`~reir.errors.DependencyUnavailable`
raised by a stage is a 503 the caller may retry after ``Retry-After`` seconds; any other
exception is a bug, a 500 whose body and log line carry the same request id (so a user's
report finds the traceback) and which no client should retry. The caller's own mistakes
never get here: they are answered 4xx by the validation, auth and filter checks.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from reir.errors import DependencyUnavailable

log = logging.getLogger("reir.serving.http")

REQUEST_ID_HEADER = "X-Request-ID"


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def own_error(exc: BaseException) -> BaseException:
    """The exception a stage raised, without Ray's wrapper (whose text starts with the replica's
    pid and actor id: not something to show a caller)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def retry_after(exc: BaseException) -> int:
    """Whole seconds (>= 1) for the ``Retry-After`` header of a 503."""
    # getattr: a stage's exception may arrive wrapped by Ray (which forwards attributes to the cause).
    return max(1, math.ceil(float(getattr(exc, "retry_after_s", 1.0))))


def error_body(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) for an exception that escaped a handler; logs it."""
    if isinstance(exc, DependencyUnavailable):
        # The reason is ours (no user data, no internals): it tells the operator what is down.
        reason = str(own_error(exc)).strip().splitlines()[0][:200] if str(own_error(exc)).strip() else "unavailable"
        log.warning("request %s: dependency unavailable: %s", request_id, reason)
        seconds = retry_after(exc)
        return 503, {"error": "service temporarily unavailable, retry later", "reason": reason,
                     "retry_after_s": seconds, "request_id": request_id}, {"Retry-After": str(seconds)}
    log.error("request %s failed with an internal error", request_id, exc_info=exc)
    return 500, {"error": "internal error", "request_id": request_id}, {}


class BoundaryRoute(APIRoute):
    """A route whose handler's unanswered exceptions become a 503 or a 500 (above).

    Inside the route, not a middleware: Starlette's outermost error middleware answers a
    plain-text 500 and re-raises, so a wrapper outside it would come too late. The 4xx
    exceptions (HTTP errors, validation) pass through to their own handlers.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (HTTPException, RequestValidationError):
                raise
            except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a 500
                request_id = new_request_id()
                status, body, headers = error_body(exc, request_id)
                return JSONResponse(status_code=status, content=body,
                                    headers={**headers, REQUEST_ID_HEADER: request_id})

        return guarded
