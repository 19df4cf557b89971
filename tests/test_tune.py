"""Ray Tune sweeps on CPU: ASHA on tokens seen stops a diverging trial, the report files, the best config
trains, an interrupted sweep resumes, and bad search spaces fail before any trial starts."""
import gzip
import itertools
import json
from pathlib import Path

import pytest
import yaml

from cluster.config import TrainConfig
from minimind.configcli import parse_config
from tune import experiments, space
from tune.sweep import run_sweep

TOKENS_PER_STEP = 8 * 1 * 2 * 64  # micro-batch x accumulation x workers x sequence length


@pytest.fixture(scope="module")
def poetry(shared_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("poetry") / "poems.jsonl"
    with gzip.open(shared_data / "poetry" / "poems.train.jsonl.gz", "rt", encoding="utf-8") as src:
        path.write_text("".join(itertools.islice(src, 2000)), encoding="utf-8")
    return path


def base_sets(shared_data, poetry, cache, max_steps) -> list[str]:
    # 2 workers at 0.5 CPU + 0.1 for the trial function: one trial at a time fits the 4-CPU test cluster
    # with CPU left for Ray Data.
    return ["--set", "preset=tiny", "max_seq_len=64", "batch_size=8", "accumulation_steps=1", "num_workers=2",
            "cpus_per_worker=0.5", f"max_steps={max_steps}", "log_interval=1", "max_failures=0",
            f"data={poetry}", f"tokenizer={shared_data / 'minimind'}", f"cache_dir={cache}"]


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, shared_data, poetry, tmp_path_factory) -> Path:
    """lr 3e-3 runs first (max_concurrent 1, so ASHA has its rung results), then lr 1.0 diverges."""
    tmp = tmp_path_factory.mktemp("sweep")
    return run_sweep(["--stage", "pretrain", "--param", "lr=grid:3e-3,1.0", "--scheduler", "asha",
                      "--grace-tokens", str(2 * TOKENS_PER_STEP), "--max-concurrent", "1",
                      "--storage-path", str(tmp / "runs"), "--name", "asha",
                      *base_sets(shared_data, poetry, tmp / "cache", max_steps=8)])


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_asha_stops_the_diverging_trial_on_tokens(asha_sweep):
    rows = json.loads((asha_sweep / "results.json").read_text())
    by_lr = {r["param.lr"]: r for r in rows}
    good, bad = by_lr[3e-3], by_lr[1.0]
    assert good["status"] == "done" and good["tokens"] == 8 * TOKENS_PER_STEP
    assert bad["status"] == "stopped early" and bad["tokens"] < good["tokens"]
    assert good["rank"] == 1 and "rank" not in bad
    # Reports reach Tune with the Train metrics, on the tokens axis.
    assert [t for t, _ in good["curve"]] == [TOKENS_PER_STEP * s for s in range(1, 9)]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_report_files_and_dashboards(asha_sweep):
    for name in ("results.csv", "results.json", "loss_vs_tokens.png", "best_config.yaml", "sweep.json"):
        assert (asha_sweep / name).is_file(), name
    assert (asha_sweep / "loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert len((asha_sweep / "results.csv").read_text().splitlines()) == 3
    trial_dirs = [d for d in asha_sweep.iterdir() if d.name.startswith("pretrain_trial")]
    assert len(trial_dirs) == 2
    for d in trial_dirs:  # Tune's default loggers: CSV, JSON and TensorBoard
        assert (d / "progress.csv").is_file() and list(d.glob("events.out.tfevents*"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_best_config_trains_with_the_stage_cli(asha_sweep, tmp_path):
    from cluster.launcher import launch
    from stages.pretrain import Pretrain
    best = asha_sweep / "best_config.yaml"
    assert yaml.safe_load(best.read_text())["lr"] == 3e-3
    # Exactly what `python stages/pretrain.py --config best_config.yaml --out ...` parses, run in this process
    # to reuse the test cluster.
    cfg = parse_config(TrainConfig, ["--config", str(best), "--out", str(tmp_path / "out"), "--storage-path",
                                     str(tmp_path / "ray"), "--max-steps", "2"])
    assert cfg.lr == 3e-3 and cfg.preset == "tiny" and cfg.cpus_per_worker == 0.5
    out = launch(cfg, Pretrain())
    assert (out / "model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_resume_restores_the_sweep_without_rerunning_trials(asha_sweep):
    """--resume goes through Tuner.restore; on a finished sweep no trial runs again and the report is rebuilt.
    (An interrupted sweep resumes the same way: unfinished trials rerun, their Train runs restarting from
    their last checkpoints. Interrupting a driver cleanly inside one pytest process is not possible: Tune
    swallows callback errors.)"""
    before = sorted(p.name for p in (asha_sweep / "train").iterdir())
    (asha_sweep / "results.json").unlink()
    run_sweep(["--resume", "--storage-path", str(asha_sweep.parent), "--name", asha_sweep.name])
    assert sorted(p.name for p in (asha_sweep / "train").iterdir()) == before
    rows = json.loads((asha_sweep / "results.json").read_text())
    assert sorted(r["status"] for r in rows) == ["done", "stopped early"]
    with pytest.raises(ValueError, match="pass --resume"):
        run_sweep(["--stage", "pretrain", "--param", "lr=1e-3", "--storage-path", str(asha_sweep.parent),
                   "--name", asha_sweep.name])


# Bad input: no Ray needed, nothing written.

@pytest.mark.parametrize("argv,message", [
    (["--param", "lrr=grid:1e-3,2e-3"], "unknown field 'lrr'"),
    (["--param", "lr=grid:"], "empty grid"),
    (["--param", "batch_size=grid:8,x"], "batch_size='x' is not a valid int"),
    (["--param", "lr=loguniform:1e-2,1e-3"], "LOW < HIGH"),
    (["--param", "out=grid:a,b"], "set per trial"),
    (["--param", "lr=grid:-1,1e-3"], "--lr must be > 0"),
    (["--set", "nope=1", "--param", "lr=1e-3"], "--set 'nope=1'"),
    ([], "nothing to sweep"),
    (["--stage", "nosuchstage", "--param", "lr=1e-3"], "unknown stage"),
])
def test_bad_input_fails_before_trials(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        run_sweep([*argv, "--storage-path", str(tmp_path / "runs"), "--name", "bad"])
    assert not (tmp_path / "runs").exists()


def test_yaml_space_validates_names_and_grids(tmp_path):
    from stages.sft import SFTConfig
    good = tmp_path / "space.yaml"
    good.write_text("lr: {loguniform: [1e-6, 1e-4]}\nbatch_size: [8, 16]\nwarmup: 0.03\n")
    parsed = space.parse_space(SFTConfig, good)
    assert parsed["lr"] == space.Param("loguniform", (1e-6, 1e-4))
    assert parsed["batch_size"].kind == "grid" and parsed["warmup"].values == (0.03,)
    assert space.grid_size(parsed) == 2
    (tmp_path / "empty.yaml").write_text("accumulation_steps: {grid: []}\n")
    with pytest.raises(ValueError, match="empty grid"):
        space.parse_space(SFTConfig, tmp_path / "empty.yaml")
    (tmp_path / "typo.yaml").write_text("learning_rate: [1e-3]\n")
    with pytest.raises(ValueError, match="unknown field 'learning_rate' for SFTConfig"):
        space.parse_space(SFTConfig, tmp_path / "typo.yaml")


def test_experiment_scaling_keeps_ratios():
    exp = experiments.get_experiment("minimind-pretrain")
    full, small = experiments.scaled_trials(exp, 1.0), experiments.scaled_trials(exp, 0.1)
    assert full["bs80-acc2-nowarm-lr5e-4"] == {"batch_size": 80, "accumulation_steps": 2, "warmup": 0.0,
                                               "lr": 5e-4}
    assert small["bs80-acc4-warm0.1-lr5e-5"] == {"batch_size": 8, "accumulation_steps": 4, "warmup": 0.1,
                                                 "lr": 5e-5}
    assert experiments.scaled_base(exp, 0.1) == {"preset": "tiny", "max_seq_len": 48}
    assert len(full) == 7
