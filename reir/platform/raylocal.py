"""Joining Ray: the cluster at ``RAY_ADDRESS`` when it is set, else a local instance."""

from __future__ import annotations

import os

# Ray Serve's data plane for the Ray instances reir starts (Ray >= 2.55): HAProxy listens on the
# HTTP port and forwards straight to the ingress replicas' own ports (no Python proxy actor),
# replicas call each other over gRPC, and user code runs on the replica's event loop. Measured
# on 2 cores (docs/query-path.md): an HTTP round trip to a FastAPI replica 2.8-3.9 ms instead
# of 11-14 ms through the proxy actor. A variable already set wins (``=0`` turns it off);
# a cluster that reir joins reads these from its own nodes' environment (k8s: reir-env).
SERVE_DATA_PLANE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

# On that data plane an ingress replica that is told to stop first stays open for a minimum
# drain (Ray's default 30 s) so that load balancers outside Ray can deregister it: every
# `serve.delete`, redeploy, scale-down and stop of a local `reir serve` took 30 s more (3 ->
# 31 s for a delete on 2 cores). On a Ray reir starts on this machine, HAProxy is the only
# thing routing to the replicas and the controller updates it within a second, so 2 s. The
# k8s pods keep Ray's 30 s (reir-env does not set it). A variable already set wins.
LOCAL_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
# What a Ray reir starts on this machine gets (:func:`use_serve_data_plane`).
LOCAL_RAY_SERVE_ENV = {**SERVE_DATA_PLANE_ENV, **LOCAL_SERVE_ENV}


# HAProxy also binds a metrics and a stats port, by default 9101 and 8404 on every interface:
# a second Ray with HAProxy on one machine (another `reir serve`, a test session beside a
# multi-node test) failed to start with "Address already in use". reir picks free ones.
HAPROXY_PORT_ENV = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
_PORTS_PICKED_BY = "REIR_HAPROXY_PORTS_PICKED_BY"  # the pid that picked them (children pick again)


def use_serve_data_plane() -> None:
    """Set :data:`LOCAL_RAY_SERVE_ENV` in this process's environment (where unset), before it
    starts a local Ray: the raylet, the Serve controller and the replicas inherit it. HAProxy's
    metrics and stats ports (:data:`HAPROXY_PORT_ENV`) are free ports picked here, unless set
    by hand (not inherited from another reir process, whose HAProxy may hold them), and outside
    the ephemeral range (:func:`~reir.platform.milvus_server.reserved_port`)."""
    from reir.platform.milvus_server import reserved_port

    for key, value in LOCAL_RAY_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    set_by_hand = _PORTS_PICKED_BY not in os.environ and any(key in os.environ for key in HAPROXY_PORT_ENV)
    if not set_by_hand:
        picked: tuple[int, ...] = ()
        for key in HAPROXY_PORT_ENV:
            picked += (reserved_port(avoid=picked),)
            os.environ[key] = str(picked[-1])
        os.environ[_PORTS_PICKED_BY] = str(os.getpid())


def init_ray(num_cpus: int | None = None, *, local: bool = False, log_to_driver: bool = True) -> None:
    """Connect to ``RAY_ADDRESS`` (unless ``local``) or start a local Ray instance, once per process.

    The local instance runs the dashboard on a free port, and its workers are told that port
    (``RAY_API_SERVER_ADDRESS``). Ray Train's placement-group cleaner polls the state API every
    second to learn whether the train controller still lives:
    - without a dashboard it cannot tell, and logs "Failed to query Ray Train Controller actor
      state" once a second for the whole run;
    - without the pinned address it asks the Ray instance started last on this machine, where
      the controller is unknown, takes it for dead and removes the run's placement group: a
      training run died that way when a second local instance started beside it (another
      `reir` command, a test session).
    Logical CPUs above the core count keep Ray Data + Train from deadlocking on 2 cores.
    ``run_training``, ``run_ingestion`` and ``run_app`` call it, so a library caller need not: Ray's own
    ``ray.init()`` would join the cluster Ray's address file (``/tmp/ray/ray_current_cluster``)
    names and, after an instance that died without cleaning up, wait on it for ever.
    """
    import ray

    from reir.platform.milvus_server import free_port

    if ray.is_initialized():
        return
    if local:  # ray.init and the state API both read RAY_ADDRESS: this process stays on its own
        os.environ.pop("RAY_ADDRESS", None)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    port = free_port()
    use_serve_data_plane()
    # address="local": without it ray.init joins any cluster a `ray start` left on this machine
    # (and then refuses num_cpus); joining one is what RAY_ADDRESS is for.
    ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 2), include_dashboard=True,
             dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
             log_to_driver=log_to_driver)  # fmt: skip
