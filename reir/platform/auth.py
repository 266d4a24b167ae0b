"""API keys (stored as sha256 hex) and per-key token-bucket rate limits.

A presented key is hashed and looked up; the comparison is by digest, so the key
itself is never stored or logged. Keys come from config (``security.api_keys``) and/or
a mounted secret file (``security.api_keys_file``: YAML or JSON, a list of
``{name, sha256, scopes, rate_per_s?, burst?}`` or ``{"api_keys": [...]}``).

Rate-limit state lives in the process that checks the key: with N ingress replicas a
key can get up to N times its rate. That is a deliberate trade (no shared store on
the hot path); put a gateway in front when a global limit matters.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from reir.platform.config import ApiKeySpec, SecurityConfig


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (the caller stores only :func:`hash_key` of it)."""
    return "reir_" + secrets.token_urlsafe(32)


def load_key_file(path: str | Path) -> tuple[ApiKeySpec, ...]:
    data = yaml.safe_load(Path(path).read_text()) or []
    if isinstance(data, dict):
        data = data.get("api_keys", [])
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of API keys")  # noqa: TRY004 - a file content error
    return tuple(ApiKeySpec.model_validate(item) for item in data)


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` spends one if it can."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0 if a token was spent, else the seconds until one is available."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    key_id: str = ""  # the stored digest: selects the rate-limit bucket


class KeyRing:
    """Hashed keys -> principals, plus one token bucket per key."""

    def __init__(
        self,
        keys: Iterable[ApiKeySpec],
        *,
        rate_per_s: float = 20.0,
        burst: int = 40,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = {spec.sha256: spec for spec in keys}
        self._buckets = {
            spec.sha256: TokenBucket(spec.rate_per_s or rate_per_s, spec.burst or burst, clock=clock)
            for spec in self._keys.values()
        }

    @classmethod
    def from_config(cls, cfg: SecurityConfig) -> KeyRing:
        keys = list(cfg.api_keys)
        if cfg.api_keys_file is not None:
            keys += load_key_file(cfg.api_keys_file)
        return cls(keys, rate_per_s=cfg.rate_per_s, burst=cfg.burst)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, key: str) -> Principal | None:
        digest = hash_key(key)
        # Constant-time compare against every stored digest: no early exit on a prefix.
        match = None
        for stored in self._keys:
            if hmac.compare_digest(stored, digest):
                match = stored
        if match is None:
            return None
        spec = self._keys[match]
        return Principal(spec.name, frozenset(spec.scopes), key_id=match)

    def throttle(self, principal: Principal) -> float:
        """0.0 if the request may go ahead, else seconds to wait (HTTP 429 Retry-After)."""
        bucket = self._buckets.get(principal.key_id)
        return 0.0 if bucket is None else bucket.take()
