"""How ``reir serve`` starts and stops: the port checked up front, a clean exit on SIGTERM.

A container stop sends SIGTERM; Python's default for it is to die on the spot, and a
KeyboardInterrupt (Ctrl-C) arrives wherever the main thread happens to be, so either way
the process used to end in a stack dump with Serve and Ray left to their own cleanup.
Here both signals only set an event; the main thread then shuts Serve and Ray down in
order and the command exits 0.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import FrameType

from reir.errors import ReirError

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def check_port_free(host: str, port: int) -> None:
    """Fail fast, with one line, when ``host:port`` is taken (Serve would only log it from its proxy)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port in TIME_WAIT after a previous run is free for the proxy too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ReirError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def local_base_url(host: str, port: int, route_prefix: str = "/") -> str:
    """The URL this machine reaches an app at when Serve listens on ``host:port`` (any-address
    hosts are reached on the loopback)."""
    reach = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{reach}:{port}{route_prefix.rstrip('/')}"


def wait_until_routed(base_url: str, *, timeout_s: float = 60.0, interval_s: float = 0.2) -> float:
    """Block until the app answers ``{base_url}/livez`` with 200; returns the seconds waited.

    ``serve.run`` returns once the replicas run, but Serve's HTTP data plane (HAProxy) picks
    the new route up a moment later: a request in between gets a 404 from the proxy, not an
    answer from reir. Starting to send traffic only after this returns closes that window.
    Raises ``ReirError`` after ``timeout_s``."""
    url = base_url.rstrip("/") + "/livez"
    started = time.monotonic()
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() - started > timeout_s:
            raise ReirError(f"the app at {base_url} is deployed but {url} did not answer in {timeout_s:.0f} s ({last})")
        time.sleep(interval_s)


def wait_for_stop_signal(
    stopped: threading.Event | None = None, signals: tuple[signal.Signals, ...] = STOP_SIGNALS
) -> signal.Signals | None:
    """Block until one of ``signals`` arrives (or ``stopped`` is set); returns the signal.

    The previous handlers are put back afterwards, so a second Ctrl-C during the shutdown
    still interrupts a hung cleanup.
    """
    stopped = stopped or threading.Event()
    received: list[signal.Signals] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        stopped.set()

    previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, on_signal)
    try:
        # A timed wait: an untimed Event.wait() would not let the handler run on some Pythons.
        while not stopped.wait(timeout=1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return received[0] if received else None


_RAISED = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Unavailable|Aborted))(?:\([^)]*\))?: (.+)$")


def deploy_failure(exc: BaseException, details: list[str] | None = None) -> ReirError:
    """One line for an app that failed to deploy: the exception a replica's constructor raised.

    Serve raises only "Deploying application ... failed: Failed to update the deployments
    [...]"; the reason is in the failed deployment's status message, which carries the
    replica's whole traceback. Its last ``SomeError: message`` line is the reason
    ("collection 'x' not found at ...; run ingestion first", a model that will not load).
    """
    for text in [*(details if details is not None else failed_deployment_messages()), str(exc)]:
        for line in reversed(text.splitlines()):
            found = _RAISED.match(line)
            if found:
                return ReirError(f"the app failed to start: {found.group(1)}: {found.group(2).strip()}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ReirError(f"the app failed to start: {first}")


def failed_deployment_messages() -> list[str]:
    """Status messages of the deployments that are not healthy (empty when Serve can not say)."""
    from ray import serve

    try:
        apps = serve.status().applications.values()
    except Exception:  # noqa: BLE001 - only a better error message is at stake
        return []
    return [d.message for app in apps for d in app.deployments.values()
            if str(d.status) not in ("HEALTHY", "DeploymentStatus.HEALTHY") and d.message]  # fmt: skip


def shutdown_serving() -> None:
    """Serve first (drains the proxy and replicas), then this process's Ray."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
