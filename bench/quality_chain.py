"""Quality chain (issue 12): pretrain -> SFT -> DPO -> reasoning distillation on real data, with held-out
figures at every stage, through the project's own entry points (`stages/*.py --no-ray`, `stages/evaluate.py
--no-ray`) run as subprocesses, exactly as a user would type them.

Data (from ../shared/data, never copied into the project; derived files go to --work-dir):
  poetry/poems.train.jsonl.gz  337k classical Chinese poems; minimind/tokenizer.json the real 6400-token
  MiniMind tokenizer. Every poem goes to one side of a single held-out split, decided by a hash of its id
  (blake2b, u < VAL_SHARE -> held out), and NO stage ever trains on a held-out poem. The train side is cut
  into disjoint hash ranges for pretraining, SFT/reasoning and DPO, so a fine-tuning prompt is never a poem
  the model was pretrained on either.

Stages and what is measured:
  1. pretrain `tiny` (the chain's model) and `small` (MiniMind2-small, 25.8M, the real size: only a few
     steps fit on 2 CPUs) on documents "《title》author\\ntext". Validation every --eval-interval steps on the
     held-out poems gives val bits/char against tokens seen; a unigram model (add-one smoothing, fit on the
     pretraining documents' tokens, same tokenizer) is the baseline: total nats / ln 2 / characters.
  2. SFT from the tiny pretrain on prompts built from each poem's metadata:
       "写一首{唐诗|宋诗}（{五言绝句|七言绝句|五言律诗|七言律诗}），题为《title》，作者author。" -> the poem.
     Only regular poems are used (2 or 4 lines, every line 10 or 14 Han characters: two 5- or 7-character
     clauses), so the asked-for form fixes the line structure. Measured on held-out poems: assistant-only
     loss (evaluate --format chat) and the share of greedy answers with the right line structure: as many
     lines as the real poem and every line with the real poem's Han-character count (punctuation ignored).
  3. DPO from SFT on pairs built from real poems: chosen = the real poem; rejected = the same poem with its
     lines in a different order and CORRUPT_RATE of its Han characters replaced by the characters at the
     same positions of another poem of the same form (so the line structure stays the same, only content is
     worse). Measured: held-out preference accuracy before (SFT) and after (DPO), reference-free
     (length-averaged log p(chosen) > log p(rejected)), and DPO's own reward accuracy against the SFT
     reference after training (before it is 0 by construction: policy = reference, margin 0).
  4. Reasoning distillation from DPO on the SFT set rewritten as
       "<think>\\n{a templated analysis of the form: clauses, characters, lines}\\n</think>\\n<answer>\\n{poem}\\n</answer>"
     (a template, not a teacher model: this checks that the stage teaches the format). Measured: the share
     of well-formed greedy replies (minimind.scoring.well_formed) before and after; goal >= 95%.

    nice -n 19 .venv/bin/python bench/quality_chain.py            # full run: planned ~30 min on 2 idle CPUs;
                                                                  # 54 min measured on a heavily shared machine
    nice -n 19 .venv/bin/python bench/quality_chain.py --quick    # smoke of the same code (3.5-7 min measured)
    nice -n 19 .venv/bin/python bench/quality_chain.py --reuse    # resume: skip steps already done identically

Writes bench/results/quality_chain.json (every figure, every command with its wall time),
bench/results/quality_chain.md (tables) and bench/results/quality_chain_*.png; prints the tables.
A stage that fails stops the run with its exit code and the tail of its output.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATA = REPO.parent / "shared" / "data"
POEMS = DATA / "poetry" / "poems.train.jsonl.gz"
TOKENIZER = DATA / "minimind" / "tokenizer.json"
PY = sys.executable

VAL_SHARE = 0.01        # held-out share of all poems (~3,400), hash of the id
CORRUPT_RATE = 0.2      # share of a rejected poem's Han characters taken from another poem
HAN = re.compile(r"[\u3400-\u9fff\U00020000-\U0002ffff]")
COLLECTION_ZH = {"tang": "唐诗", "song": "宋诗"}
# (lines, Han characters per line) -> form. Each line of the corpus holds two clauses ("床前明月光，疑是地上霜。").
FORMS = {(2, 10): "五言绝句", (2, 14): "七言绝句", (4, 10): "五言律诗", (4, 14): "七言律诗"}

# Everything that scales with the budget. quick runs the very same code with tiny numbers (a smoke test).
BUDGETS = {
    "full": dict(
        pretrain_docs=20000, pretrain_val=200, sft_train=4000, sft_val=200, dpo_train=1600, dpo_val=200,
        generate=32,
        tiny=dict(max_seq_len=256, batch_size=16, max_steps=300, lr=2e-3, eval_interval=25),
        small=dict(max_seq_len=256, batch_size=8, max_steps=40, lr=1e-3, eval_interval=10),
        sft=dict(max_seq_len=192, batch_size=16, max_steps=200, lr=1e-3, eval_interval=50),
        dpo=dict(max_seq_len=192, batch_size=8, max_steps=80, lr=2e-4, eval_interval=20),
        reason=dict(max_seq_len=256, batch_size=8, max_steps=60, lr=1e-3, eval_interval=20),
    ),
    "quick": dict(
        pretrain_docs=1500, pretrain_val=40, sft_train=300, sft_val=24, dpo_train=100, dpo_val=24,
        generate=6,
        tiny=dict(max_seq_len=128, batch_size=8, max_steps=16, lr=2e-3, eval_interval=8),
        small=dict(max_seq_len=128, batch_size=2, max_steps=2, lr=1e-3, eval_interval=1),
        sft=dict(max_seq_len=192, batch_size=8, max_steps=12, lr=1e-3, eval_interval=6),
        dpo=dict(max_seq_len=192, batch_size=4, max_steps=6, lr=1e-4, eval_interval=3),
        reason=dict(max_seq_len=256, batch_size=8, max_steps=12, lr=1e-3, eval_interval=6),
    ),
}


# ------------------------------------------------------------------------------------------------ helpers


def unit_hash(key: str) -> float:
    """A poem's place in [0, 1): the same on every run, independent of file order."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2 ** 64


