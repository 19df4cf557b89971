"""The command-line surface: every stage's generated --help carries the shared flags the docs use, every
shipped config file builds, and bad config files are clear errors."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from minimind.configcli import convert, parse_config
from stages.distill import DistillConfig
from stages.dpo import DPOConfig
from stages.lora import LoRAConfig
from stages.pretrain import PretrainConfig
from stages.reason import ReasonConfig
from stages.sft import SFTConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_FLAGS = ["--preset", "--data", "--tokenizer", "--init", "--out", "--profile", "--num-workers",
                "--batch-size", "--accumulation-steps", "--lr", "--warmup", "--epochs", "--max-steps",
                "--max-seq-len", "--seed", "--config", "--wandb", "--use-gpu", "--zero-stage", "--resume"]
STAGES = {"pretrain": [], "sft": [], "dpo": ["--beta", "--reference"], "lora": ["--lora-rank", "--lora-alpha",
          "--lora-targets"], "distill": ["--teacher", "--alpha", "--temperature"], "reason": []}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_lists_shared_and_own_flags(stage):
    proc = subprocess.run([sys.executable, f"stages/{stage}.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in SHARED_FLAGS + STAGES[stage]:
        assert flag in proc.stdout, (stage, flag)
    for flag in ("--pack", "--text-field"):  # pretraining's packing flags are not the chat stages'
        assert (flag in proc.stdout) == (stage == "pretrain"), (stage, flag)
    for flag in ("--val-data", "--val-fraction", "--eval-interval", "--keep-best-by", "--logger"):
        assert flag in proc.stdout, (stage, flag)


def test_tokenizer_and_prepare_help():
    for script in ("stages/tokenizer.py", "stages/prepare.py"):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "--data" in proc.stdout and "--out" in proc.stdout, script


CONFIG_CLASSES = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig, "lora": LoRAConfig,
                  "distill": DistillConfig, "reason": ReasonConfig}


@pytest.mark.parametrize("path", sorted((REPO / "stages" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_build(path):
    import yaml
    cls = CONFIG_CLASSES[path.stem.split("_")[0]]
    cfg = parse_config(cls, ["--config", str(path)])
    assert cfg.max_seq_len in (512, 1024)
    # Every value in the file reaches the parsed config...
    values = {k.replace("-", "_"): tuple(v) if isinstance(v, list) else v
              for k, v in yaml.safe_load(path.read_text(encoding="utf-8")).items()}
    assert values, f"{path.name} sets nothing"
    for name, value in values.items():
        assert getattr(cfg, name) == value, (path.name, name, getattr(cfg, name), value)
    # ...and overrides what lies under it: some files only spell out the class defaults, so layer each one
    # over a base where every field it sets differs; an ignored file leaves the base's values and fails.
    def other(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value * 2 if value else 0.5
        if isinstance(value, str):
            return "tiny" if value != "tiny" else "small"
        raise AssertionError(f"{path.name}: no differing value for {value!r}")
    base = dataclasses.replace(cls(), **{name: other(value) for name, value in values.items()})
    layered = parse_config(cls, ["--config", str(path)], base=base)
    for name, value in values.items():
        assert getattr(base, name) != value
        assert getattr(layered, name) == value, (path.name, name, getattr(layered, name), value)


def test_config_file_layers_and_errors(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("lr: 1.0e-3\nbatch-size: 4\ndata: [a.jsonl, b.jsonl]\n")
    cfg = parse_config(SFTConfig, ["--config", str(good), "--batch-size", "7"])
    assert (cfg.lr, cfg.batch_size, cfg.data, cfg.epochs) == (1e-3, 7, ("a.jsonl", "b.jsonl"), 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown config fields \['learning_rate'\]"):
        parse_config(SFTConfig, ["--config", str(bad)])
    broken = tmp_path / "broken.json"
    broken.write_text("{lr: ")
    with pytest.raises(ValueError, match=r"broken\.json: cannot parse config"):
        parse_config(SFTConfig, ["--config", str(broken)])


def test_stage_exits_with_clear_error_before_work(tmp_path):
    proc = subprocess.run([sys.executable, "stages/dpo.py", "--out", str(tmp_path / "o")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a reference model" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_one_conversion_for_flags_config_files_and_builder_args():
    # Strings (flags, `serve run k=v`, --set) and YAML's typed values land on the declared type alike.
    assert convert("lr", float, "1e-4") == 1e-4 and convert("lr", float, 3) == 3.0
    assert convert("batch_size", int, "16") == 16 and convert("batch_size", int, "1e3") == 1000
    assert convert("batch_size", int, 8.0) == 8
    assert convert("profile", str, 4090) == "4090"  # YAML reads `profile: 4090` as a number
    assert convert("pack", bool, "off") is False and convert("pack", bool, 1) is True
    assert convert("use_gpu", bool | None, None) is None and convert("use_gpu", bool | None, "") is None
    assert convert("use_gpu", bool | None, "true") is True
    assert convert("zero_stage", int | None, 0) == 0  # 0 is a stage (DDP), not "unset"
    assert convert("data", tuple[str, ...], "a.jsonl") == ("a.jsonl",)
    assert convert("data", tuple[str, ...], ["a", "b"]) == ("a", "b")
    for name, tp, value in [("batch_size", int, "8.5"), ("batch_size", int, True), ("pack", bool, 2),
                            ("use_gpu", bool | None, "maybe"), ("out", str, None), ("lr", float, "fast")]:
        with pytest.raises(ValueError, match=f"^{name}={value!r} is not a valid ".replace("(", "\\(")):
            convert(name, tp, value)
