"""Benchmark tokenizer training: peak memory, time and compression of the naive vs bounded BPE training.

Each method trains in its own subprocess on the poetry corpus minus a held-out set (every ``--holdout-every``-th
poem, about 5,000, spread over all collections: the file is ordered by collection, so its last 5,000 poems would
all be Song ci) and reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, which covers the Rust trainer
threads too). The parent then measures compression on the held-out poems: tokens per character and characters
per token.

Methods:
  naive         every text through BpeTrainer with plain ByteLevel pre-tokenization (MiniMind's reference way)
  bounded       minimind.tokenizer.train_tokenizer with its defaults, on the full training split
  bounded-half  the same on every second poem of the training split (peak RSS must not grow with corpus size)
  reference     MiniMind's own shipped tokenizer (not trained here), for scale
  --sweep       train_tokenizer with other max_piece_chars / max_chars settings
  --reviews     compression only (no subprocess): naive vs max_piece_chars settings on the modern-Chinese review
                sentences, where multi-character tokens matter more than in poetry

Usage: python bench/bench_tokenizer_train.py [--skip-naive] [--threads 1] [--sweep] [--reviews]
Writes bench/results/tokenizer_train.json.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _split(corpus: str, every: int, heldout: bool):
    """The held-out poems (index % every == every - 1) or the training poems (all others)."""
    from minimind.tokenizer import iter_jsonl_texts
    return (t for i, t in enumerate(iter_jsonl_texts(corpus)) if (i % every == every - 1) == heldout)


def _train_texts(spec: dict):
    return itertools.islice(_split(spec["corpus"], spec["holdout_every"], False), 0, None, spec["stride"])


def worker(spec: dict) -> dict:
    """Runs in the subprocess: train one tokenizer, save it, report time and peak RSS."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from minimind.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    texts = _train_texts(spec)
    if spec["method"] == "naive":
        # The reference recipe, written out here independently of train_tokenizer: stream every text into one
        # BpeTrainer with the plain ByteLevel pre-tokenizer.
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=spec["vocab_size"], special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
        tok = Tokenizer(backend)
    else:
        tok = train_tokenizer(texts, vocab_size=spec["vocab_size"], **spec.get("kwargs", {}))
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    tok.save(spec["out_dir"])
    # CPU seconds as well as wall seconds: on a shared machine the wall time depends on the neighbours' load.
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "start_rss_mb": rss_start / 1024, "vocab_size": tok.vocab_size}