def han_count(line: str) -> int:
    return len(HAN.findall(line))


def poem_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n") if line.strip()]


def form_of(poem: dict) -> str | None:
    """The regular form of a Tang/Song poem, or None (ci, qu, irregular or mixed line lengths)."""
    if poem["collection"] not in COLLECTION_ZH:
        return None
    lines = poem_lines(poem["text"])
    lengths = {han_count(line) for line in lines}
    return FORMS.get((len(lines), lengths.pop())) if len(lengths) == 1 else None


def line_structure(answer: str, reference: str) -> dict:
    """Whether `answer` has the reference poem's line structure: the same number of non-blank lines, each with
    the reference's (dominant) Han-character count; punctuation and spaces are not counted."""
    ref = poem_lines(reference)
    want = collections.Counter(han_count(line) for line in ref).most_common(1)[0][0]
    got = poem_lines(answer)
    lines_ok = len(got) == len(ref)
    lengths_ok = bool(got) and all(han_count(line) == want for line in got)
    return {"lines_ok": lines_ok, "lengths_ok": lengths_ok, "ok": lines_ok and lengths_ok}


def write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def relative(arg) -> str:
    """A path argument as the user would type it from the repository root (commands in the report)."""
    text = str(arg)
    for base, shown in ((REPO, ""), (DATA, "../shared/data/")):
        if text.startswith(str(base) + "/"):
            return shown + text[len(str(base)) + 1:]
    return text


