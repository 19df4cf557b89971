"""Ray Tune sweeps over any stage's trainer: grid, random and ASHA searches, compared at equal tokens seen.

    python tune/sweep.py --stage pretrain --param lr=grid:1e-3,3e-3 --param batch_size=grid:8,16 \\
        --set preset=tiny max_seq_len=64 max_steps=20 cpus_per_worker=0.5
    python tune/sweep.py --stage pretrain --space space.yaml --search random --num-samples 8 --scheduler asha
    python tune/sweep.py --experiment minimind-pretrain --scale 0.1 --set cpus_per_worker=0.5
    python tune/sweep.py --name NAME --resume                      # continue an interrupted sweep

Each trial is a TorchTrainer with its own workers (see tune/trial.py). ASHA's clock is `tokens`, the tokens
seen by all of a trial's workers, so trials with different effective batches are compared at equal data.
Outputs land in STORAGE/NAME: Tune's per-trial logs (progress.csv, result.json, TensorBoard events),
results.csv/json, loss_vs_tokens.png and best_config.yaml (accepted by `stages/<stage>.py --config`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import typing
from pathlib import Path

from minimind.configcli import coerce, read_config_file
from tune import experiments, space as spaces
from tune.placement import DATA_CPUS, START_TIMEOUT_ENV, StopWhenStuck, release_orphans, start_keeper, trials_that_fit
from tune.trial import (TRIAL_KEY, absolute_paths, load_stage, make_trainable, tokens_per_step, trial_config,
                        workers)

SWEEP_FILE = "sweep.json"   # what a resumed sweep needs to rebuild its trainable
CPU_BUDGET_STEPS = 30       # a scaled-down experiment's token budget, in steps of its reference trial


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune/sweep.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("what to sweep")
    what.add_argument("--stage", default="pretrain", help="stages/<stage>.py whose trainer each trial runs")
    what.add_argument("--space", metavar="FILE", help="YAML search space (see tune/space.py)")
    what.add_argument("--param", action="append", default=[], metavar="NAME=KIND:V1,V2",
                      help="a search dimension: grid|choice|uniform|loguniform, or NAME=VALUE (repeatable)")
    what.add_argument("--experiment", choices=sorted(experiments.EXPERIMENTS),
                      help="a built-in experiment of named trials (its stage replaces --stage)")
    what.add_argument("--scale", type=float, default=1.0,
                      help="shrink the experiment's micro-batches and sequence length by this factor (tiny "
                           "model below 1) keeping the ratios between trials")
    what.add_argument("--trials", default="", metavar="NAME,...",
                      help="with --experiment: run only these of its named trials (the token budget is still set "
                           "by its reference trial, so they compare with a full run's)")
    what.add_argument("--config", metavar="FILE", help="base stage config (JSON/YAML) every trial starts from")
    what.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                      help="base config overrides, e.g. max_steps=20 preset=tiny")
    what.add_argument("--token-budget", type=int, default=None,
                      help="tokens every trial trains on (max_steps derived per trial); default: none for "
                           "sweeps, --budget-steps of the reference trial for experiments")
    what.add_argument("--budget-steps", type=int, default=None,
                      help=f"experiment budget in steps of its reference trial (default: {CPU_BUDGET_STEPS} "
                           "when --scale < 1, else one epoch)")
    how = p.add_argument_group("how to search")
    how.add_argument("--search", choices=["grid", "random"], default="grid",
                     help="grid: every grid point; random: draw num-samples trials, grids as choices")
    how.add_argument("--num-samples", type=int, default=1, help="samples (per grid point, for grid search)")
    how.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo")
    how.add_argument("--grace-tokens", type=int, default=None,
                     help="ASHA: tokens before a trial can be stopped (default: max tokens / 8)")
    how.add_argument("--max-tokens", type=int, default=None,
                     help="ASHA: tokens at which trials end (default: the token budget, or the largest "
                          "max_steps x effective batch)")
    how.add_argument("--reduction-factor", type=float, default=2, help="ASHA: keep the best 1/RF at each rung")
    res = p.add_argument_group("resources and outputs")
    res.add_argument("--max-concurrent", type=int, default=0,
                     help="trials at once (each is a TorchTrainer with its own workers); 0: as many as the "
                          "cluster's CPUs hold, keeping one for Ray Data")
    res.add_argument("--trial-cpus", type=float, default=0.1,
                     help="CPU of the trial's driver function; the Train workers reserve their own")
    res.add_argument("--gpus-per-trial", type=float, default=0.0,
                     help="GPU share per trial (fractional: 0.25 packs four trials on a GPU)")
    res.add_argument("--storage-path", default="runs/tune", help="where sweeps are written")
    res.add_argument("--name", default="", help="sweep name ('' = STAGE-sweep-TIMESTAMP)")
    res.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name")
    res.add_argument("--wandb", action="store_true", help="log every trial to wandb (WANDB_MODE=offline works)")
    res.add_argument("--wandb-project", default="minimind-ray-tune")
    res.add_argument("--dashboard", action="store_true",
                     help="start the local Ray cluster with its dashboard (http://127.0.0.1:8265, the next free "
                          "port if taken)")
    res.add_argument("--linger", type=float, default=0, metavar="SECONDS",
                     help="with --dashboard: keep the cluster and its dashboard up this long after the sweep "
                          "(they end with this process; Ctrl-C ends it sooner)")
    return p


def parse_sets(config_cls, sets) -> dict:
    types = spaces.field_types(config_cls)
    out = {}
    for text in sets:
        key, sep, value = text.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"--set {text!r}: expected KEY=VALUE with KEY a field of {config_cls.__name__}")
        is_list = typing.get_origin(types[key]) is tuple  # e.g. data=a.jsonl,b.jsonl
        out[key] = spaces._convert(key, types[key], value.split(",") if is_list else value)
    return out


def base_config(config_cls, defaults: dict, config_file, sets):
    """Stage defaults < the experiment's scale < --config FILE < --set."""
    values = dict(defaults)
    if config_file:
        values.update(read_config_file(config_file, config_cls))
    values.update(parse_sets(config_cls, sets))
    cfg = absolute_paths(config_cls(**coerce(config_cls, values)))
    cfg.validate()
    return cfg


