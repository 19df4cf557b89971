"""Ray Tune sweeps on CPU: ASHA on tokens seen stops a diverging trial, the report files, the best config
trains, an interrupted sweep resumes, and bad search spaces fail before any trial starts."""
import json
import time
from pathlib import Path

import pytest
import yaml

from cluster.config import TrainConfig
from minimind.configcli import parse_config
from tune import experiments, space
from tune.sweep import run_sweep

TOKENS_PER_STEP = 8 * 1 * 2 * 64  # micro-batch x accumulation x workers x sequence length
ROW = 64


def assert_token_axis(xs: list[int], steps: int, per_step: int = TOKENS_PER_STEP, row: int = ROW) -> None:
    """xs: tokens seen after each of `steps` steps. Packed pretraining rows are full except the last row of
    each tokenised block (the poems are one block per split), so a step counts `per_step` tokens, or fewer
    by less than one row in the one step that drew the short row (which step does depends on the shards)."""
    assert len(xs) == steps
    gaps = [b - a for a, b in zip([0, *xs], xs)]
    assert all(per_step - row < g <= per_step for g in gaps), gaps
    assert sum(g < per_step for g in gaps) <= 1, gaps


@pytest.fixture(scope="module")
def poetry(bundled_corpus) -> Path:
    """The bundled sample twice over (~68k tokens, 1,370 texts)."""
    return bundled_corpus(2)