class Runner:
    """Runs the project's commands, logs each to WORK/logs, times it, and stops the bench on a failure.

    With `reuse`, a step whose exact command already succeeded in this work dir (WORK/logs/NAME.done.json) is
    not run again: its recorded wall time is kept and the entry is marked reused. The data files are rebuilt
    identically every run, so this only saves the time of steps whose inputs did not change."""

    def __init__(self, work: Path, reuse: bool = False):
        self.work, self.reuse, self.commands = work, reuse, []
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, args: list[str], threads: int | None = None) -> float:
        cmd = [PY, *args]
        threads = threads or (EVAL_THREADS if name.startswith("eval_") else None)
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        shown = " ".join(shlex.quote(relative(a)) for a in [".venv/bin/python", *args])
        if threads:
            shown = f"OMP_NUM_THREADS={threads} {shown}"
        print(f"\n$ {shown}", flush=True)
        log, done = self.work / "logs" / f"{name}.log", self.work / "logs" / f"{name}.done.json"
        if self.reuse and done.is_file() and json.loads(done.read_text())["command"] == shown:
            entry = json.loads(done.read_text()) | {"reused": True}
            self.commands.append(entry)
            print(f"  {name}: reused (ran in {entry['seconds']:.0f} s before)", flush=True)
            return entry["seconds"]
        done.unlink(missing_ok=True)
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        # The 1-minute load average at the end: this machine is shared, and wall times move with it.
        entry = {"name": name, "command": shown, "seconds": round(seconds, 1), "returncode": proc.returncode,
                 "load_avg_1min": round(os.getloadavg()[0], 2), "log": relative(log)}
        self.commands.append(entry)
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()
        if proc.returncode != 0:
            print("\n".join(tail[-40:]), file=sys.stderr)
            raise SystemExit(f"stage {name} failed with exit code {proc.returncode} after {seconds:.0f} s "
                             f"(full output: {log})")
        done.write_text(json.dumps(entry) + "\n")
        print(f"  {name}: {seconds:.0f} s; {tail[-1] if tail else ''}", flush=True)
        return seconds


# ------------------------------------------------------------------------------------------------- data


def sft_prompt(p: dict) -> str:
    return f"写一首{COLLECTION_ZH[p['collection']]}（{p['form']}），题为《{p['title']}》，作者{p['author']}。"


def sft_record(p: dict) -> dict:
    return {"conversations": [{"role": "user", "content": sft_prompt(p)},
                              {"role": "assistant", "content": p["text"]}]}


def reason_record(p: dict) -> dict:
    """The SFT record with a templated analysis of the asked-for form before the poem."""
    lines = poem_lines(p["text"])
    per_clause = han_count(lines[0]) // 2
    think = (f"题目是《{p['title']}》，作者{p['author']}，体裁是{p['form']}：共{2 * len(lines)}句，每句{per_clause}字，"
             f"两句一行，共{len(lines)}行，偶数句押韵。")
    return {"conversations": [{"role": "user", "content": sft_prompt(p)},
                              {"role": "assistant", "content": f"<think>\n{think}\n</think>\n<answer>\n{p['text']}\n</answer>"}]}


def corrupt(text: str, donor: str, rng: random.Random) -> str:
    """The rejected poem: lines reordered (never the original order), then CORRUPT_RATE of the Han characters
    replaced by the donor poem's character at the same position; punctuation and line lengths are kept."""
    lines = poem_lines(text)
    order = list(range(len(lines)))
    while order == sorted(order):
        rng.shuffle(order)
    donor_chars = HAN.findall(donor)
    out, k = [], 0
    for line in (lines[i] for i in order):
        chars = []
        for c in line:
            if HAN.fullmatch(c):
                if rng.random() < CORRUPT_RATE and donor_chars[k % len(donor_chars)] != c:
                    c = donor_chars[k % len(donor_chars)]
                k += 1
            chars.append(c)
        out.append("".join(chars))
    return "\n".join(out)


def dpo_record(p: dict, donor: dict, rng: random.Random) -> dict:
    user = {"role": "user", "content": sft_prompt(p)}
    return {"chosen": [user, {"role": "assistant", "content": p["text"]}],
            "rejected": [user, {"role": "assistant", "content": corrupt(p["text"], donor["text"], rng)}]}