def check_values(base, space: dict, named_trials: dict) -> None:
    """Every value a trial could take must make a valid config: fail now, not in trial 7."""
    for name, param in space.items():
        if param.kind in ("grid", "choice", "const"):
            for v in param.values:
                base.replace(**{name: v}).validate()
    for name, params in named_trials.items():
        base.replace(**params).validate()


def candidates(base, space, named_trials) -> list:
    """Configs covering every listed value of the fields that size a trial (grids and choices)."""
    out = [base.replace(**t) for t in named_trials.values()] or [base]
    for name in ("batch_size", "accumulation_steps", "max_seq_len", "num_workers", "cpus_per_worker",
                 "eval_interval"):
        if name in space and space[name].kind in ("grid", "choice", "const"):
            out = [c.replace(**{name: v}) for c in out for v in space[name].values]
    return out


def asha_limits(args, base, space, named_trials, budget) -> tuple[int, int]:
    configs = candidates(base, space, named_trials)
    max_t = args.max_tokens or budget
    if not max_t and base.max_steps:
        # The largest effective batch any listed value gives, times the step limit.
        max_t = base.max_steps * max(tokens_per_step(c) for c in configs)
    if not max_t:
        raise ValueError("--scheduler asha needs --max-tokens, --token-budget or a base max_steps")
    grace = args.grace_tokens or max(1, max_t // 8)
    if base.validates:
        # ASHA ranks on val_loss, which only evaluation records carry: no trial may reach a rung unscored.
        if any(not c.eval_interval for c in configs):
            raise ValueError("--scheduler asha with validation ranks trials on val_loss: set eval_interval "
                             "(--set eval_interval=N) so trials are scored before they end")
        first_eval = max(c.eval_interval * tokens_per_step(c) for c in configs)
        grace = args.grace_tokens or max(grace, first_eval)
    return max_t, grace


def init_cluster(dashboard: bool):
    from cluster.runtime import init_ray
    ray = init_ray(include_dashboard=dashboard)
    if dashboard:
        from ray._private.worker import get_dashboard_url
        print(f"Ray dashboard: http://{get_dashboard_url()}", flush=True)
    return ray


def linger(seconds: float) -> None:
    import signal
    print(f"the dashboard stays up {seconds:g} s (Ctrl-C ends it)", flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Tune's own handler outlives the sweep
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass


def callbacks(args) -> list:
    # CSV, JSON and TensorBoard (tensorboardX) loggers are Tune's defaults, added to every trial's directory.
    from tune.placement import ReleaseOrphans
    if not args.wandb:
        return [ReleaseOrphans()]
    from ray.air.integrations.wandb import WandbLoggerCallback
    return [ReleaseOrphans(), WandbLoggerCallback(project=args.wandb_project)]


def new_sweep(args, sweep_dir: Path) -> dict:
    """Validate everything, write sweep.json and return the sweep's record."""
    named, defaults, budget = {}, {}, args.token_budget or 0
    stage_name = args.stage
    if args.experiment:
        exp = experiments.get_experiment(args.experiment)
        stage_name, named = exp.stage, experiments.scaled_trials(exp, args.scale)
        defaults = experiments.scaled_base(exp, args.scale)
    stage = load_stage(stage_name)
    space = spaces.parse_space(stage.config_cls, args.space, args.param)
    if not space and not named:
        raise ValueError("nothing to sweep: give --param, --space or --experiment")
    base = base_config(stage.config_cls, defaults, args.config, args.set)
    check_values(base, space, named)
    if args.max_concurrent < 0:
        raise ValueError("--max-concurrent must be >= 0 (0: as many as the cluster holds)")
    if args.experiment and not budget:
        steps = args.budget_steps if args.budget_steps is not None else (CPU_BUDGET_STEPS if args.scale < 1
                                                                          else exp.budget_steps)
        budget = steps * tokens_per_step(base.replace(**named[exp.budget_ref]))
    named = pick_trials(named, args.trials, args.experiment)
    if args.gpus_per_trial:  # fail now if the launcher cannot share GPUs
        trial_config(base, {}, sweep_dir, "check", budget, args.gpus_per_trial)
    max_t, grace = asha_limits(args, base, space, named, budget) if args.scheduler == "asha" else (0, 0)
    configs = candidates(base, space, named)
    record = {"stage": stage_name, "base": dataclasses.asdict(base), "named_trials": named,
              "token_budget": budget, "gpus_per_trial": args.gpus_per_trial, "trial_cpus": args.trial_cpus,
              "scheduler": args.scheduler, "search": args.search, "num_samples": args.num_samples,
              "max_tokens": max_t, "grace_tokens": grace, "reduction_factor": args.reduction_factor,
              "max_concurrent": args.max_concurrent, "metric": metric_of(base),
              # What one trial reserves: its function's CPU plus its Train workers' (the largest listed).
              "cpus_per_trial": args.trial_cpus + max(workers(c) * c.cpus_per_worker for c in configs),
              "space": {k: dataclasses.asdict(v) for k, v in space.items()}}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def pick_trials(named: dict, wanted: str, experiment: str | None) -> dict:
    """The named trials --trials keeps (all when it is empty), in the order given."""
    if not wanted:
        return named
    if not experiment:
        raise ValueError("--trials picks named trials of an --experiment; give --experiment")
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise ValueError(f"--trials {wanted!r}: {experiment} has no trial {unknown[0] if unknown else ''!r}; "
                         f"its trials are {', '.join(named)}")
    return {n: named[n] for n in dict.fromkeys(names)}


def metric_of(base) -> str:
    """What trials are ranked and stopped on: held-out loss when the stage validates, else training loss."""
    return "val_loss" if base.validates else "loss"


def concurrency(record, cluster: dict) -> int:
    """Trials at once: what was asked, checked against what the cluster holds (Train waits forever for
    workers it cannot place, and Ray Data deadlocks without a free CPU)."""
    per_trial, gpus = record["cpus_per_trial"], record["gpus_per_trial"]
    fits = trials_that_fit(cluster, per_trial, gpus)
    what = (f"each trial reserves {per_trial:g} CPUs ({record['trial_cpus']:g} for its function, the rest for its "
            f"Train workers) and the cluster has {cluster.get('CPU', 0):g}, {DATA_CPUS:g} kept for Ray Data")
    if fits < 1:
        raise ValueError(f"no trial fits: {what}; lower --set cpus_per_worker=... or num_workers=...")
    asked = record["max_concurrent"]
    if asked > fits:
        raise ValueError(f"--max-concurrent {asked}: {what}, so at most {fits} trial(s) fit at once")
    return asked or fits


def build_tuner(record, sweep_dir: Path, args, cluster: dict):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    if record["scheduler"] == "asha":
        scheduler = ASHAScheduler(time_attr="tokens", max_t=record["max_tokens"],
                                  grace_period=record["grace_tokens"],
                                  reduction_factor=record["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    param_space = spaces.to_tune({k: spaces.Param(v["kind"], tuple(v["values"])) for k, v in record["space"].items()},
                                 record["search"])
    if record["named_trials"]:
        param_space[TRIAL_KEY] = tune.grid_search(list(record["named_trials"]))
    trainable = tune.with_resources(trainable_of(record, sweep_dir), trial_resources(record))
    max_concurrent = concurrency(record, cluster)
    print(f"sweep: up to {max_concurrent} trial(s) at once, {record['cpus_per_trial']:g} CPUs each; ranked on "
          f"{record['metric']}", flush=True)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=record["metric"], mode="min", scheduler=scheduler,
                                    num_samples=record["num_samples"], max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent),
                                  callbacks=callbacks(args), stop=StopWhenStuck(keeper_name(sweep_dir))))


