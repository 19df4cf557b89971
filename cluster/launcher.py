"""Launching a stage on Ray Train: the only module that touches TorchTrainer, `ray.train.report` and
`Checkpoint`.

The driver resolves the profile, checks the cluster can host the workers, tokenises the data once (a
cached Parquet dataset), runs a `TorchTrainer` whose workers call the plain loop in `cluster.loop`, and
finally copies the last checkpoint's model directory and metrics log to `--out`.
"""
from __future__ import annotations

import errno
import json
import math
import os
import posixpath
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from minimind.config import get_preset

from .config import Resolved, TrainConfig, resolve
from .runtime import init_ray


def resolve_tokenizer(cfg: TrainConfig):
    """(tokenizer, where it came from): --tokenizer, else the --init checkpoint's, else the one trained on the
    bundled sample corpus. Never a file outside the project and the user's flags: a run must not change with
    what happens to lie beside the checkout (a Ray job's working-dir copy has nothing beside it)."""
    from minimind.tokenizer import Tokenizer
    if cfg.tokenizer:
        p = Path(cfg.tokenizer)
        if not p.exists():
            raise ValueError(f"--tokenizer {p}: no such file or directory")
        return (Tokenizer.from_dir(p) if p.is_dir() else Tokenizer.from_file(p)), str(p)
    if cfg.init and (Path(cfg.init) / "tokenizer.json").is_file():
        return Tokenizer.from_dir(cfg.init), f"{cfg.init} (--init)"
    from minimind.__main__ import default_tokenizer
    return default_tokenizer(), "trained on the bundled sample corpus (give --tokenizer for your own)"


def data_spec(cfg: TrainConfig, stage, paths=None, **extra):
    from .ingest import DataSpec
    return DataSpec(paths=tuple(paths or cfg.data), format=stage.data_format, max_seq_len=cfg.max_seq_len,
                    pack=cfg.pack, text_field=cfg.text_field, seed=cfg.seed, **extra)


def prepare_data(cfg: TrainConfig, stage, tokenizer, cache: str):
    """(train, validation or None) as prepared caches: --val-data is prepared on its own; --val-fraction
    splits --data by document hash at prepare time, so no training row holds a held-out document."""
    from .ingest import prepare_dataset, prepare_splits
    if cfg.val_fraction:
        return prepare_splits(data_spec(cfg, stage, val_fraction=cfg.val_fraction), tokenizer, cache)
    train = prepare_dataset(data_spec(cfg, stage), tokenizer, cache)
    val = prepare_dataset(data_spec(cfg, stage, paths=cfg.val_data), tokenizer, cache) if cfg.val_data else None
    return train, val


def default_dirs(cfg: TrainConfig) -> tuple[str, str]:
    base = Path(cfg.out).resolve().parent
    storage = cfg.storage_path or str(base / "ray_results")
    cache = cfg.cache_dir or str(base / "data_cache")
    return storage, cache


def check_cluster(res: Resolved, cfg: TrainConfig, ray) -> None:
    """Fail before any work when the cluster cannot host the workers (Ray would wait forever)."""
    total = ray.cluster_resources()
    need_cpu = res.num_workers * cfg.cpus_per_worker
    if res.use_gpu and total.get("GPU", 0) < res.num_workers * cfg.gpus_per_worker:
        raise ValueError(f"profile {cfg.profile} wants {res.num_workers} GPU workers; the Ray cluster has "
                         f"{int(total.get('GPU', 0))} GPUs (use --num-workers, or --profile cpu)")
    # Ray Data needs CPU left over to feed the workers, or ingest deadlocks.
    if need_cpu >= total.get("CPU", 0):
        raise ValueError(f"{res.num_workers} workers x {cfg.cpus_per_worker} CPU leave no CPU for Ray Data on "
                         f"a cluster of {total.get('CPU', 0):g} CPUs; lower --num-workers or --cpus-per-worker")


