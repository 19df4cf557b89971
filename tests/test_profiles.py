"""Hardware profiles and the learning-rate schedule: pure functions, pinned against what the README says."""
import math

import pytest

from cluster.config import TrainConfig, resolve
from cluster.loop import lr_schedule


def test_the_cpu_profile_is_two_gloo_workers_in_fp32():
    r = resolve(TrainConfig(profile="cpu"))
    assert (r.use_gpu, r.num_workers, r.zero_stage, r.dtype, r.backend) == (False, 2, 0, "float32", "gloo")


def test_the_4090_profile_is_one_gpu_in_bf16_whatever_the_cluster_has():
    for gpus in (0, 1, 8):
        r = resolve(TrainConfig(profile="4090"), gpus_in_cluster=gpus)
        assert (r.use_gpu, r.num_workers, r.zero_stage, r.dtype, r.backend) == (True, 1, 0, "bfloat16", "nccl")


@pytest.mark.parametrize("gpus, workers", [(8, 8), (3, 3), (0, 1)])
def test_multi_gpu_is_zero2_with_one_worker_per_gpu(gpus, workers):
    r = resolve(TrainConfig(profile="multi-gpu"), gpus_in_cluster=gpus)
    assert (r.use_gpu, r.num_workers, r.zero_stage, r.dtype, r.backend) == (True, workers, 2, "bfloat16", "nccl")


def test_flags_override_the_profile():
    assert resolve(TrainConfig(profile="multi-gpu", zero_stage=0), 8).zero_stage == 0      # --zero-stage 0: DDP
    assert resolve(TrainConfig(profile="multi-gpu", zero_stage=3), 8).zero_stage == 3
    assert resolve(TrainConfig(profile="multi-gpu", num_workers=2), 8).num_workers == 2
    off = resolve(TrainConfig(profile="4090", use_gpu="false"))
    assert (off.use_gpu, off.dtype, off.backend) == (False, "float32", "gloo")  # CPU always trains in fp32
    on = resolve(TrainConfig(profile="cpu", use_gpu="true"))
    assert (on.use_gpu, on.backend, on.dtype) == (True, "nccl", "float32")  # the cpu profile's dtype is fp32


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    total, warmup, floor = 100, 0.1, 0.1
    f = lr_schedule(total, warmup, floor)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])  # 10 warmup steps
    assert f(10) == pytest.approx(1.0)                                   # the peak, right after warmup
    assert f(55) == pytest.approx(floor + (1 - floor) * 0.5)             # halfway through the decay
    assert f(100) == pytest.approx(floor) and f(500) == pytest.approx(floor)  # never below the floor
    decay = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))                 # monotone after the peak
    for s in (20, 40, 80):
        assert f(s) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90)))


def test_warmup_in_steps_and_none():
    assert lr_schedule(100, 5, 0.0)(4) == pytest.approx(1.0) and lr_schedule(100, 5, 0.0)(0) == pytest.approx(0.2)
    no_warmup = lr_schedule(100, 0.0, 0.1)  # MiniMind's own schedule: cosine from the peak, to lr/10
    assert no_warmup(0) == pytest.approx(1.0) and no_warmup(100) == pytest.approx(0.1)
