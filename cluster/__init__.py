"""Ray orchestration: data ingest, the training launcher, strategies, checkpoints. Knows no stage's loss."""
import os as _os

from .runtime import loopback_env as _loopback_env

# Ray reads its networking switches when it is imported, so they are set here, before any module of this
# package imports ray. Only for an embedded cluster: a driver joining a real cluster (RAY_ADDRESS set, as
# under `ray job submit`) must advertise its real address to the other nodes.
if not _os.environ.get("RAY_ADDRESS"):
    _loopback_env()