def base_sets(project_tokenizer, poetry, cache, max_steps, cpus_per_worker=1.0) -> list[str]:
    # 2 workers at 1 CPU + 0.1 for the trial function: one trial at a time fits the 4-CPU test cluster with
    # CPU left for Ray Data, and a 2-CPU group leaked by a stopped trial would leave the next none.
    return ["--set", "preset=tiny", "max_seq_len=64", "batch_size=8", "accumulation_steps=1", "num_workers=2",
            f"cpus_per_worker={cpus_per_worker}", f"max_steps={max_steps}", "log_interval=1", "max_failures=0",
            f"data={poetry}", f"tokenizer={project_tokenizer}", f"cache_dir={cache}"]


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, project_tokenizer, poetry, tmp_path_factory) -> Path:
    """lr 3e-3 runs first (max_concurrent 1, so ASHA has its rung results), then lr 1.0 diverges and is
    stopped, then lr 3.1e-3 must still get the CPUs the stopped trial held (it hung here before). 10% of the
    poems are held out and scored every 2 steps: ASHA and the ranking use that val_loss."""
    tmp = tmp_path_factory.mktemp("sweep")
    return run_sweep(["--stage", "pretrain", "--param", "lr=grid:3e-3,1.0,3.1e-3", "--scheduler", "asha",
                      "--grace-tokens", str(2 * TOKENS_PER_STEP), "--max-concurrent", "1",
                      "--storage-path", str(tmp / "runs"), "--name", "asha",
                      *base_sets(project_tokenizer, poetry, tmp / "cache", max_steps=8), "val_fraction=0.1",
                      "eval_interval=2"])


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_asha_stops_the_diverging_trial_on_tokens(asha_sweep):
    rows = json.loads((asha_sweep / "results.json").read_text())
    by_lr = {r["param.lr"]: r for r in rows}
    good, bad, after = by_lr[3e-3], by_lr[1.0], by_lr[3.1e-3]
    assert good["status"] == "done" and 8 * TOKENS_PER_STEP - ROW < good["tokens"] <= 8 * TOKENS_PER_STEP
    assert bad["status"] == "stopped early" and bad["tokens"] < good["tokens"]
    assert after["status"] == "done" and after["tokens"] == good["tokens"]  # ran after the stopped trial
    assert {good["rank"], after["rank"]} == {1, 2} and "rank" not in bad
    assert good["trial"] == "lr=0.003" and bad["trial"] == "lr=1"  # labelled by parameters
    # Reports reach Tune with the Train metrics, on the tokens axis; val_loss on evaluation steps only.
    steps_x = [t for t, _ in good["curve"]]
    assert_token_axis(steps_x, 8)
    assert steps_x[-1] == good["tokens"]
    assert [t for t, _ in good["val_curve"]] == [steps_x[s - 1] for s in (2, 4, 6, 8)]
    assert json.loads((asha_sweep / "sweep.json").read_text())["metric"] == "val_loss"
    assert good["val_loss_at_compare"] == good["final_val_loss"] == good["val_curve"][-1][1]
    assert bad["val_curve"] and bad["final_val_loss"] > good["final_val_loss"]
    ranked = sorted((r for r in rows if "rank" in r), key=lambda r: r["rank"])
    assert [r["val_loss_at_compare"] for r in ranked] == sorted(r["val_loss_at_compare"] for r in ranked)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_report_files_and_dashboards(asha_sweep):
    for name in ("results.csv", "results.json", "loss_vs_tokens.png", "best_config.yaml", "sweep.json"):
        assert (asha_sweep / name).is_file(), name
    assert (asha_sweep / "loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert len((asha_sweep / "results.csv").read_text().splitlines()) == 4
    trial_dirs = [d for d in asha_sweep.iterdir() if d.name.startswith("pretrain_trial")]
    assert len(trial_dirs) == 3
    for d in trial_dirs:  # Tune's default loggers: CSV, JSON and TensorBoard
        assert (d / "progress.csv").is_file() and list(d.glob("events.out.tfevents*"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_best_config_trains_with_the_stage_cli(asha_sweep, tmp_path):
    from cluster.launcher import launch
    from stages.pretrain import Pretrain
    best = asha_sweep / "best_config.yaml"
    assert yaml.safe_load(best.read_text())["lr"] in (3e-3, 3.1e-3)
    assert "val_loss" in best.read_text().splitlines()[0]
    # Exactly what `python stages/pretrain.py --config best_config.yaml --out ...` parses, run in this process
    # to reuse the test cluster.
    cfg = parse_config(TrainConfig, ["--config", str(best), "--out", str(tmp_path / "out"), "--storage-path",
                                     str(tmp_path / "ray"), "--max-steps", "2"])
    assert cfg.lr in (3e-3, 3.1e-3) and cfg.preset == "tiny" and cfg.cpus_per_worker == 1.0
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
    assert sorted(r["status"] for r in rows) == ["done", "done", "stopped early"]
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
    (["--experiment", "minimind-pretrain", "--trials", "bs80-acc2-nowarm-lr5e-4,nope"],
     "minimind-pretrain has no trial 'nope'; its trials are bs80-acc2-nowarm-lr5e-4, "),
    (["--param", "lr=1e-3", "--trials", "x"], "--trials picks named trials of an --experiment"),
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


# The report on plain records (what Tune hands over, without Tune): status, ranking, labels, plot.

def _run(trial_id, params, steps, per_step=100, finished=True, ended=True, val_every=0, val=None, max_steps=50,
         loss=None):
    from stages.pretrain import PretrainConfig
    records = []
    for s in range(1, steps + 1):
        r = {"step": s, "tokens": s * per_step, "loss": (loss or (lambda s: 5 - s / 10))(s)}
        if val_every and (s % val_every == 0 or s == steps):
            r["val_loss"] = val(s)
        records.append(r)
    from tune.report import TrialRun
    return TrialRun(trial_id=trial_id, params=params, cfg=PretrainConfig(max_steps=max_steps, **params),
                    records=records, finished=finished, ended=ended)


def test_a_trial_that_ran_out_of_data_is_complete_not_stopped_early():
    """The bundled sample gives 24 steps against max_steps 50: the trial finished (its model was exported)."""
    from tune.report import rank, status
    short = _run("a", {"lr": 1e-3}, steps=24, finished=True)
    assert status(short) == "done"
    stopped = _run("b", {"lr": 4e-3}, steps=10, finished=False, ended=True)
    assert status(stopped) == "stopped early"
    assert status(_run("c", {"lr": 2e-3}, steps=50, finished=False)) == "done"          # reached max_steps
    assert status(_run("d", {"lr": 2e-3}, steps=30, finished=False), max_tokens=3000) == "done"  # ASHA's max_t
    assert status(_run("e", {"lr": 2e-3}, steps=7, finished=False, ended=False)) == "interrupted"
    assert status(_run("f", {"lr": 2e-3}, steps=0, finished=False, ended=False)) == "not started"
    rows = rank([short, stopped])
    assert [r["status"] for r in rows] == ["done", "stopped early"]
    assert rows[0]["rank"] == 1 and "rank" not in rows[1]


def test_validation_ranks_on_val_loss_at_equal_tokens_and_labels_by_parameters(tmp_path):
    """Training loss says lr=4e-3 is better; held-out loss says lr=1e-3. The ranking follows val_loss, taken
    at the tokens of the shortest complete trial, and both curves reach the table and the plot."""
    from tune.report import rank, write_rows
    over = _run("t1", {"lr": 4e-3, "warmup": 0.1}, steps=20, val_every=5, val=lambda s: 4.0 + s / 50,
                loss=lambda s: 4 - s / 5)
    good = _run("t2", {"lr": 1e-3, "warmup": 0.1}, steps=20, val_every=5, val=lambda s: 4.5 - s / 20)
    longer = _run("t3", {"lr": 1e-3, "warmup": 0.0}, steps=30, per_step=100, val_every=5, val=lambda s: 4.4 - s / 30)
    rows = rank([over, good, longer], metric="val_loss")
    assert [r["trial"] for r in rows] == ["lr=0.001 warmup=0.1", "lr=0.001 warmup=0", "lr=0.004 warmup=0.1"]
    assert rows[0]["compare_tokens"] == 2000
    assert rows[0]["val_loss_at_compare"] == 4.5 - 20 / 20 and rows[0]["val_tokens"] == 2000
    # t3 ran 30 steps: scored at its last evaluation at or before 2,000 tokens, not its final one.
    assert rows[1]["val_loss_at_compare"] == 4.4 - 20 / 30 and rows[1]["final_val_loss"] == 4.4 - 30 / 30
    assert rows[2]["final_loss"] < rows[0]["final_loss"]  # the training loss alone would pick it
    write_rows(rows, "pretrain", "val_loss", tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[0]["val_curve"] == [[t, v] for t, v in [(500, 4.25), (1000, 4.0), (1500, 3.75), (2000, 3.5)]]
    assert len(saved[0]["curve"]) == 20
    assert "val_loss_at_compare" in (tmp_path / "results.csv").read_text().splitlines()[0]
    best = (tmp_path / "best_config.yaml").read_text()
    assert best.startswith("# Best trial lr=0.001 warmup=0.1 (t2) of a Tune sweep: val_loss 3.5000 at 2,000")
    assert (tmp_path / "loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


# Placement: what a stopped trial leaves behind, and a trial that cannot start.

@pytest.mark.ray
@pytest.mark.timeout(120)
def test_groups_of_dead_actors_are_released_and_the_drivers_own_are_kept(ray_cluster):
    """A Train controller killed with its Tune trial leaves its placement group to the job (ray#54305)."""
    import ray
    from ray.util import placement_group, placement_group_table, remove_placement_group

    from tune.placement import orphaned_groups, release_orphans

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self):
            self.group = placement_group([{"CPU": 1}])
            ray.get(self.group.ready())
            return self.group.id.hex()

    own = placement_group([{"CPU": 0.5}])
    ray.get(own.ready())
    controller = Controller.remote()
    leaked = ray.get(controller.reserve.remote())
    job = ray.get_runtime_context().get_job_id()
    assert orphaned_groups(job) == []  # its creator is alive: in use
    ray.kill(controller)
    for _ in range(50):
        if orphaned_groups(job):
            break
        time.sleep(0.1)
    assert [g.hex() for g in orphaned_groups(job)] == [leaked]
    assert release_orphans() == 1
    assert placement_group_table()[leaked]["state"] == "REMOVED"
    assert placement_group_table(own)["state"] == "CREATED"
    remove_placement_group(own)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_trial_that_cannot_start_stops_the_sweep_with_a_clear_message(ray_cluster, project_tokenizer, poetry,
                                                                        tmp_path, monkeypatch):
    """Something else holds 2.5 of the cluster's 4 CPUs: the trial's 2 workers x 1 CPU never fit. Train
    would retry forever; the sweep stops after START_ATTEMPTS failed starts and frees what it reserved."""
    import ray
    from ray.util import placement_group, remove_placement_group

    from tune.placement import orphaned_groups
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "4")
    blocker = placement_group([{"CPU": 2.5}])
    ray.get(blocker.ready())
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match=rf"could not start: its 2 workers x \{{'CPU': 1.0\}} were not placed "
                                             r"in \d+ tries"):
            run_sweep(["--stage", "pretrain", "--param", "lr=1e-3", "--storage-path", str(tmp_path / "runs"),
                       "--name", "stuck", *base_sets(project_tokenizer, poetry, tmp_path / "cache", max_steps=2)])
    finally:
        remove_placement_group(blocker)
    assert time.monotonic() - start < 150
    assert orphaned_groups(ray.get_runtime_context().get_job_id()) == []
    rows = json.loads((tmp_path / "runs" / "stuck" / "results.json").read_text())
    assert [r["status"] for r in rows] == ["not started"]


def test_concurrency_is_sized_to_the_cluster():
    from tune.sweep import concurrency
    record = {"cpus_per_trial": 2.1, "trial_cpus": 0.1, "gpus_per_trial": 0.0, "max_concurrent": 0}
    assert concurrency(record, {"CPU": 4}) == 1   # README defaults: 2 workers x 1 CPU, one CPU for Ray Data
    assert concurrency(record, {"CPU": 16}) == 7
    with pytest.raises(ValueError, match="--max-concurrent 3: each trial reserves 2.1 CPUs .* at most 1 trial"):
        concurrency({**record, "max_concurrent": 3}, {"CPU": 4})
    with pytest.raises(ValueError, match="no trial fits"):
        concurrency(record, {"CPU": 2})


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_the_minimind_experiment_at_a_tenth_of_its_scale(ray_cluster, project_tokenizer, poetry, tmp_path):
    """`--experiment minimind-pretrain --scale 0.1`, shortened to two of its trials and a budget of 2 steps of
    its reference trial: each trial trains its documented accumulation, warmup and lr with a tenth of the
    micro-batch (80 -> 8) and sequence (512 -> 48) on the tiny model, both on the same number of tokens, so the
    accumulation-2 trial takes twice the steps of the accumulation-4 one."""
    acc2, acc4 = "bs80-acc2-nowarm-lr5e-4", "bs80-acc4-warm0.1-lr5e-4"
    sweep = run_sweep(["--experiment", "minimind-pretrain", "--scale", "0.1", "--trials", f"{acc2},{acc4}",
                       "--budget-steps", "2", "--max-concurrent", "1", "--storage-path", str(tmp_path / "runs"),
                       "--name", "exp", "--set", "num_workers=2", "cpus_per_worker=0.5", "log_interval=1",
                       "max_failures=0", f"data={poetry}", f"tokenizer={project_tokenizer}",
                       f"cache_dir={tmp_path / 'cache'}"])
    rows = {r["trial"]: r for r in json.loads((sweep / "results.json").read_text())}
    assert set(rows) == {acc2, acc4}
    budget = 2 * 8 * 4 * 2 * 48  # reference steps x micro-batch x accumulation x workers x sequence
    assert json.loads((sweep / "sweep.json").read_text())["token_budget"] == budget
    for name, acc, steps, warmup in ((acc2, 2, 4, 0.0), (acc4, 4, 2, 0.1)):
        r = rows[name]
        assert (r["status"], r["steps"], r["effective_batch"]) == ("done", steps, 8 * acc * 2)
        assert budget - 48 < r["tokens"] <= budget  # the poems' one short packed row may fall in a trial
        assert (r["param.batch_size"], r["param.accumulation_steps"], r["param.warmup"], r["param.lr"]) == (
            8, acc, warmup, 5e-4)


@pytest.mark.timeout(600)
def test_an_interrupted_sweep_resumes_where_it_stopped(project_tokenizer, poetry, tmp_path):
    """The sweep's driver is killed (SIGKILL, its whole process tree: its embedded cluster too) while its
    second trial trains; --resume keeps the finished trial as it is, resumes the second from its last
    checkpoint, and writes the report and best_config.yaml."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, str(repo / "tune" / "sweep.py"), "--stage", "pretrain", "--param", "lr=grid:1e-3,3e-3",
            "--max-concurrent", "1", "--storage-path", str(tmp_path / "runs"), "--name", "cut",
            *base_sets(project_tokenizer, poetry, tmp_path / "cache", max_steps=6, cpus_per_worker=0.5),
            "save_interval=2", "keep_checkpoints=2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "__RAY_"))}  # its own cluster
    sweep = tmp_path / "runs" / "cut"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while True:  # the first trial done, the second with a checkpoint: then the power goes
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            done = list((sweep / "models").glob("*/trainer_state.json")) if (sweep / "models").is_dir() else []
            started = [d for d in (sweep / "train").iterdir() if d.is_dir()] if (sweep / "train").is_dir() else []
            second = [d for d in started if not (sweep / "models" / d.name / "trainer_state.json").exists()]
            if len(done) == 1 and second and (second[0] / "latest").is_file():  # a published checkpoint
                break
            time.sleep(0.2)
    finally:
        tree = [proc] + [psutil.Process(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    first_trial = done[0].parent.name
    finished_at = done[0].stat().st_mtime_ns
    assert not (sweep / "best_config.yaml").exists()

    again = subprocess.run(argv[:2] + ["--resume", "--storage-path", str(tmp_path / "runs"), "--name", "cut"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    rows = json.loads((sweep / "results.json").read_text())
    assert sorted(r["status"] for r in rows) == ["done", "done"]
    assert (sweep / "best_config.yaml").is_file()
    assert (sweep / "models" / first_trial / "trainer_state.json").stat().st_mtime_ns == finished_at  # not rerun
    resumed = json.loads((sweep / "models" / second[0].name / "trainer_state.json").read_text())
    assert resumed["step"] == 6 and resumed["restored_from"], resumed  # from its checkpoint, not step 0
