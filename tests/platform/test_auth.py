"""API keys (hashed), key files, token buckets, and the serving config that carries them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from reir.platform.auth import KeyRing, TokenBucket, hash_key, load_key_file, new_key
from reir.platform.config import ApiKeySpec, AutoscalingSpec, MilvusConfig, ServeConfig, load_config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_spends_burst_then_refills_at_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token needs 1/rate seconds
    clock.now += 0.5
    assert bucket.take() == 0.0 and bucket.take() > 0
    clock.now += 100
    assert [bucket.take() for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refills only up to the burst


def test_keyring_matches_hashes_scopes_and_buckets_per_key() -> None:
    clock = Clock()
    ring = KeyRing([ApiKeySpec(name="a", sha256=hash_key("ka")),
                    ApiKeySpec(name="b", sha256=hash_key("kb"), scopes=("search", "admin"), rate_per_s=1, burst=1)],
                   rate_per_s=10, burst=2, clock=clock)  # fmt: skip
    assert ring.enabled and ring.authenticate("nope") is None and ring.authenticate("") is None
    a, b = ring.authenticate("ka"), ring.authenticate("kb")
    assert a is not None and b is not None
    assert a.scopes == {"search"} and b.scopes == {"search", "admin"}
    assert [ring.throttle(b) for _ in range(2)] == [0.0, 1.0]  # its own rate/burst
    assert [ring.throttle(a) for _ in range(3)][:2] == [0.0, 0.0]  # the default rate/burst, own bucket
    assert not KeyRing([]).enabled


def test_key_file_and_env_var_reach_the_serve_config(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"api_keys": [{"name": "svc", "sha256": hash_key(key), "scopes": ["search"]}]}))
    assert load_key_file(path)[0].name == "svc"
    cfg = load_config(ServeConfig, overrides={"model_path": "m"},
                      env={"REIR_SECURITY__API_KEYS_FILE": str(path), "REIR_SECURITY__RATE_PER_S": "5"})
    assert cfg.security.api_keys_file == path and cfg.security.rate_per_s == 5
    ring = KeyRing.from_config(cfg.security)
    principal = ring.authenticate(key)
    assert principal is not None and principal.name == "svc"
    path.write_text("just a string")
    with pytest.raises(ValueError, match="list of API keys"):
        load_key_file(path)


def test_key_specs_hold_only_hashes_and_known_scopes() -> None:
    with pytest.raises(ValidationError):
        ApiKeySpec(name="x", sha256="plaintext-key")
    with pytest.raises(ValidationError):
        ApiKeySpec(name="x", sha256=hash_key("k"), scopes=("root",))  # type: ignore[arg-type]
    assert "sha256" not in repr(ApiKeySpec(name="x", sha256=hash_key("k")))


def test_autoscaling_config_is_validated() -> None:
    cfg = ServeConfig(model_path="m", milvus=MilvusConfig(uri="http://127.0.0.1:19530"),
                      autoscaling={"encoder": AutoscalingSpec(min_replicas=1, max_replicas=4)},
                      search_in_ingress=False, encode_in_searcher=False)  # a QueryEncoder deployment to scale
    assert cfg.autoscaling["encoder"].max_replicas == 4
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingSpec(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        ServeConfig(model_path="m", autoscaling={"everything": {"max_replicas": 2}})  # type: ignore[dict-item]
    with pytest.raises(ValidationError, match="one process"):
        ServeConfig(model_path="m", milvus=MilvusConfig(uri="x.db"), autoscaling={"searcher": {"max_replicas": 2}})
