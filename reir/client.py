"""A small Python client for the reir HTTP API (``/v1/search``, ``/v1/info``, ``/healthz``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import requests

from reir.errors import ReirError


class Client:
    """``Client(url, api_key).search("the red square", top_k=5)`` -> list of result dicts.

    Result dicts are ``{"image_id", "uri", "box": [x, y, w, h] (pixels), "score"}``.
    ``filters`` are structured clauses, e.g. ``[{"field": "image_id", "op": "in",
    "value": ["a", "b"]}]`` (the service checks them against its allow-list).
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = session or requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def search(
        self,
        query: str,
        top_k: int = 10,
        *,
        mode: Literal["rank", "discover"] = "rank",
        rerank: bool | None = None,
        filters: Sequence[Mapping[str, Any]] = (),
    ) -> list[dict[str, Any]]:
        return self.search_full(query, top_k=top_k, mode=mode, rerank=rerank, filters=filters)["results"]

    def search_full(
        self,
        query: str,
        top_k: int = 10,
        *,
        mode: Literal["rank", "discover"] = "rank",
        rerank: bool | None = None,
        filters: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """The whole response: results plus ``model_version``, ``mode``, ``reranked``,
        ``threshold`` (discover), ``candidates``, ``timings_ms``, ``took_ms``."""
        body: dict[str, Any] = {"query": query, "top_k": top_k, "mode": mode}
        if rerank is not None:
            body["rerank"] = rerank
        if filters:
            body["filters"] = [dict(f) for f in filters]
        return self._request("POST", "/v1/search", json=body)

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/info")

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = self._session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        except requests.ConnectionError as e:
            raise ReirError(f"cannot reach reir service at {self.url}: {e.__class__.__name__}") from e
        if resp.status_code != 200:
            raise ReirError(f"{path} failed: HTTP {resp.status_code}: {_message(resp)}")
        return resp.json()

    def healthy(self) -> bool:
        try:
            return self._session.get(f"{self.url}/healthz", timeout=self.timeout).status_code == 200
        except requests.ConnectionError:
            return False


def _message(resp: requests.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        parts = [f"{d.get('field')}: {d.get('message')}" for d in data["detail"] if isinstance(d, dict)]
        return f"{data.get('error', '')} ({'; '.join(parts)})"[:300]
    return str(data.get("error", data) if isinstance(data, dict) else data)[:300]