def build_data(work: Path, b: dict, tokenizer) -> dict:
    """One pass over the corpus: held-out poems (hash < VAL_SHARE) and disjoint hash ranges of the rest for
    pretraining, SFT/reasoning and DPO; each pool sorted by hash and cut to the budget's size."""
    start = time.perf_counter()
    n_all = 337_275
    # Range widths sized from the corpus counts, with a margin: ~60% of Tang/Song poems are of a regular form.
    pre_hi = VAL_SHARE + 1.3 * b["pretrain_docs"] / n_all
    sft_hi = pre_hi + 2.5 * b["sft_train"] / n_all
    dpo_hi = sft_hi + 2.5 * b["dpo_train"] / n_all
    pools = {k: [] for k in ("val", "pre", "sft", "dpo")}
    total = 0
    with gzip.open(POEMS, "rt", encoding="utf-8") as f:
        for line in f:
            p = json.loads(line)
            total += 1
            u = unit_hash(p["id"])
            if u >= dpo_hi:
                continue
            p["u"], p["form"] = u, form_of(p)
            key = "val" if u < VAL_SHARE else "pre" if u < pre_hi else "sft" if u < sft_hi else "dpo"
            if key in ("sft", "dpo") and not p["form"]:
                continue
            pools[key].append(p)
    for pool in pools.values():
        pool.sort(key=lambda p: p["u"])

    def document(p):
        return {"text": f"《{p['title']}》{p['author']}\n{p['text']}"}

    def fits(record, seq):
        # Rows are cut at --max-seq-len; a poem cut short would teach an answer that never ends.
        return len(tokenizer.encode_chat(record["conversations"], add_generation_prompt=False)) < seq

    sft_seq, reason_seq = b["sft"]["max_seq_len"], b["reason"]["max_seq_len"]
    usable = lambda p: fits(sft_record(p), sft_seq) and fits(reason_record(p), reason_seq)  # noqa: E731
    val_regular = [p for p in pools["val"] if p["form"] and usable(p)]
    sft_val = val_regular[:b["sft_val"]]
    dpo_val_poems = val_regular[b["sft_val"]:b["sft_val"] + b["dpo_val"]]
    sft_train = [p for p in pools["sft"] if usable(p)][:b["sft_train"]]
    dpo_poems = [p for p in pools["dpo"] if usable(p)][:b["dpo_train"]]

    def pairs(poems, seed):
        rng = random.Random(seed)
        by_form = collections.defaultdict(list)
        for p in poems:
            by_form[p["form"]].append(p)
        out = []
        for p in poems:
            same = by_form[p["form"]]
            donor = same[(same.index(p) + 1 + rng.randrange(max(len(same) - 1, 1))) % len(same)] \
                if len(same) > 1 else p
            out.append(dpo_record(p, donor, rng))
        return out

    d = work / "data"
    paths = {
        "pretrain_train": d / "pretrain_train.jsonl", "pretrain_val": d / "pretrain_val.jsonl",
        "sft_train": d / "sft_train.jsonl", "sft_val": d / "sft_val.jsonl",
        "dpo_train": d / "dpo_train.jsonl", "dpo_val": d / "dpo_val.jsonl",
        "reason_train": d / "reason_train.jsonl", "reason_val": d / "reason_val.jsonl",
    }
    counts = {
        "pretrain_train": write_jsonl(paths["pretrain_train"], map(document, pools["pre"][:b["pretrain_docs"]])),
        "pretrain_val": write_jsonl(paths["pretrain_val"], map(document, pools["val"][:b["pretrain_val"]])),
        "sft_train": write_jsonl(paths["sft_train"], map(sft_record, sft_train)),
        "sft_val": write_jsonl(paths["sft_val"], map(sft_record, sft_val)),
        "dpo_train": write_jsonl(paths["dpo_train"], pairs(dpo_poems, 1)),
        "dpo_val": write_jsonl(paths["dpo_val"], pairs(dpo_val_poems, 2)),
        "reason_train": write_jsonl(paths["reason_train"], map(reason_record, sft_train)),
        "reason_val": write_jsonl(paths["reason_val"], map(reason_record, sft_val)),
    }
    # The reference poems of the held-out prompts, by 1-based line of sft_val/reason_val (evaluate's `line`).
    references = {i + 1: p["text"] for i, p in enumerate(sft_val)}
    forms = collections.Counter(p["form"] for p in sft_train)
    return {"paths": paths, "counts": counts, "references": references, "poems_read": total,
            "held_out_poems": len(pools["val"]), "sft_forms": dict(forms), "seconds": time.perf_counter() - start}


