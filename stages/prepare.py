"""Tokenise a stage's jsonl data into the Parquet cache once, ahead of training (training reuses it).

    python stages/prepare.py --stage pretrain --data ../shared/data/poetry/ --out out/data_cache
    python stages/prepare.py --stage sft --data 'sft_*.jsonl.gz' s3://bucket/more.jsonl --max-seq-len 512

Point the stage at the same cache (`--cache-dir out/data_cache`) with the same data, tokenizer, --max-seq-len,
--pack, --text-field and --val-fraction, and it finds the shards instead of tokenising again. --max-seq-len
defaults to the chosen stage's own, so `prepare` then the stage, both with defaults, meet the same cache.
A cache accepted here under a --reject-threshold above the stage's is still used by the stage (with a warning).
"""
import importlib
import json
import logging
import sys
from dataclasses import dataclass

from cluster.config import _help

# Each stage's data format (see minimind/formats.py).
STAGE_FORMATS = {"pretrain": "pretrain", "sft": "chat", "lora": "chat", "distill": "chat", "reason": "reason",
                 "dpo": "dpo"}


@dataclass
class PrepareConfig:
    stage: str = _help("the stage whose data this is", default="pretrain",
                       meta={"choices": sorted(STAGE_FORMATS)})
    data: tuple[str, ...] = _help("jsonl(.gz) files, directories, globs or pyarrow URIs", default=())
    out: str = _help("cache directory (a stage's --cache-dir)", default="out/data_cache")
    tokenizer: str = _help("tokenizer directory or tokenizer.json; default: the stages' default", default="")
    init: str = _help("take the tokenizer from this checkpoint directory instead", default="")
    max_seq_len: int = _help("tokens per training row (rows hold one more: inputs and shifted targets); "
                             "0: the stage's own default", default=0)
    pack: bool = _help("pretrain: pack documents end to end; --no-pack pads one per row like MiniMind",
                       default=True)
    text_field: str = _help("pretrain: the record field holding the text", default="text")
    reject_threshold: float = _help("fail when more than this fraction of records is rejected; the cache "
                                    "remembers it, so the stage then accepts it too", default=0.01)
    val_fraction: float = _help("also hold out this fraction of the records for validation (two caches, as "
                                "the stage's --val-fraction makes them)", default=0.0)


def stage_defaults(stage: str):
    """The chosen stage's config dataclass with its defaults (its own --max-seq-len, --pack, ...)."""
    from stages.common import Stage
    module = importlib.import_module(f"stages.{stage}")
    cls, = {v.config_cls for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Stage) and v.__module__ == module.__name__}
    return cls()


def data_spec(cfg: PrepareConfig):
    """The DataSpec the chosen stage builds from the same flags, so both name the same cache."""
    from cluster.ingest import DataSpec
    if not cfg.data:
        raise ValueError("--data names no input")
    return DataSpec(paths=cfg.data, format=STAGE_FORMATS[cfg.stage],
                    max_seq_len=cfg.max_seq_len or stage_defaults(cfg.stage).max_seq_len, pack=cfg.pack,
                    text_field=cfg.text_field, reject_threshold=cfg.reject_threshold, val_fraction=cfg.val_fraction)


def main(argv=None):
    from minimind.configcli import parse_config
    cfg = parse_config(PrepareConfig, argv, description=__doc__.split("\n")[0], prog="stages/prepare.py")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from cluster.ingest import prepare_dataset, prepare_splits
        from cluster.launcher import resolve_tokenizer
        spec = data_spec(cfg)
        tokenizer, source = resolve_tokenizer(cfg)
        logging.info("tokenizer: %s; max_seq_len %d", source, spec.max_seq_len)
        if cfg.val_fraction:
            parts = dict(zip(("train", "val"), prepare_splits(spec, tokenizer, cfg.out)))
        else:
            parts = {"all": prepare_dataset(spec, tokenizer, cfg.out)}
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        import ray
        ray.shutdown()
    keys = ("format", "max_seq_len", "rows", "tokens", "real_tokens", "padding_fraction", "records", "rejects",
            "blank", "held_out", "truncated", "skipped")
    for split, prepared in parts.items():
        summary = {k: prepared.manifest.get(k) for k in keys}
        print(json.dumps({"split": split, "path": str(prepared.path), **summary}, indent=1))
    return parts["all"] if len(parts) == 1 else (parts["train"], parts["val"])


if __name__ == "__main__":
    main()
