"""Where a sweep's trials run: how many fit the cluster at once, the CPUs a stopped trial leaves behind, and
a bounded wait for a trial that cannot start.

Each trial is a Train run whose controller (an actor) reserves a placement group for its workers. Ray gives
a group made by a non-detached actor the lifetime of the *job* (here the sweep's driver), not of the actor:
when ASHA stops a trial, Tune kills the trial and its controller, and the group keeps its CPUs until the
driver exits (ray-project/ray#54305). Ray's own `PlacementGroupCleaner` asks the state API, which needs the
dashboard; without it the next trial waited for CPUs that never came while Train retried
`WorkerGroupStartupTimeoutError` forever (measured: the README's ASHA example hung at its 4th trial, a
leaked 2-CPU group in the table). `ReleaseOrphans` removes, from the driver, every group of this job whose
creating actor is dead.

A trial whose workers cannot be placed (something else holds the CPUs, a bundle larger than any node) is
retried by Train without end; `RecordStarts` counts its attempts and `StopWhenStuck` ends the sweep after
`START_ATTEMPTS` of them, naming what the trial asked for.
"""
from __future__ import annotations

import math
import time

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback, Stopper

NAMESPACE = "minimind-tune"
START_ATTEMPTS = 3   # failed worker-group starts before the sweep stops; Train waits 60 s for each, or:
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DATA_CPUS = 1.0      # kept free for Ray Data's ingest tasks, or training deadlocks (see RAY-ON-CPU.md)


def trials_that_fit(cluster: dict, trial_cpus: float, trial_gpus: float = 0.0) -> int:
    """How many trials can hold their workers at once, with DATA_CPUS left for Ray Data."""
    fits = math.floor((cluster.get("CPU", 0) - DATA_CPUS) / trial_cpus + 1e-9)
    if trial_gpus:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / trial_gpus + 1e-9))
    return max(fits, 0)


def orphaned_groups(job_hex: str) -> list[bytes]:
    """Placement groups of this job whose creating actor is dead and that still hold (or wait for) resources.
    Groups the driver made itself (Tune's own, one per trial) have no creating actor and are left alone.
    The public table leaves out the creator, so the GCS record is read (Ray is pinned, see pyproject.toml)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    table = gcs_pb2.PlacementGroupTableData
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        g = table.FromString(raw)
        made_by_actor = g.creator_actor_id and g.creator_actor_id != b"\xff" * len(g.creator_actor_id)
        if (made_by_actor and g.creator_actor_dead and not g.is_detached and g.state != table.REMOVED
                and g.creator_job_id.hex() == job_hex):
            out.append(g.placement_group_id)
    return out


def release_orphans() -> int:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    groups = orphaned_groups(ray.get_runtime_context().get_job_id())
    for gid in groups:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(gid)))
    return len(groups)


class ReleaseOrphans(Callback):
    """Tune callback (in the driver): every couple of seconds, free the groups of stopped trials."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last, self.released = every_s, 0.0, 0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.released += release_orphans()


class TrialStarts:
    """Actor (one per sweep, owned by its driver): failed worker-group starts per trial."""

    def __init__(self):
        self.attempts: dict[str, int] = {}
        self.requests: dict[str, str] = {}

    def attempt(self, trial_id: str, request: str) -> None:
        self.attempts[trial_id] = self.attempts.get(trial_id, 0) + 1
        self.requests[trial_id] = request

    def placed(self, trial_id: str) -> None:
        self.attempts[trial_id] = 0

    def stuck(self) -> list[tuple[str, int, str]]:
        """(trial id, failed starts, what it asked for) of every trial past START_ATTEMPTS."""
        return [(t, n - 1, self.requests[t]) for t, n in self.attempts.items() if n > START_ATTEMPTS]


def start_keeper(name: str):
    """The sweep's TrialStarts actor; it lives as long as this driver."""
    import ray
    return ray.remote(num_cpus=0)(TrialStarts).options(name=name, namespace=NAMESPACE,
                                                        get_if_exists=True).remote()


class RecordStarts(WorkerGroupCallback):
    """Train callback (in the trial's controller): tells the sweep's TrialStarts each start and success."""

    def __init__(self, keeper_name: str, trial_id: str):
        self.keeper_name, self.trial_id = keeper_name, trial_id

    def _keeper(self):
        import ray
        return ray.get_actor(self.keeper_name, namespace=NAMESPACE)

    def before_worker_group_start(self, worker_group_context):
        ctx = worker_group_context
        self._keeper().attempt.remote(self.trial_id, f"{ctx.num_workers} workers x {ctx.resources_per_worker}")

    def after_worker_group_start(self, worker_group):
        self._keeper().placed.remote(self.trial_id)


class StopWhenStuck(Stopper):
    """Ends the sweep as soon as a trial's workers failed to be placed START_ATTEMPTS times. Holds the
    keeper's name, not its handle: Tune pickles the stopper with the sweep and restores it on --resume."""

    def __init__(self, keeper_name: str, every_s: float = 5.0):
        self.keeper_name, self.every_s, self.last, self.found = keeper_name, every_s, 0.0, []

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        if not self.found and time.monotonic() - self.last >= self.every_s:
            import ray
            self.last = time.monotonic()
            self.found = ray.get(ray.get_actor(self.keeper_name, namespace=NAMESPACE).stuck.remote())
        return bool(self.found)

    @staticmethod
    def describe(stuck: tuple[str, int, str], cluster: dict) -> str:
        tid, tries, request = stuck
        return (f"trial {tid} could not start: its {request} were not placed in {tries} tries (the cluster has "
                f"{cluster.get('CPU', 0):g} CPUs; something else holds them, or one worker needs more than a "
                f"node has); free the cluster or lower --set cpus_per_worker=... / num_workers=...")