def unigram_baseline(tokenizer, train: Path, val: Path) -> dict:
    """Bits/char of an add-one unigram token model fit on `train`, on `val`: documents tokenised as the
    pretraining scorer sees them (text tokens, then the <|endoftext|> that ends each document; the separator
    adds nats but no characters), total nats / ln 2 / characters."""
    import numpy as np
    sep = tokenizer.token_to_id("<|endoftext|>")
    counts = np.ones(tokenizer.vocab_size, dtype=np.float64)  # add-one
    for line in open(train, encoding="utf-8"):
        ids = tokenizer.encode(json.loads(line)["text"]) + [sep]
        np.add.at(counts, ids, 1)
    logp = np.log(counts / counts.sum())
    char_counts = tokenizer.token_char_counts()
    nats = chars = tokens = 0
    for line in open(val, encoding="utf-8"):
        ids = tokenizer.encode(json.loads(line)["text"]) + [sep]
        nats -= float(logp[ids].sum())
        chars += int(char_counts[ids].sum())
        tokens += len(ids)
    return {"bits_per_char": nats / math.log(2) / chars, "loss": nats / tokens, "tokens": tokens, "chars": chars,
            "train_tokens": int(counts.sum() - len(counts))}


# ------------------------------------------------------------------------------------------------ stages


def train_args(stage: str, data: Path, val: Path, out: Path, hp: dict, extra: list[str]) -> list[str]:
    args = [f"stages/{stage}.py", "--no-ray", "--data", data, "--val-data", val, "--out", out,
            "--max-seq-len", hp["max_seq_len"], "--batch-size", hp["batch_size"], "--max-steps", hp["max_steps"],
            "--lr", hp["lr"], "--eval-interval", hp["eval_interval"], "--log-interval", hp["eval_interval"],
            "--epochs", 100,   # --max-steps decides the length; epochs only must not end the run first
            "--cache-dir", out.parent / "data_cache", *extra]
    return [str(a) for a in args]


# Evaluation scores one document per forward pass (small matmuls): on this shared 2-core machine one torch
# thread was 2.6x faster than two (measured: the same DPO evaluation 2.8 s vs 7.2 s), since the second thread
# mostly waits for a core. Training's larger matmuls gain from two threads (tiny: 11.3k vs 5.6k tok/s), so
# the stages keep torch's default.
EVAL_THREADS = 1


def eval_args(model: Path, data: Path, fmt: str, out: Path, extra: list[str] = ()) -> list[str]:
    return [str(a) for a in ["stages/evaluate.py", "--no-ray", "--model", model, "--data", data, "--format", fmt,
                             "--out", out, *extra]]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def val_curve(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: r[k] for k in ("step", "tokens", "loss", "val_loss", "val_bits_per_char") if k in r}
            for r in rows if "val_loss" in r]


def structure_of(report: dict, references: dict, reasoning: bool) -> dict:
    """Line structure of the generated answers (for reasoning replies: the text inside <answer>...</answer>)."""
    oks = {"ok": 0, "lines_ok": 0, "lengths_ok": 0}
    for s in report["samples"]:
        text = s["output"]
        if reasoning:
            m = re.search(r"<answer>(.*?)(</answer>|$)", text, re.DOTALL)
            text = m.group(1) if m else ""
        r = line_structure(text, references[s["line"]])
        for k in oks:
            oks[k] += r[k]
    n = len(report["samples"])
    return {k: v / n for k, v in oks.items()} | {"n": n}


# ------------------------------------------------------------------------------------------------ report


