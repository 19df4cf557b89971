"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set (e.g. under `ray job submit`), otherwise
an embedded local cluster on this machine that listens on loopback only."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR: the module path of a function every worker runs
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def loopback_env() -> None:
    # Measured here: with this set, every Ray listener binds 127.0.0.1 (by default Ray also listens on the
    # machine's external address and 0.0.0.0). Train, DeepSpeed-on-Ray and Serve still work.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():  # a Ray worker's own setup is done: leave it alone
        # Two listeners ignore the switch above (a Serve replica's gRPC server, torch's rendezvous store);
        # cluster.loopback binds them to the node address in every worker. Ray reads this variable at the
        # start of each worker (what ray.init(runtime_env={"worker_process_setup_hook": ...}) sets); as a
        # variable it also reaches the workers of a cluster that `serve run` starts with its own ray.init.
        os.environ.setdefault(SETUP_HOOK_ENV, "cluster.loopback.bind_node_address")
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            # `serve run` imports ray before serve.app calls this: the switch was already read (without it
            # that cluster listened on the external address and on [::]). Give Ray the value it would read.
            switch = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower()
            constants.ENABLE_RAY_CLUSTER = switch in ("1", "true")
    # Workers must import this project's packages, or a Train controller errors while its workers keep the
    # placement group and every later job waits forever.
    os.environ["PYTHONPATH"] = pythonpath_with_repo(os.environ.get("PYTHONPATH", ""))


def pythonpath_with_repo(path: str) -> str:
    """`path` (a PYTHONPATH value) with the project root first, unless it already holds it."""
    if str(REPO_ROOT) in path.split(os.pathsep):
        return path
    return os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, address: str | None = None,
             include_dashboard: bool = False):
    """Start or join Ray once per process. Returns the `ray` module. The dashboard of a cluster started here
    listens on 127.0.0.1 only."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        loopback_env()  # before `import ray`: Ray reads these switches at import time
    import ray
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # At least 4 logical CPUs: two training workers plus room for Ray Data's tasks, which otherwise
        # wait forever for a free CPU (measured on a 2-core machine).
        num_cpus = num_cpus or max(os.cpu_count() or 1, 4)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 **({"dashboard_host": "127.0.0.1"} if include_dashboard else {}),
                 _node_ip_address="127.0.0.1", log_to_driver=True)
    return ray
