"""The Serve data plane a local Ray starts with (``use_serve_data_plane``): HAProxy and
throughput mode unless set otherwise, and HAProxy's own metrics/stats ports free for each
instance, so a second reir Serve on one machine does not fail on "Address already in use"."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from reir.platform.milvus_server import RESERVE_HIGH, RESERVE_LOW, ephemeral_range, reserved_port
from reir.platform.raylocal import HAPROXY_PORT_ENV, LOCAL_SERVE_ENV, SERVE_DATA_PLANE_ENV, use_serve_data_plane

PICKED_BY = "REIR_HAPROXY_PORTS_PICKED_BY"


def _ports() -> list[int]:
    return [int(os.environ[key]) for key in HAPROXY_PORT_ENV]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [*SERVE_DATA_PLANE_ENV, *LOCAL_SERVE_ENV, *HAPROXY_PORT_ENV, PICKED_BY]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_a_fresh_environment_gets_the_data_plane_and_free_haproxy_ports(clean_env: pytest.MonkeyPatch) -> None:
    use_serve_data_plane()
    assert {k: os.environ[k] for k in SERVE_DATA_PLANE_ENV} == SERVE_DATA_PLANE_ENV
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"  # not Ray's 30 s per stop
    ports = _ports()
    assert len(set(ports)) == 2 and os.environ[PICKED_BY] == str(os.getpid())
    low, high = ephemeral_range()
    for port in ports:  # free now: HAProxy binds them on every interface
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", port))
        # and outside the ephemeral range: Serve binds them minutes after Ray starts, and a port
        # of that range can be taken in between by any connection (a demo failed so)
        assert not low <= port <= high


def test_a_reserved_port_skips_ports_that_are_taken_or_handed_out(tmp_path: Path) -> None:
    first = reserved_port(random.Random(0))
    with socket.socket() as held:
        held.bind(("0.0.0.0", first))
        held.listen()
        again = reserved_port(random.Random(0))  # the same draw, the first port now taken
    assert again != first and RESERVE_LOW <= again <= RESERVE_HIGH
    assert reserved_port(random.Random(0), avoid=(first,)) != first
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("1024\t65000\n")
    assert ephemeral_range(str(ranges)) == (1024, 65000)
    assert ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)


def test_ports_held_by_another_reir_process_are_picked_again(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:  # the parent's HAProxy holds the ports its children inherit
        held.bind(("0.0.0.0", 0))
        held.listen()
        busy = held.getsockname()[1]
        for key in HAPROXY_PORT_ENV:
            clean_env.setenv(key, str(busy))
        clean_env.setenv(PICKED_BY, str(os.getpid() + 1))
        use_serve_data_plane()
        assert busy not in _ports()


def test_what_the_user_set_wins(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    clean_env.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    clean_env.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")
    clean_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    use_serve_data_plane()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    assert _ports() == [19101, 18404] and PICKED_BY not in os.environ