def plot_pretrain(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, color in (("tiny", "tab:blue"), ("small", "tab:orange")):
        run = results["pretrain"][name]
        xs = [p["tokens"] for p in run["curve"]]
        ys = [p["val_bits_per_char"] for p in run["curve"]]
        ax.plot(xs, ys, marker="o", color=color, label=f"{name} ({run['params'] / 1e6:.1f}M params): val bits/char")
    ax.axhline(results["unigram"]["bits_per_char"], color="gray", linestyle="--",
               label=f"unigram baseline ({results['unigram']['bits_per_char']:.2f})")
    ax.set_xlabel("tokens seen")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("held-out bits per character")
    ax.set_title("Pretraining on classical Chinese poetry (held-out poems)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_finetune(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    panels = [(stage, ylabel) for stage, ylabel in (("sft", "assistant-only val loss (nats/token)"),
                                                    ("dpo", "val DPO loss"), ("reason", "val loss (tags x10)"))
              if stage in results]
    fig = Figure(figsize=(3.7 * max(len(panels), 1), 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (stage, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        curve = results[stage]["curve"]
        ax.plot([p["step"] for p in curve], [p["val_loss"] for p in curve], marker="o", label="val")
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", alpha=0.6, label="train")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def markdown(results: dict) -> str:
    u, pre, sft, dpo, rsn = (results.get(k) for k in ("unigram", "pretrain", "sft", "dpo", "reason"))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"# Quality chain ({results['budget']} run: its steps took {results['steps_seconds'] / 60:.1f} min; "
             f"this invocation {results['wall_seconds'] / 60:.1f} min)", "",
             f"Command: `{results['command']}`", "",
             "## Pretraining: held-out bits per character", "",
             "| model | params | steps | tokens seen | val bits/char (training, last) | evaluate bits/char | "
             "vs unigram |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("tiny", "small"):
        r = pre[name]
        last = r["curve"][-1]
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {last['step']} | {last['tokens']:,} | "
                     f"{last['val_bits_per_char']:.3f} | {r['eval']['bits_per_char']:.3f} | "
                     f"{r['eval']['bits_per_char'] - u['bits_per_char']:+.3f} |")
    lines.append(f"| unigram (add-one, {u['train_tokens']:,} train tokens) | - | - | - | - | "
                 f"{u['bits_per_char']:.3f} | 0 |")
    lines += ["", "Validation curve (tokens seen -> val bits/char):", ""]
    for name in ("tiny", "small"):
        pts = ", ".join(f"{p['tokens'] / 1e3:.0f}k: {p['val_bits_per_char']:.3f}" for p in pre[name]["curve"])
        lines.append(f"- {name}: {pts}")
    missing = [k for k in ("sft", "dpo", "reason") if k not in results]
    if missing:
        lines += ["", f"**Not run (--until {results['until']}): {', '.join(missing)}.**"]
    if sft:
        lines += ["", "## SFT (poem from title/author/form prompts), held-out poems", "",
                  "| model | assistant-only loss | bits/char | right line structure | right line count | "
                  "every line right length |", "| --- | --- | --- | --- | --- | --- |"]
        for key, label in (("before", "pretrained tiny (before)"), ("after", "SFT (after)")):
            e, s = sft[key], sft[f"structure_{key}"]
            lines.append(f"| {label} | {e['loss']:.3f} | {e['bits_per_char']:.3f} | {pct(s['ok'])} of {s['n']} | "
                         f"{pct(s['lines_ok'])} | {pct(s['lengths_ok'])} |")
    if dpo:
        lines += ["", "## DPO (real poem vs reordered + 20%-substituted poem), held-out pairs", "",
                  "| model | preference accuracy, reference-free | accuracy vs SFT reference (DPO reward) | "
                  "margin vs reference |", "| --- | --- | --- | --- |",
                  f"| SFT (before) | {pct(dpo['before']['preference_accuracy'])} | 0% by construction | 0 |",
                  f"| DPO (after) | {pct(dpo['after_free']['preference_accuracy'])} | "
                  f"{pct(dpo['after_ref']['preference_accuracy'])} | {dpo['after_ref']['margin']:.4f} |"]
    if rsn:
        lines += ["", "## Reasoning distillation (<think>/<answer>), held-out prompts", "",
                  "| model | well-formed greedy replies | finished (end token) | answer line structure | val loss |",
                  "| --- | --- | --- | --- | --- |"]
        for key, label in (("before", "DPO (before)"), ("after", "reason (after)")):
            e, s = rsn[key], rsn[f"structure_{key}"]
            lines.append(f"| {label} | {pct(e['well_formed'])} of {e['generated']} | {pct(e['finished'])} | "
                         f"{pct(s['ok'])} | {e['loss']:.3f} |")
    lines += ["", "## Sample greedy replies (first held-out prompts)", ""]
    for stage, key in (("sft", "after"), ("reason", "after")):
        for s in results.get(stage, {}).get(key, {}).get("samples", [])[:2]:
            lines.append(f"- {stage} {key}: `{s['prompt']}` -> `{json.dumps(s['output'], ensure_ascii=False)[1:-1][:300]}`")
    lines += ["", "## Wall times", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {c['name']} | {c['seconds']:.0f}" + (" (recorded by an earlier, interrupted invocation)" if
                                                       c.get("reused") else "") + " |" for c in results["commands"]]
    lines += [f"| data build | {results['data']['seconds']:.0f} |", f"| unigram | {u['seconds']:.0f} |",
              f"| **total** (sum of the steps) | {results['steps_seconds']:.0f} |", "", "## Commands", ""]
    lines += [f"- `{c['command']}`" for c in results["commands"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main

STAGES = ("pretrain", "sft", "dpo", "reason")


def write_report(results: dict, run: "Runner", results_dir: Path, stem: str, t0: float) -> None:
    results["commands"] = run.commands
    results["wall_seconds"] = time.perf_counter() - t0
    # With --reuse some steps ran in an earlier invocation: their recorded times add up to the chain's cost.
    results["steps_seconds"] = (sum(c["seconds"] for c in run.commands) + results["data"]["seconds"]
                                + results["unigram"]["seconds"])
    plot_pretrain(results, results_dir / f"{stem}_pretrain.png")
    if any(k in results for k in STAGES[1:]):
        plot_finetune(results, results_dir / f"{stem}_finetune.png")
    md = markdown(results)
    (results_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n",
                                              encoding="utf-8")
    print("\n" + md)
    print(f"wrote {results_dir / stem}.json, .md, _pretrain.png" + (", _finetune.png" if "sft" in results else ""),
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "quality_chain"),
                    help="derived data, checkpoints and logs (default runs/quality_chain, git-ignored)")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--quick", action="store_const", const="quick", dest="budget", help="= --budget quick")
    ap.add_argument("--until", choices=STAGES, default="reason",
                    help="stop after this stage and report what ran (with --reuse: the report of finished steps)")
    ap.add_argument("--reuse", action="store_true",
                    help="skip steps whose identical command already succeeded in --work-dir (after an interruption)")
    ap.add_argument("--results", default="", help="where the json/md/png go (default: bench/results for the full "
                    "run, WORK-DIR/quick/results for --quick, so a smoke run never overwrites the figures)")
    args = ap.parse_args(argv)
    b = BUDGETS[args.budget]
    work = Path(args.work_dir).resolve() / args.budget
    results_dir = Path(args.results or (REPO / "bench" / "results" if args.budget == "full" else work / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "quality_chain" if args.budget == "full" else f"quality_chain_{args.budget}"
    t0 = time.perf_counter()

    from minimind.config import get_preset
    from minimind.model import MiniMind
    from minimind.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_file(TOKENIZER)
    run = Runner(work, reuse=args.reuse)
    results = {"budget": args.budget, "command": " ".join([".venv/bin/python", "bench/quality_chain.py",
                                                           *(["--quick"] if args.budget == "quick" else [])]),
               "budgets": b, "corrupt_rate": CORRUPT_RATE, "val_share": VAL_SHARE, "until": args.until}

    def done(stage: str) -> bool:
        """After `stage`: with --until STAGE, write the report of what ran and stop."""
        if args.until != stage:
            return False
        write_report(results, run, results_dir, stem, t0)
        return True

    data = build_data(work, b, tokenizer)
    p = data["paths"]
    results["data"] = {k: v for k, v in data.items() if k not in ("paths", "references")} | {
        "paths": {k: str(v) for k, v in p.items()}}
    print(f"data: {data['counts']} in {data['seconds']:.0f} s; SFT forms {data['sft_forms']}", flush=True)

    start = time.perf_counter()
    results["unigram"] = unigram_baseline(tokenizer, p["pretrain_train"], p["pretrain_val"])
    results["unigram"]["seconds"] = time.perf_counter() - start
    print(f"unigram baseline: {results['unigram']['bits_per_char']:.3f} bits/char", flush=True)

    # 1. Pretraining: tiny (the chain's model) and small (the real MiniMind2-small size).
    ck = work / "ckpt"
    results["pretrain"] = {}
    for preset in ("tiny", "small"):
        out = ck / f"pretrain_{preset}"
        run(f"pretrain_{preset}", train_args("pretrain", p["pretrain_train"], p["pretrain_val"], out, b[preset],
                                             ["--preset", preset, "--tokenizer", TOKENIZER, "--warmup", 0.05]))
        run(f"eval_pretrain_{preset}", eval_args(out, p["pretrain_val"], "pretrain", work / f"eval_pretrain_{preset}.json"))
        results["pretrain"][preset] = {
            "params": sum(x.numel() for x in MiniMind(get_preset(preset)).parameters()),
            "curve": val_curve(out), "eval": read_json(work / f"eval_pretrain_{preset}.json"),
            "hparams": b[preset]}
    if done("pretrain"):
        return

    # 2. SFT from the tiny pretrain.
    gen = ["--generate", b["generate"], "--samples", b["generate"]]
    pre_tiny, sft_out = ck / "pretrain_tiny", ck / "sft"
    run("eval_sft_before", eval_args(pre_tiny, p["sft_val"], "chat", work / "eval_sft_before.json",
                                     gen + ["--max-new-tokens", 128]))
    run("sft", train_args("sft", p["sft_train"], p["sft_val"], sft_out, b["sft"], ["--init", pre_tiny]))
    run("eval_sft_after", eval_args(sft_out, p["sft_val"], "chat", work / "eval_sft_after.json",
                                    gen + ["--max-new-tokens", 128]))
    results["sft"] = {"curve": val_curve(sft_out), "hparams": b["sft"]}
    for key in ("before", "after"):
        report = read_json(work / f"eval_sft_{key}.json")
        results["sft"][key] = report
        results["sft"][f"structure_{key}"] = structure_of(report, data["references"], reasoning=False)
    if done("sft"):
        return

    # 3. DPO from SFT (the reference is the SFT model, the stage's default: --init).
    dpo_out = ck / "dpo"
    run("eval_dpo_before", eval_args(sft_out, p["dpo_val"], "dpo", work / "eval_dpo_before.json"))
    run("dpo", train_args("dpo", p["dpo_train"], p["dpo_val"], dpo_out, b["dpo"], ["--init", sft_out]))
    run("eval_dpo_after_free", eval_args(dpo_out, p["dpo_val"], "dpo", work / "eval_dpo_after_free.json"))
    run("eval_dpo_after_ref", eval_args(dpo_out, p["dpo_val"], "dpo", work / "eval_dpo_after_ref.json",
                                        ["--reference", sft_out]))
    results["dpo"] = {"curve": val_curve(dpo_out), "hparams": b["dpo"],
                      "before": read_json(work / "eval_dpo_before.json"),
                      "after_free": read_json(work / "eval_dpo_after_free.json"),
                      "after_ref": read_json(work / "eval_dpo_after_ref.json")}
    if done("dpo"):
        return

    # 4. Reasoning distillation from DPO.
    reason_out = ck / "reason"
    rgen = ["--generate", b["generate"], "--samples", b["generate"], "--max-new-tokens", 192]
    run("eval_reason_before", eval_args(dpo_out, p["reason_val"], "reason", work / "eval_reason_before.json", rgen))
    run("reason", train_args("reason", p["reason_train"], p["reason_val"], reason_out, b["reason"],
                             ["--init", dpo_out]))
    run("eval_reason_after", eval_args(reason_out, p["reason_val"], "reason", work / "eval_reason_after.json", rgen))
    results["reason"] = {"curve": val_curve(reason_out), "hparams": b["reason"]}
    for key in ("before", "after"):
        report = read_json(work / f"eval_reason_{key}.json")
        results["reason"][key] = report
        results["reason"][f"structure_{key}"] = structure_of(report, data["references"], reasoning=True)

    write_report(results, run, results_dir, stem, t0)


if __name__ == "__main__":
    main()