class RayContext:
    """What the loop needs from a Ray Train worker."""

    def __init__(self, cfg: TrainConfig, res: Resolved, tokenizer, micro_per_epoch: int, run_name: str,
                 val=None):
        import ray.train
        tc = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = tc.get_world_rank(), tc.get_world_size(), tc.get_local_rank()
        self.resolved, self.tokenizer, self.run_name = res, tokenizer, run_name
        self.micro_batches_per_epoch = micro_per_epoch
        self.cfg, self.val = cfg, val
        if res.use_gpu:
            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.scratch_dir = tempfile.mkdtemp(prefix="minimind-")
        import logging

        import ray.data

        from .ingest import quiet_ray_data
        quiet_ray_data(ray.data.DataContext.get_current())  # per-epoch bars and "Starting execution" lines
        try:  # a "Reporting training result N: TrainingReport(...)" line per report; the progress line says it
            from ray.train.v2._internal.execution import context as train_context
            logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # Ray names it by file path
        except ImportError:
            pass

    def print(self, msg: str):
        # Not print(): Ray Train patches print in its workers to log the message *and* tee it to stdout, and the
        # driver shows both, so every progress line came out twice. Stdout alone reaches the driver once.
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()

    def restore_dir(self) -> Path | None:
        import ray.train
        ckpt = ray.train.get_checkpoint()  # set after a worker failure: the last reported checkpoint
        if ckpt is not None:
            local = Path(self.scratch_dir) / "restore"
            return Path(ckpt.to_directory(str(local)))
        return Path(self.cfg.resume) if self.cfg.resume else None

    def has_validation(self) -> bool:
        return self.val is not None

    def val_batches(self):
        from .shards import iter_eval_batches
        return iter_eval_batches(self.val, self.cfg.batch_size, self.rank, self.world_size, self.device)

    def char_counts(self):
        return torch.from_numpy(self.tokenizer.token_char_counts()).to(self.device)

    def batches(self, start_micro_batch: int):
        from .shards import iter_train_batches
        return iter_train_batches(self.cfg.batch_size, epochs=self.cfg.epochs, seed=self.cfg.seed,
                                  skip_batches=start_micro_batch, device=self.device)

    def report(self, metrics: dict, write_checkpoint=None):
        import ray.train
        if write_checkpoint is None:
            ray.train.report(metrics)
            return
        from .publish import publish_latest, write_verified
        with tempfile.TemporaryDirectory(dir=self.scratch_dir) as d:
            # Write, then read every file back before Ray sees it: a crash or short write raises here, so
            # Ray never registers (or restores from) a torn checkpoint.
            has_files = write_verified(Path(d), write_checkpoint, self.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)
        # Each rank's report returns once its own upload is stored; after this barrier every shard is, and
        # only then may `latest` name the checkpoint.
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        if self.rank == 0:
            ckpt = ray.train.get_checkpoint()  # the checkpoint just persisted
            publish_latest(posixpath.dirname(ckpt.path), ckpt.path, metrics["step"], ckpt.filesystem)


class FatalError(RuntimeError):
    """A worker error that a retry cannot cure (a configuration error, a full disk): the run stops at once
    instead of restarting its workers max_failures times."""


def _fatal(e: BaseException) -> FatalError | None:
    if isinstance(e, (ValueError, FileNotFoundError)):
        return FatalError(str(e).splitlines()[0] if str(e) else type(e).__name__)
    # pyarrow's file systems (Ray's checkpoint upload) raise OSError without an errno, naming it in words.
    if isinstance(e, OSError) and (e.errno == errno.ENOSPC or "No space left on device" in str(e)):
        return FatalError(f"no space left on the device writing {e.filename or 'a checkpoint'}: free space or "
                          f"point --storage-path elsewhere")
    return None


def _worker(config: dict):
    from .loop import train
    try:
        ctx = RayContext(config["cfg"], config["res"], config["tokenizer"], config["micro_per_epoch"],
                         config["run_name"], config["val"])
        train(config["cfg"], config["stage"], ctx)
    except Exception as e:
        fatal = _fatal(e)
        if fatal is None:
            raise
        raise fatal from e


def _fatal_in(error: BaseException) -> FatalError | None:
    """The FatalError a worker raised, if any, inside Ray Train's wrapping."""
    for failure in getattr(error, "worker_failures", {}).values():
        for e in (failure, getattr(failure, "cause", None), getattr(failure, "__cause__", None)):
            if isinstance(e, FatalError):
                return e
            if e is not None and type(e).__name__ == "FatalError":  # deserialised across processes
                return e
    return None


def _failure_policy(failure_config):
    """Ray Train's default policy, except that a FatalError from any worker is raised, not retried."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

    class FatalAwarePolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if _fatal_in(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)
    return FatalAwarePolicy(failure_config)


def _trainer_class():
    """TorchTrainer with the fatal-aware failure policy. Ray Train offers no public hook for the policy; the
    one private method it is passed through is overridden here, in the only module that knows Train."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs):
            kwargs["failure_policy"] = _failure_policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if os.environ.get("RAY_ADDRESS"):
                return callbacks
            # On the embedded cluster (started without the dashboard, to spare 2 cores ~1 GiB and 11
            # processes) the cleaner's state-API query fails every second and logged 403 warnings in a 7-minute
            # run. Its job, removing a dead controller's placement group, is done here by the cluster's own
            # shutdown with this process.
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]
    return Trainer