def trial_resources(record) -> dict:
    # The trial function only waits on its TorchTrainer, whose workers reserve their own CPUs (and GPUs).
    return {"CPU": record["trial_cpus"]}


def base_of(record):
    cls = load_stage(record["stage"]).config_cls
    return cls(**coerce(cls, record["base"]))


def trainable_of(record, sweep_dir: Path):
    return make_trainable(record["stage"], base_of(record), record["named_trials"], sweep_dir,
                          record["token_budget"], record["gpus_per_trial"], keeper_name(sweep_dir),
                          os.environ.get(START_TIMEOUT_ENV, ""))


def keeper_name(sweep_dir: Path) -> str:
    # The same across --resume: Tune restores its stopper from its own pickle, name included.
    return "trial-starts-" + hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:12]


def restore_sweep(sweep_dir: Path):
    from ray import tune
    if not (sweep_dir / SWEEP_FILE).is_file() or not tune.Tuner.can_restore(str(sweep_dir)):
        raise ValueError(f"--resume: {sweep_dir} holds no sweep to resume")
    record = json.loads((sweep_dir / SWEEP_FILE).read_text())
    trainable = tune.with_resources(trainable_of(record, sweep_dir), trial_resources(record))
    # Finished trials keep their results; unfinished and errored ones run again, their Train runs
    # resuming from their last checkpoints (the Train run is named after the trial).
    # Tuner.restore unpickles the sweep's own tuner.pkl / experiment state (Ray has no other format for them):
    # --resume only a sweep directory this user's own sweep wrote, never one handed over by someone else.
    return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True), record


