from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from reir.platform import schema as S
from reir.platform.milvus_server import EmbeddedMilvus
from reir.platform.store import MilvusStore

DIM = 8


@ray.remote(num_cpus=0.25)
def _write_rows(uri: str, n: int) -> int:
    """Runs in a Ray worker process: a second process writing to the shared server."""
    vecs = np.eye(n, DIM, dtype=np.float32)
    rows = [S.InstanceRow(f"img{i}", f"/g/{i}.jpg", (0, 0, 1, 1), 0.9, 0, "v", vecs[i]).to_dict() for i in range(n)]
    with MilvusStore(uri, "shared", dim=DIM) as store:
        return store.upsert(rows)


def test_server_is_shared_by_processes_and_file_usable_after(tmp_path: Path, ray_session: None) -> None:
    data = tmp_path / "idx.db"
    with EmbeddedMilvus(data) as server:
        assert server.running and server.uri.startswith("http://127.0.0.1:")
        assert ray.get(_write_rows.remote(server.uri, 5)) == 5
        with MilvusStore(server.uri, "shared") as store:
            store.load()
            assert store.count() == 5
            assert store.search(np.eye(5, DIM)[3], 1)[0][0].image_id == "img3"
    assert not server.running
    # After shutdown the data directory is a plain milvus-lite file store again.
    with MilvusStore(str(data), "shared") as store:
        store.load()
        assert store.count() == 5


def test_startup_failure_reports_the_log(tmp_path: Path) -> None:
    blocker = tmp_path / "taken.db"
    with EmbeddedMilvus(blocker) as first:
        with pytest.raises(RuntimeError, match="exited early"):
            EmbeddedMilvus(blocker, startup_timeout_s=30).start()  # data dir locked by `first`
        assert first.running
