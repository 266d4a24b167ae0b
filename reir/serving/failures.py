"""Which stage failures mean "a dependency is down" (:class:`reir.errors.DependencyUnavailable`).

The HTTP layer maps exceptions by type: a :class:`DependencyUnavailable` is a 503 with
``Retry-After``, anything else a 500. So the stages translate here, where the cause is
known: Milvus unreachable / rate-limited / its collection gone, a Serve replica dead or
overloaded. Everything not listed stays what it is (a bug is not retryable).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from pymilvus.exceptions import (
    ConnectError,
    ConnectionNotExistException,
    ErrorCode,
    MilvusException,
    MilvusUnavailableException,
)
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from reir.errors import DependencyUnavailable

T = TypeVar("T")

_MILVUS_DOWN = (ConnectError, ConnectionNotExistException, MilvusUnavailableException)
_MILVUS_CODES = frozenset({ErrorCode.RATE_LIMIT, ErrorCode.COLLECTION_NOT_FOUND})
_GRPC_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED})
_REPLICA_DOWN = (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)


def milvus_unavailable(exc: BaseException) -> DependencyUnavailable | None:
    """The 503 for a Milvus client error that means "down or busy", else None."""
    if isinstance(exc, DependencyUnavailable):
        return exc
    if isinstance(exc, _MILVUS_DOWN) or (isinstance(exc, MilvusException) and exc.code in _MILVUS_CODES):
        return DependencyUnavailable(f"Milvus unavailable: {type(exc).__name__}", retry_after_s=2.0)
    if isinstance(exc, grpc.RpcError) and exc.code() in _GRPC_DOWN:  # type: ignore[attr-defined]
        return DependencyUnavailable("Milvus unreachable", retry_after_s=2.0)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return DependencyUnavailable(f"Milvus unreachable: {type(exc).__name__}", retry_after_s=2.0)
    return None


def milvus_call(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` with Milvus outages raised as :class:`DependencyUnavailable`."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        down = milvus_unavailable(exc)
        if down is None or down is exc:
            raise
        raise down from exc


async def stage_call(call: Callable[[], Awaitable[T]], stage: str) -> T:
    """Run an idempotent stage call; if its replica died mid-request, ask again once.

    Serve routes the second try to a live replica, so one replica crash under load costs
    latency, not failed queries. A second failure, or a deployment with no replica able to
    take the call (overloaded, not running), is a :class:`DependencyUnavailable`.
    """
    try:
        try:
            return await call()
        except _REPLICA_DOWN:
            return await call()
    except BackPressureError as exc:
        raise DependencyUnavailable(f"{stage} is overloaded", retry_after_s=1.0) from exc
    except _REPLICA_DOWN as exc:
        raise DependencyUnavailable(f"{stage} replica unavailable", retry_after_s=2.0) from exc
