"""A small Python client for the reir HTTP API."""

from __future__ import annotations

from typing import Any

import requests

from reir.errors import ReirError


class Client:
    """``Client(url, api_key).search("the red square", top_k=5)`` -> list of result dicts."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = session or requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def search(self, query: str, top_k: int = 10, **extra: Any) -> list[dict[str, Any]]:
        return self.search_full(query, top_k=top_k, **extra)["results"]

    def search_full(self, query: str, top_k: int = 10, **extra: Any) -> dict[str, Any]:
        body = {"query": query, "top_k": top_k, **extra}
        try:
            resp = self._session.post(f"{self.url}/v1/search", json=body, timeout=self.timeout)
        except requests.ConnectionError as e:
            raise ReirError(f"cannot reach reir service at {self.url}: {e.__class__.__name__}") from e
        if resp.status_code != 200:
            raise ReirError(f"search failed: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def healthy(self) -> bool:
        try:
            return self._session.get(f"{self.url}/healthz", timeout=self.timeout).status_code == 200
        except requests.ConnectionError:
            return False