def run_sweep(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    name = args.name or f"{args.experiment or args.stage}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = Path(args.storage_path).resolve() / name
    if args.resume:
        if not (sweep_dir / SWEEP_FILE).is_file():
            raise ValueError(f"--resume: {sweep_dir} holds no sweep to resume")
    elif sweep_dir.exists():
        raise ValueError(f"{sweep_dir} exists: pass --resume to continue that sweep, or another --name")
    else:
        record = new_sweep(args, sweep_dir)  # all validation that needs no cluster happens here
    ray = init_cluster(args.dashboard)
    cluster = ray.cluster_resources()
    keeper = start_keeper(keeper_name(sweep_dir))
    if args.resume:
        tuner, record = restore_sweep(sweep_dir)
    else:
        tuner = build_tuner(record, sweep_dir, args, cluster)
    if record["metric"] == "val_loss":
        # Only evaluation steps carry val_loss. Tune refuses results without the ranking metric unless told
        # otherwise; ASHA skips them (see its on_trial_result), so it decides on measured values only, at
        # the first evaluation at or past each rung, and Tune's curves keep every training-loss report.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    results = tuner.fit()
    for _ in range(3):  # what trials stopped in the last steps left: their controllers die just after
        release_orphans()
        time.sleep(1)
    stuck = ray.get(keeper.stuck.remote())
    from tune.report import write_report
    write_report(results, record, base_of(record), sweep_dir)
    if stuck:
        raise ValueError(StopWhenStuck.describe(stuck[0], cluster))
    if args.dashboard and args.linger > 0:
        linger(args.linger)
    return sweep_dir


def main(argv=None):
    try:
        sweep_dir = run_sweep(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"done: sweep results in {sweep_dir}")


if __name__ == "__main__":
    main()
