"""Train the byte-level BPE tokenizer (vocab 6400, ChatML specials) from jsonl text, in bounded memory.

    python stages/tokenizer.py --data pretrain_hq.jsonl --out out/tokenizer
    python stages/tokenizer.py --data ../shared/data/poetry/poems.train.jsonl.gz --text-field text
"""
import sys
import time
from dataclasses import dataclass, field

from cluster.config import BUNDLED_DATA
from minimind.configcli import parse_config
from minimind.tokenizer import iter_jsonl_texts, train_tokenizer


@dataclass
class TokenizerConfig:
    data: tuple[str, ...] = field(default=(str(BUNDLED_DATA / "sample_corpus.jsonl"),),
                                  metadata={"help": "jsonl(.gz) files, directories or globs"})
    text_field: str = field(default="text", metadata={"help": "field holding the text"})
    out: str = field(default="out/tokenizer", metadata={"help": "output directory"})
    vocab_size: int = field(default=6400, metadata={"help": "vocabulary size, specials included"})
    max_chars: int = field(default=2_000_000,
                           metadata={"help": "characters sampled from the corpus for training (bounds memory)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def main(argv=None):
    cfg = parse_config(TokenizerConfig, argv, description=__doc__, prog="stages/tokenizer.py")
    start = time.perf_counter()
    try:
        tok = train_tokenizer(iter_jsonl_texts(list(cfg.data), text_field=cfg.text_field),
                              vocab_size=cfg.vocab_size, max_chars=cfg.max_chars, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tok.save(cfg.out)
    print(f"tokenizer with {tok.vocab_size} tokens written to {cfg.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
