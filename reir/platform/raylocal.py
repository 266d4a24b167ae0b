"""Joining Ray: the cluster at ``RAY_ADDRESS`` when it is set, else a local instance."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, *, local: bool = False, log_to_driver: bool = True) -> None:
    """Connect to ``RAY_ADDRESS`` (unless ``local``) or start a local Ray instance, once per process.

    The local instance runs the dashboard: it serves Ray's state API, which Ray Train's
    placement-group cleaner polls every second to learn whether the train controller still
    lives. Without it the cleaner cannot tell, logs "Failed to query Ray Train Controller actor
    state" once a second for the whole run and would leave a dead run's placement group
    behind. Logical CPUs above the core count keep Ray Data + Train from deadlocking on
    2 cores.
    """
    import ray

    if ray.is_initialized():
        return
    if local:  # ray.init and the state API both read RAY_ADDRESS: this process stays on its own
        os.environ.pop("RAY_ADDRESS", None)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 2), include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=log_to_driver)  # fmt: skip
