"""Experiment trackers a run reports its metrics to: wandb, TensorBoard and SwanLab, behind one small object.

    loggers = RunLoggers(["tensorboard", "swanlab"], run_name, config_dict, directory)
    loggers.log({"loss": 2.3, "lr": 1e-3}, step=10)       # numeric fields only; keys may differ per call
    loggers.close()

Everything is written under `directory`: the TensorBoard event file directly in it (`tensorboard --logdir
DIR`), SwanLab's run in `DIR/swanlog/` (offline mode: nothing leaves the machine; `swanlab sync` uploads it
later), wandb's in `DIR/wandb/` (offline too with WANDB_MODE=offline). Only the process that should log
(rank 0) builds one.
"""
from __future__ import annotations

import json
from pathlib import Path

LOGGERS = ("wandb", "tensorboard", "swanlab")


def _plain_config(config: dict) -> dict:
    """The config as JSON values: trackers choke on Paths, tuples of dataclasses and the like."""
    return json.loads(json.dumps(config, default=str))


def _scalars(record: dict) -> dict[str, float]:
    # bool is an int subclass, but a flag is not a curve; "step" is the x axis, not a metric.
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class _Wandb:
    def __init__(self, run_name: str, config: dict, directory: Path, project: str):
        import wandb
        self.run = wandb.init(project=project, name=run_name, config=config, dir=str(directory), reinit=True)
        self.path = Path(self.run.dir).parent  # wandb/offline-run-*/ (its files/ subfolder is run.dir)

    def log(self, scalars: dict, step: int):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


class _TensorBoard:
    def __init__(self, run_name: str, config: dict, directory: Path, project: str):
        # torch's writer needs the `tensorboard` package; tensorboardX (a dependency) writes the same format.
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(directory), flush_secs=10)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.path = directory

    def log(self, scalars: dict, step: int):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


class _SwanLab:
    def __init__(self, run_name: str, config: dict, directory: Path, project: str):
        import swanlab
        # Offline: the run is stored locally only (swanlab 0.10's "local" mode is its deprecated dashboard path).
        # Console capture off: our progress lines already reach the user, and patching stdout under Ray
        # workers only duplicates them.
        settings = swanlab.Settings(terminal={"proxy_type": "none"})
        self.run = swanlab.init(mode="offline", log_dir=str(directory / "swanlog"), project=project,
                                name=run_name, config=config, settings=settings, reinit=True)
        self.path = Path(self.run.dir)

    def log(self, scalars: dict, step: int):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


_CLASSES = {"wandb": _Wandb, "tensorboard": _TensorBoard, "swanlab": _SwanLab}


def check_logger_names(names) -> list[str]:
    """The names, deduplicated in order; ValueError on an unknown one (call it in the driver, before launch)."""
    out = []
    for name in names:
        if name not in _CLASSES:
            raise ValueError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
        if name not in out:
            out.append(name)
    return out


class RunLoggers:
    """Fan each metrics record out to the named trackers. `paths` maps each name to where it wrote."""

    def __init__(self, names, run_name: str, config: dict, directory, project: str = "minimind-ray"):
        names = check_logger_names(names)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = _plain_config(config)
        self._loggers = {}
        try:
            for name in names:
                self._loggers[name] = _CLASSES[name](run_name, config, directory, project)
        except BaseException:
            self.close()
            raise
        self.paths = {name: lg.path for name, lg in self._loggers.items()}

    def log(self, record: dict, step: int) -> None:
        scalars = _scalars(record)
        if scalars:
            for lg in self._loggers.values():
                lg.log(scalars, step)

    def close(self) -> None:
        loggers, self._loggers = self._loggers, {}
        for lg in loggers.values():
            lg.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
