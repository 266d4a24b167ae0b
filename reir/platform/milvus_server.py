"""Run ``milvus-lite server`` as a child process so several processes share one local store.

A milvus-lite data directory (what pymilvus calls ``something.db``) is locked by the
one process that opens it. Ray actors, Serve replicas and an ingestion job are all
separate processes, so they instead talk gRPC to one server process that owns the
directory: ``with EmbeddedMilvus(path) as m: MilvusStore(m.uri, ...)``.

Shutdown sends SIGINT first because that is the signal the server handles gracefully
(drain requests, close the DB and its write-ahead log); SIGTERM/SIGKILL are fallbacks.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from pymilvus import MilvusClient

if TYPE_CHECKING:
    from typing import Self


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Ray's workers listen on 10002-19999 by default (--min/max-worker-port), Serve's ingress
# replicas from 30000 up.
RESERVE_LOW, RESERVE_HIGH = 20000, 29999


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for ports bound to 0 and for outgoing connections (Linux's default
    where it cannot be read)."""
    try:
        low, high = (int(v) for v in Path(path).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def reserved_port(rng: random.Random | None = None, tries: int = 200, avoid: tuple[int, ...] = ()) -> int:
    """A port free on every interface now and outside the kernel's ephemeral range, for a
    server that binds it long after it is picked: HAProxy's ports are picked when Ray starts
    and bound when Serve starts, 20 minutes later in `make demo`, and a port from the
    ephemeral range was taken in between by one of the many connections Ray opens ("cannot
    bind socket (Address already in use)"). Falls back to :func:`free_port` where the
    ephemeral range leaves no room below it. ``avoid``: ports already handed out (not bound yet)."""
    low, _ = ephemeral_range()
    high = min(RESERVE_HIGH, low - 1)
    rng = rng or random.Random()
    for _ in range(tries if high > RESERVE_LOW else 0):
        port = rng.randint(RESERVE_LOW, high)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    return free_port("0.0.0.0")


# milvus-lite appends each write to its collection's write-ahead log from the request's gRPC
# thread, with no lock: two writers at once (two encoder actors upserting) interleave their
# bytes, and when the server dies the replay stops at the first torn batch. A run of 20,000
# images killed at 12,224 found 3,648 in its ledger ("WAL recovery stopped at batch boundary
# 57 ... non-monotonic offset"); the rest was encoded again. One request thread serializes them,
# so it is every EmbeddedMilvus's default: the ones reir starts all take writes from several
# processes (an ingestion's actors, the demo's and the tests' ingest-then-serve servers).
WRITERS_SAFE_WORKERS = 1


class EmbeddedMilvus:
    """Context manager owning a milvus-lite server subprocess for ``data_dir``.

    ``max_workers``: the server's request threads, :data:`WRITERS_SAFE_WORKERS` by default;
    more only for a server that no two processes write to at once.
    """

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 60.0,
        max_workers: int = WRITERS_SAFE_WORKERS,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.max_workers = max_workers
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def uri(self) -> str:
        if self.port is None or self._proc is None:
            raise RuntimeError("EmbeddedMilvus is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("EmbeddedMilvus already started")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        with tempfile.NamedTemporaryFile(prefix="milvus-lite-", suffix=".log", delete=False) as log:
            self._log_path = Path(log.name)
        cmd = [
            sys.executable, "-m", "milvus_lite", "server",
            "--data-dir", str(self.data_dir),
            "--host", self.host,
            "--port", str(self.port),
            "--max-workers", str(self.max_workers),
        ]  # fmt: skip
        # The interpreter running us has milvus_lite installed; a bare `milvus-lite`
        # on PATH might belong to another environment.
        with self._log_path.open("wb") as log:  # the child keeps its own copy of the fd
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited early:\n{self.log_tail()}")
            try:
                # dedicated: pymilvus otherwise keeps a shared channel per address for the
                # life of the process, which a later server on a recycled port would inherit dead.
                client = MilvusClient(uri=f"http://{self.host}:{self.port}", timeout=2.0, dedicated=True)
                try:
                    client.list_collections()
                    return
                finally:
                    client.close()
            except Exception as exc:  # noqa: BLE001 - not listening yet
                last_error = exc
                time.sleep(0.05)
        raise TimeoutError(
            f"milvus-lite server not ready after {self.startup_timeout_s}s "
            f"({last_error}):\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                proc.kill()
                proc.wait()
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
