"""A small Python client for the reir HTTP API, with retries for the calls that are safe to repeat.

Every call the client makes is idempotent (searches are read-only), so a failure that
says "try again" is retried under a :class:`RetryPolicy`: exponential backoff with full
jitter, ``Retry-After`` honoured, a bounded number of attempts and a total deadline.
Retried: a connection that could not be made or timed out, 502, 503, 504. Never retried:
any 4xx (the request itself is wrong, or over a rate limit the caller must respect) and
500 (a bug: the same request fails the same way). docs/errors.md has the table.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import requests

from reir.errors import DependencyUnavailable, ReirError

RETRY_STATUSES = frozenset({502, 503, 504})
USAGE_STATUSES = frozenset({400, 413, 422})


class ServiceError(ReirError):
    """The service answered with an error status; ``status``, ``request_id`` (5xx) and
    ``retry_after_s`` (429/503) say what it was."""

    def __init__(self, message: str, *, status: int, request_id: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        # For the CLI: a request the service refused as malformed came from the flags (usage, 2).
        self.exit_code = 2 if status in USAGE_STATUSES else 1


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``max_attempts`` in all, within ``deadline_s`` from the first try.

    The n-th wait is uniform in [0, min(backoff_max_s, backoff_base_s * 2**n)] ("full
    jitter": clients that failed together do not come back together), or the server's
    ``Retry-After`` when it sent one. A wait that would pass the deadline is not taken:
    the last error is raised at once.
    """

    max_attempts: int = 4
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0
    deadline_s: float = 60.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * (2**retry)))


NO_RETRY = RetryPolicy(max_attempts=1)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (delta seconds or an HTTP date) in seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Client:
    """``Client(url, api_key).search("the red square", top_k=5)`` -> list of result dicts.

    Result dicts are ``{"image_id", "uri", "box": [x, y, w, h] (pixels), "score", "refined"}``.
    ``filters`` are structured clauses, e.g. ``[{"field": "image_id", "op": "in",
    "value": ["a", "b"]}]`` (the service checks them against its allow-list).
    ``retry`` sets the retry policy (``NO_RETRY`` turns retries off); ``sleep`` and ``rng``
    are there so a caller (or a test) can observe or seed the waits.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 session: requests.Session | None = None, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._session = session or requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def search(
        self, query: str, top_k: int = 10, *, mode: Literal["rank", "discover"] = "rank", rerank: bool | None = None,
        filters: Sequence[Mapping[str, Any]] = (),
    ) -> list[dict[str, Any]]:  # fmt: skip
        return self.search_full(query, top_k=top_k, mode=mode, rerank=rerank, filters=filters)["results"]

    def search_full(
        self, query: str, top_k: int = 10, *, mode: Literal["rank", "discover"] = "rank", rerank: bool | None = None,
        filters: Sequence[Mapping[str, Any]] = (), offset: int = 0,
    ) -> dict[str, Any]:  # fmt: skip
        """The whole response: results plus ``model_version``, ``mode``, ``reranked``,
        ``threshold`` (discover), ``candidates``, ``timings_ms``, ``took_ms``, ``truncated``,
        ``total`` (discover) and ``next_offset`` (the next page; None on the last)."""
        return self._request("POST", "/v1/search", json=search_body(query, top_k, mode, rerank, filters, offset))

    def discover_pages(self, query: str, *, page_size: int = 100,
                       filters: Sequence[Mapping[str, Any]] = ()) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Each page of discover mode's answer for ``query`` (the whole response), first to last."""
        offset: int | None = 0
        while offset is not None:
            page = self.search_full(query, top_k=page_size, mode="discover", filters=filters, offset=offset)
            yield page
            offset = page.get("next_offset")

    def discover(self, query: str, *, page_size: int = 100, filters: Sequence[Mapping[str, Any]] = (),
                 max_results: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Every image discover mode finds for ``query`` (all pages, best first), up to ``max_results``."""
        found: list[dict[str, Any]] = []
        for page in self.discover_pages(query, page_size=page_size, filters=filters):
            found += page["results"]
            if max_results is not None and len(found) >= max_results:
                return found[:max_results]
        return found

    def search_batch(self, queries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``POST /v1/search/batch``: one ``{"status", "result" | "error", ...}`` per query body, in order."""
        return self._request("POST", "/v1/search/batch", json={"queries": [dict(q) for q in queries]})["responses"]

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/info")

    def ready(self) -> bool:
        """``/readyz``: the model is loaded and the store answers (no retries: a probe)."""
        try:
            return self._session.get(f"{self.url}/readyz", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    healthy = ready  # the name older callers use

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        policy, start = self.retry, time.monotonic()
        for attempt in range(policy.max_attempts):
            try:
                resp = self._session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as e:
                error: ReirError = DependencyUnavailable(
                    f"cannot reach reir service at {self.url}: {e.__class__.__name__}")
                wait = policy.backoff(attempt, self._rng)
                cause: Exception = e
            else:
                if resp.status_code == 200:
                    return resp.json()
                error, cause = _service_error(path, resp), requests.HTTPError(f"HTTP {resp.status_code}", response=resp)
                if resp.status_code not in RETRY_STATUSES:
                    raise error from None
                hinted = retry_after_seconds(resp.headers.get("Retry-After"))
                wait = hinted if hinted is not None else policy.backoff(attempt, self._rng)
            last = attempt == policy.max_attempts - 1
            if last or time.monotonic() - start + wait > policy.deadline_s:
                raise error from cause
            self._sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")


def search_body(query: str, top_k: int, mode: str, rerank: bool | None,
                filters: Sequence[Mapping[str, Any]], offset: int = 0) -> dict[str, Any]:  # fmt: skip
    """A ``/v1/search`` body (also one query of a batch)."""
    body: dict[str, Any] = {"query": query, "top_k": top_k, "mode": mode}
    if offset:
        body["offset"] = offset
    if rerank is not None:
        body["rerank"] = rerank
    if filters:
        body["filters"] = [dict(f) for f in filters]
    return body


def _service_error(path: str, resp: requests.Response) -> ServiceError:
    data: Any
    try:
        data = resp.json()
    except ValueError:
        data = None
    request_id = data.get("request_id") if isinstance(data, dict) else None
    message = f"{path} failed: HTTP {resp.status_code}: {_message(resp, data)}"
    if request_id:
        message += f" (request id {request_id})"
    return ServiceError(message, status=resp.status_code, request_id=request_id,
                        retry_after_s=retry_after_seconds(resp.headers.get("Retry-After")))


def _message(resp: requests.Response, data: Any) -> str:
    if data is None:
        return resp.text[:300]
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        parts = [f"{d.get('field')}: {d.get('message')}" for d in data["detail"] if isinstance(d, dict)]
        return f"{data.get('error', '')} ({'; '.join(parts)})"[:300]
    return str(data.get("error", data) if isinstance(data, dict) else data)[:300]
