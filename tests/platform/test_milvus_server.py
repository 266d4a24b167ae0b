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


def _torn_by_a_kill(path: Path, workers: int | None) -> tuple[int, int]:
    """Three writers upsert at once into a server with ``workers`` request threads (None: the
    default), then the server is SIGKILLed and restarted: (rows it recovered, rows written)."""
    import os
    import signal
    import threading

    columns = {"a": "str", "n": "int"}
    server = (EmbeddedMilvus(path) if workers is None else EmbeddedMilvus(path, max_workers=workers)).start()
    with MilvusStore(server.uri, "x") as store:
        store.table("tbl", columns)

    def writer(w: int) -> None:
        with MilvusStore(server.uri, "x") as store:
            table = store.table("tbl", columns, create=False)
            for i in range(40):
                table.upsert([{"pk": f"w{w}_{i}_{j}", "a": "v" * (10 * (j % 7 + 1)), "n": j} for j in range(64)])

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server._proc is not None
    os.kill(server._proc.pid, signal.SIGKILL)  # a crashed node: the log is all that is left
    server._proc.wait()
    server._proc = None
    with EmbeddedMilvus(path) as again, MilvusStore(again.uri, "x") as store:
        return len(list(store.table("tbl", columns).rows({}))), 3 * 40 * 64


def test_concurrent_writers_survive_a_killed_server_with_one_request_thread(tmp_path: Path) -> None:
    """milvus-lite appends to its write-ahead log from each request thread without a lock: with
    16 threads, three concurrent writers tore it and a restart recovered 192-320 of 7,680 rows
    (2026-11-26). EmbeddedMilvus's default (WRITERS_SAFE_WORKERS, one thread) recovers them all."""
    recovered, written = _torn_by_a_kill(tmp_path / "w.db", None)
    assert recovered == written


def test_the_ingestion_server_runs_one_request_thread(tmp_path: Path) -> None:
    import psutil

    from reir.ingestion.pipeline import shared_milvus
    from reir.platform.config import MilvusConfig

    with shared_milvus(MilvusConfig(uri=str(tmp_path / "i.db"))) as cfg:
        assert cfg.uri.startswith("http://127.0.0.1:")
        servers = [p.cmdline() for p in psutil.Process().children() if "milvus_lite" in " ".join(p.cmdline())]
    assert len(servers) == 1 and servers[0][servers[0].index("--max-workers") + 1] == "1"
