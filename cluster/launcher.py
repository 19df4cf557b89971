"""Launching a stage on Ray Train: the only module that touches TorchTrainer, `ray.train.report` and
`Checkpoint`.

The driver resolves the profile, checks the cluster can host the workers, tokenises the data once (a
cached Parquet dataset), runs a `TorchTrainer` whose workers call the plain loop in `cluster.loop`, and
finally copies the last checkpoint's model directory and metrics log to `--out`.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from .config import REPO_ROOT, Resolved, TrainConfig, resolve
from .runtime import init_ray

REAL_TOKENIZER = REPO_ROOT.parent / "shared" / "data" / "minimind"


def resolve_tokenizer(cfg: TrainConfig):
    """--tokenizer, else the --init checkpoint's, else the real MiniMind tokenizer beside the checkout,
    else one trained on the bundled sample corpus."""
    from minimind.tokenizer import Tokenizer
    if cfg.tokenizer:
        p = Path(cfg.tokenizer)
        if not p.exists():
            raise ValueError(f"--tokenizer {p}: no such file or directory")
        return Tokenizer.from_dir(p) if p.is_dir() else Tokenizer.from_file(p)
    if cfg.init and (Path(cfg.init) / "tokenizer.json").is_file():
        return Tokenizer.from_dir(cfg.init)
    if (REAL_TOKENIZER / "tokenizer.json").is_file():
        return Tokenizer.from_dir(REAL_TOKENIZER)
    from minimind.__main__ import default_tokenizer
    return default_tokenizer()


def data_spec(cfg: TrainConfig, stage):
    from .data import DataSpec
    return DataSpec(paths=tuple(cfg.data), format=stage.data_format, max_seq_len=cfg.max_seq_len,
                    pack=cfg.pack, text_field=cfg.text_field, seed=cfg.seed)


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

    def __init__(self, cfg: TrainConfig, res: Resolved, tokenizer, micro_per_epoch: int, run_name: str):
        import ray.train
        tc = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = tc.get_world_rank(), tc.get_world_size(), tc.get_local_rank()
        self.resolved, self.tokenizer, self.run_name = res, tokenizer, run_name
        self.micro_batches_per_epoch = micro_per_epoch
        self.cfg = cfg
        if res.use_gpu:
            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.scratch_dir = tempfile.mkdtemp(prefix="minimind-")
        import logging

        import ray.data
        ray.data.DataContext.get_current().enable_progress_bars = False  # one progress line is ours
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-epoch "Starting execution" lines
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

    def batches(self, start_micro_batch: int):
        from .data import iter_train_batches
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


def _worker(config: dict):
    from .loop import train
    ctx = RayContext(config["cfg"], config["res"], config["tokenizer"], config["micro_per_epoch"],
                     config["run_name"])
    train(config["cfg"], config["stage"], ctx)


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


def launch(cfg: TrainConfig, stage, callbacks=None) -> Path:
    """Train `stage` with `cfg` on Ray; returns --out. `callbacks` are Ray Train UserCallbacks (Tune's
    TuneReportCallback, for one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .data import prepare_dataset, steps_per_epoch, train_datasets

    ray = init_ray()
    res = resolve(cfg, int(ray.cluster_resources().get("GPU", 0)))
    check_cluster(res, cfg, ray)
    tokenizer = resolve_tokenizer(cfg)
    stage.check(cfg, tokenizer)
    storage, cache = default_dirs(cfg)
    prepared = prepare_dataset(data_spec(cfg, stage), tokenizer, cache)
    micro_per_epoch = steps_per_epoch(prepared, cfg.batch_size, res.num_workers)
    datasets, dataset_config = train_datasets(prepared, res.num_workers, cfg.epochs, cfg.seed)
    run_name = cfg.run_name or f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "stage": stage, "res": res, "tokenizer": tokenizer,
                           "micro_per_epoch": micro_per_epoch, "run_name": run_name},
        torch_config=TorchConfig(backend=res.backend),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": cfg.gpus_per_worker} if res.use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             callbacks=callbacks),
        datasets=datasets, dataset_config=dataset_config,
    )
    print(f"{stage.name}: {res.num_workers} worker(s), {'GPU' if res.use_gpu else 'CPU'}, "
          f"{'ZeRO-' + str(res.zero_stage) if res.zero_stage else 'DDP'}, {prepared.num_rows:,} rows, "
          f"{micro_per_epoch} micro-batches/worker/epoch; run {run_name} in {storage}", flush=True)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        out = export_result(Path(d), Path(cfg.out))
    (out / "run.json").write_text(json.dumps({"run_name": run_name, "storage_path": storage,
                                              "checkpoint": result.checkpoint.path}, indent=2))
    return out
