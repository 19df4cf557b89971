"""Tokenise a stage's jsonl data into the Parquet cache once, ahead of training (training reuses it).

    python stages/prepare.py --stage pretrain --data ../shared/data/poetry/ --out out/data_cache
    python stages/prepare.py --stage sft --data 'sft_*.jsonl.gz' s3://bucket/more.jsonl --max-seq-len 512

Point the stage at the same cache (`--cache-dir out/data_cache`) with the same data, tokenizer, --max-seq-len,
--pack and --text-field, and it finds the shards instead of tokenising again.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401 (run as a script)
import json
import logging
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
    tokenizer: str = _help("tokenizer directory or tokenizer.json; default: the real MiniMind tokenizer "
                           "beside the checkout, else the stages' default", default="")
    init: str = _help("take the tokenizer from this checkpoint directory instead", default="")
    max_seq_len: int = _help("tokens per training row (rows hold one more: inputs and shifted targets)",
                             default=512)
    pack: bool = _help("pretrain: pack documents end to end; --no-pack pads one per row like MiniMind",
                       default=True)
    text_field: str = _help("pretrain: the record field holding the text", default="text")
    reject_threshold: float = _help("fail when more than this fraction of records is rejected", default=0.01)


def main(argv=None):
    from minimind.configcli import parse_config
    cfg = parse_config(PrepareConfig, argv, description=__doc__.split("\n")[0], prog="stages/prepare.py")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not cfg.data:
            raise ValueError("--data names no input")
        from cluster.data import DataSpec, prepare_dataset
        from cluster.launcher import resolve_tokenizer
        spec = DataSpec(paths=cfg.data, format=STAGE_FORMATS[cfg.stage], max_seq_len=cfg.max_seq_len,
                        pack=cfg.pack, text_field=cfg.text_field, reject_threshold=cfg.reject_threshold)
        prepared = prepare_dataset(spec, resolve_tokenizer(cfg), cfg.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        import ray
        ray.shutdown()
    m = prepared.manifest
    summary = {k: m[k] for k in ("format", "rows", "tokens", "real_tokens", "padding_fraction", "records",
                                 "rejects", "blank", "truncated")}
    print(json.dumps({"path": str(prepared.path), **summary}, indent=1))
    return prepared


if __name__ == "__main__":
    main()
