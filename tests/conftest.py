"""Shared fixtures: one local Ray cluster for the whole session, and the real data beside the checkout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import cluster  # noqa: F401,E402  (sets Ray's loopback switches before anything imports ray)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it lies beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every test that needs Ray.

    4 logical CPUs on a 2-core machine: 2 train workers at 1 CPU each would otherwise leave Ray Data no CPU
    and hang (measured: ray.init(num_cpus=2) with 2 workers deadlocks).
    """
    from cluster.runtime import init_ray
    ray = init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