def export_result(checkpoint_dir: Path, out: Path) -> Path:
    """Copy the final model directory and metrics log to --out, replacing it only once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(checkpoint_dir / "model", tmp)
    shutil.copy2(checkpoint_dir / "metrics.jsonl", tmp / "metrics.jsonl")
    shutil.copy2(checkpoint_dir / "trainer_state.json", tmp / "trainer_state.json")
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def check_resume(cfg: TrainConfig, stage) -> None:
    """A --resume checkpoint must hold the model this run builds: say "preset mismatch" in the driver, not
    a list of missing tensors from every worker."""
    if not cfg.resume:
        return
    from minimind.checkpoint import load_config
    model_dir = Path(cfg.resume) / "model"
    if not (model_dir / "config.json").is_file() or not (Path(cfg.resume) / "trainer_state.json").is_file():
        raise ValueError(f"--resume {cfg.resume}: not a training checkpoint (no model/config.json and "
                         f"trainer_state.json); give a checkpoint directory from --storage-path")
    saved = load_config(model_dir)
    wanted = load_config(cfg.init) if cfg.init else get_preset(cfg.preset or "tiny")
    if saved != wanted:
        raise ValueError(f"--resume {cfg.resume}: preset mismatch: the checkpoint holds "
                         f"{saved.preset_name() or 'a custom model'}, this run builds "
                         f"{wanted.preset_name() or 'a custom model'} (--preset/--init)")


def launch(cfg: TrainConfig, stage, callbacks=None) -> Path:
    """Train `stage` with `cfg` on Ray; returns --out. `callbacks` are Ray Train UserCallbacks (Tune's
    TuneReportCallback, for one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from .shards import steps_per_epoch, train_datasets
    from .loop import total_steps

    from .publish import follow_latest
    cfg = follow_latest(cfg)  # a run directory given as --resume/--init/...: the checkpoint `latest` names
    ray = init_ray()
    res = resolve(cfg, int(ray.cluster_resources().get("GPU", 0)))
    check_cluster(res, cfg, ray)
    tokenizer, tokenizer_source = resolve_tokenizer(cfg)
    print(f"tokenizer: {tokenizer.vocab_size} tokens, {tokenizer_source}", flush=True)
    stage.check(cfg, tokenizer)
    check_resume(cfg, stage)
    storage, cache = default_dirs(cfg)
    prepared, val = prepare_data(cfg, stage, tokenizer, cache)
    micro_per_epoch = steps_per_epoch(prepared, cfg.batch_size, res.num_workers)
    total_steps(cfg, micro_per_epoch)  # raises here, not in every worker, when the data gives no step
    datasets, dataset_config = train_datasets(prepared, res.num_workers, cfg.epochs, cfg.seed)
    run_name = cfg.run_name or f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    keep = (CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=cfg.keep_best_by,
                             checkpoint_score_order="min")
            if cfg.keep_best_by else CheckpointConfig(num_to_keep=cfg.keep_checkpoints))
    trainer = _trainer_class()(
        _worker,
        train_loop_config={"cfg": cfg, "stage": stage, "res": res, "tokenizer": tokenizer,
                           "micro_per_epoch": micro_per_epoch, "run_name": run_name, "val": val},
        torch_config=TorchConfig(backend=res.backend),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": cfg.gpus_per_worker} if res.use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=keep, callbacks=callbacks),
        datasets=datasets, dataset_config=dataset_config,
    )
    print(f"{stage.name}: {res.num_workers} worker(s), {'GPU' if res.use_gpu else 'CPU'}, "
          f"{'ZeRO-' + str(res.zero_stage) if res.zero_stage else 'DDP'}, {prepared.num_rows:,} rows"
          + (f" + {val.num_rows:,} validation rows" if val else "") +
          f", {micro_per_epoch} micro-batches/worker/epoch; run {run_name} in {storage}", flush=True)
    try:
        result = trainer.fit()
    except Exception as e:
        fatal = _fatal_in(e)
        if fatal is None:
            raise
        from .publish import remove_torn_checkpoints
        remove_torn_checkpoints(posixpath.join(storage, run_name))
        raise ValueError(f"{stage.name} stopped without retrying: {fatal}") from None
    checkpoint, which = result.checkpoint, "the last checkpoint"
    if cfg.keep_best_by and result.best_checkpoints:
        checkpoint, metrics = min(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.keep_best_by, math.inf))
        which = f"the best checkpoint by {cfg.keep_best_by} ({metrics[cfg.keep_best_by]:.4f}, step {metrics['step']})"
    if checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    with checkpoint.as_directory() as d:
        out = export_result(Path(d), Path(cfg.out))
    print(f"{cfg.out} receives {which}", flush=True)
    (out / "run.json").write_text(json.dumps({"run_name": run_name, "storage_path": storage,
                                              "checkpoint": checkpoint.path, "exported": which}, indent=2))
    return out