def run_method(spec: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def compression(tok, texts: list[str]) -> dict:
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    n_chars = sum(len(t) for t in texts)
    return {"tokens_per_char": n_tokens / n_chars, "chars_per_token": n_chars / n_tokens,
            "heldout_tokens": n_tokens, "heldout_chars": n_chars}


def reviews_sweep() -> list[dict]:
    """Compression of naive vs bounded training on review sentences (train on 19 of every 20, test on the rest)."""
    from minimind.tokenizer import train_tokenizer
    lines = []
    for name in ("pos", "neg"):
        with gzip.open(DATA / "reviews" / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f if line.strip()]
    train, heldout = [t for i, t in enumerate(lines) if i % 20], lines[::20]
    print(f"\nreviews: training on {len(train)} sentences ({sum(map(len, train)):,} chars), "
          f"held out {len(heldout)}", flush=True)
    rows = []
    for piece, max_chars in [(0, 10**9), (2, 2_000_000), (4, 2_000_000), (6, 2_000_000), (8, 2_000_000),
                             (6, 1_000_000)]:
        t0 = time.perf_counter()
        tok = train_tokenizer(train, 6400, max_piece_chars=piece, max_chars=max_chars)
        row = {"max_piece_chars": piece, "max_chars": max_chars, "seconds": time.perf_counter() - t0,
               **compression(tok, heldout)}
        naive_tpc = rows[0]["tokens_per_char"] if rows else row["tokens_per_char"]
        row["tokens_vs_naive_pct"] = 100 * (row["tokens_per_char"] / naive_tpc - 1)
        rows.append(row)
        label = "naive (all text, no cut)" if piece == 0 else f"piece={piece} max_chars={max_chars / 1e6:g}M"
        print(f"  {label:<30} {row['tokens_per_char']:.4f} tokens/char  {row['tokens_vs_naive_pct']:+.2f}%",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=str(DATA / "poetry" / "poems.train.jsonl.gz"))
    ap.add_argument("--holdout-every", type=int, default=67, help="hold out every N-th poem (~5,000 poems)")
    ap.add_argument("--vocab-size", type=int, default=6400)
    ap.add_argument("--skip-naive", action="store_true", help="skip the ~100 s, ~5 GB naive run")
    ap.add_argument("--threads", type=int, default=None, help="RAYON_NUM_THREADS for the trainers")
    ap.add_argument("--sweep", action="store_true", help="also try other max_piece_chars / max_chars settings")
    ap.add_argument("--reviews", action="store_true", help="also the compression sweep on reviews")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tokenizer_train.json"))
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    if args.threads:
        # Before the first use of tokenizers here, whose thread pool reads it once; the workers inherit it.
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    from minimind.tokenizer import Tokenizer

    if not Path(args.corpus).exists():
        sys.exit(f"corpus not found: {args.corpus} (expected ../shared/data beside the checkout)")
    heldout = list(_split(args.corpus, args.holdout_every, True))
    n_train = n_chars = 0
    for t in _split(args.corpus, args.holdout_every, False):
        n_train, n_chars = n_train + 1, n_chars + len(t)
    print(f"corpus {args.corpus}: training on {n_train} poems ({n_chars:,} chars), "
          f"held out {len(heldout)} ({sum(map(len, heldout)):,} chars)", flush=True)

    runs = []  # (name, method, stride, train_tokenizer kwargs)
    if not args.skip_naive:
        runs.append(("naive", "naive", 1, {}))
    runs += [("bounded", "bounded", 1, {}), ("bounded-half", "bounded", 2, {})]
    if args.sweep:
        runs += [(f"bounded piece={p} max_chars={m / 1e6:g}M", "bounded", 1,
                  {"max_piece_chars": p, "max_chars": m})
                 for p, m in [(0, 2_000_000), (2, 2_000_000), (4, 2_000_000), (8, 2_000_000),
                              (6, 1_000_000), (6, 4_000_000), (2, 10_000_000)]]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, method, stride, kwargs) in enumerate(runs):
            spec = {"name": name, "method": method, "corpus": args.corpus, "stride": stride,
                    "holdout_every": args.holdout_every, "vocab_size": args.vocab_size, "kwargs": kwargs,
                    "out_dir": f"{tmp}/{i}"}
            print(f"running {name} ...", flush=True)
            result = run_method(spec)
            result.update(name=name, method=method, n_train_poems=len(range(0, n_train, stride)),
                          kwargs=kwargs, **compression(Tokenizer.from_dir(spec["out_dir"]), heldout))
            rows.append(result)
            print(f"  {result['peak_rss_mb']:.0f} MB peak, {result['seconds']:.1f} s "
                  f"({result['cpu_seconds']:.1f} CPU s), {result['tokens_per_char']:.4f} tokens/char", flush=True)
    if (DATA / "minimind" / "tokenizer.json").exists():
        ref = compression(Tokenizer.from_dir(DATA / "minimind"), heldout)
        rows.append({"name": "reference (MiniMind's shipped tokenizer)", "method": "reference", **ref})

    base = next((r for r in rows if r["name"] == "naive"), None)
    print(f"\n{'method':<40} {'poems':>8} {'peak RSS MB':>12} {'wall s':>7} {'CPU s':>7} {'tok/char':>9}"
          f" {'char/tok':>9} {'vs naive':>9}")
    for r in rows:
        r["tokens_vs_naive_pct"] = 100 * (r["tokens_per_char"] / base["tokens_per_char"] - 1) if base else None
        rel = f"{r['tokens_vs_naive_pct']:+.2f}%" if base else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        cpu = f"{r['cpu_seconds']:.1f}" if "cpu_seconds" in r else "-"
        print(f"{r['name']:<40} {r.get('n_train_poems', '-'):>8} {rss:>12} {secs:>7} {cpu:>7} "
              f"{r['tokens_per_char']:>9.4f} {r['chars_per_token']:>9.4f} {rel:>9}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reviews = reviews_sweep() if args.reviews else None
    meta = {"corpus": args.corpus, "n_train_poems": n_train, "train_chars": n_chars,
            "heldout_poems": len(heldout), "vocab_size": args.vocab_size, "threads": args.threads,
            "cpu_count": os.cpu_count(), "command": " ".join([Path(sys.executable).name] + sys.argv)}
    report = {"meta": meta, "results": rows, "reviews_sweep": reviews}
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
