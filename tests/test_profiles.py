"""Hardware profiles and the learning-rate schedule: pure functions, pinned against what the README says."""
import math

import pytest

from cluster.config import TrainConfig, resolve
from minimind.configcli import parse_config
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
    off = resolve(TrainConfig(profile="4090", use_gpu=False))
    assert (off.use_gpu, off.dtype, off.backend) == (False, "float32", "gloo")  # CPU always trains in fp32
    on = resolve(TrainConfig(profile="cpu", use_gpu=True))
    assert (on.use_gpu, on.backend, on.dtype) == (True, "nccl", "float32")  # the cpu profile's dtype is fp32


@pytest.mark.parametrize("argv, use_gpu, zero_stage", [
    ([], True, 2),                                   # no flags: the multi-gpu profile's own choices
    (["--use-gpu", "false"], False, 2),
    (["--use-gpu", "true", "--zero-stage", "0"], True, 0),  # 0 is DDP, not "unset"
    (["--zero-stage", "3"], True, 3),
])
def test_hardware_flags_on_the_command_line(argv, use_gpu, zero_stage):
    cfg = parse_config(TrainConfig, ["--profile", "multi-gpu", *argv])
    cfg.validate()
    r = resolve(cfg, gpus_in_cluster=4)
    assert (r.use_gpu, r.zero_stage) == (use_gpu, zero_stage)
    assert r.dtype == ("bfloat16" if use_gpu else "float32") and r.backend == ("nccl" if use_gpu else "gloo")
    absent = parse_config(TrainConfig, ["--profile", "cpu"])
    assert (absent.use_gpu, absent.zero_stage) == (None, None)
    assert parse_config(TrainConfig, ["--use-gpu", "false"]).use_gpu is False


def test_bad_hardware_flags_are_clear_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--use-gpu", "maybe"])
    assert "argument --use-gpu: use_gpu='maybe' is not a valid bool (true or false)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--zero-stage", "two"])
    assert "zero_stage='two' is not a valid int" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--zero-stage must be 0 \\(DDP\\), 1, 2 or 3"):
        parse_config(TrainConfig, ["--zero-stage", "4"]).validate()
    config = tmp_path / "hw.yaml"
    config.write_text("profile: multi-gpu\nuse_gpu: false\nzero_stage: 0\n")
    cfg = parse_config(TrainConfig, ["--config", str(config)])
    assert (cfg.use_gpu, cfg.zero_stage) == (False, 0) and resolve(cfg, 2).zero_stage == 0
    config.write_text("use_gpu: maybe\n")
    with pytest.raises(ValueError, match="use_gpu='maybe' is not a valid bool"):
        parse_config(TrainConfig, ["--config", str(config)])


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
