"""A real HTTP file server for tests: a folder served on a free local port, in a thread.

Besides the folder's files it answers ``/drip`` (a body sent a byte at a time, slowly, to
test read deadlines) and ``/stream`` (a large body without ``Content-Length``, to test the
size cap as bytes arrive). ``requests`` lists every path asked for, so a test can prove
that bytes went over HTTP.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DRIP_SECONDS = 3.0
STREAM_BYTES = 1 << 20


@dataclass
class FileServer:
    url: str
    requests: list[str] = field(default_factory=list)


class _Handler(SimpleHTTPRequestHandler):
    log_to: list[str]

    def do_GET(self) -> None:
        self.log_to.append(self.path)
        if self.path == "/drip":
            self._raw_body(b"x" * int(DRIP_SECONDS * 10), pause_s=0.1)
        elif self.path == "/stream":
            self._raw_body(b"y" * STREAM_BYTES, pause_s=0.0)
        else:
            super().do_GET()

    def _raw_body(self, body: bytes, pause_s: float) -> None:
        # HTTP/1.0 without Content-Length: the body ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        step = 1 if pause_s else len(body)
        try:
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):  # the reader gave up, as it should
            return

    def log_message(self, format: str, *args: Any) -> None:
        return None


@contextlib.contextmanager
def serve_files(root: Path) -> Iterator[FileServer]:
    """Serve ``root`` at ``http://127.0.0.1:<free port>`` until the block ends."""
    log: list[str] = []
    handler = type("Handler", (_Handler,), {"log_to": log})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-file-server", daemon=True)
    thread.start()
    try:
        yield FileServer(f"http://127.0.0.1:{server.server_address[1]}", log)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
