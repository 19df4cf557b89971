"""The evaluate stage: a checkpoint scored on held-out documents, spread over the Ray cluster.

    records --driver: cluster.ingest.iter_records, minimind.scoring.parse_record (bad lines -> rejects)-->
    Ray Data `map_batches` over an actor pool of `EvalWorker`s (one model per actor, a GPU each when the
    cluster has them) --> one row of float64 sums per document --> reduced on the driver.

`--no-ray` calls the same `EvalWorker` on the same records in this process. Every number is a per-document
sum computed by `minimind.scoring` from that document alone, and the reduction adds them with math.fsum after
sorting by (file, line), so both paths give bit-identical reports whatever the actors' order or split.

Report keys (also printed as a table): model, data, format, window, records, rejected, tokens, chars, loss
(nats per scored token), perplexity (exp(loss)), bits_per_char (total nats / ln 2 / characters the scored
targets cover), rejects, seconds, ray; chat and reason add loss_all_tokens and tokens_all (every token of the
conversation, not only the assistant's); dpo adds reference, beta, pairs, preference_accuracy, margin (mean
beta * [(pi - ref)(chosen) - (pi - ref)(rejected)] on length-averaged log-probs, as training's dpo_loss),
dpo_loss and rejected_loss; with --generate N: generated, finished (ended with the end token), well_formed
(reason: the share of `<think>...</think><answer>...</answer>` replies) and samples.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from minimind.formats import FORMATS, Reject, RecordError

ITEM_KEYS = ("file", "line", "record")
NUMBERS = {  # the numeric columns a worker returns, per task and format
    "pretrain": ("tokens", "nats", "chars"),
    "chat": ("tokens", "nats", "chars", "all_tokens", "all_nats"),
    "dpo": ("tokens", "nats", "chars", "rejected_tokens", "rejected_nats", "rejected_chars", "policy_chosen",
            "policy_rejected", "ref_chosen", "ref_rejected", "margin", "dpo_loss", "correct"),
    "generate": ("new_tokens", "finished", "well_formed"),
}
NUMBERS["reason"] = NUMBERS["chat"]
COUNTS = {"tokens", "chars", "all_tokens", "rejected_tokens", "rejected_chars", "correct", "new_tokens", "finished",
          "well_formed"}  # integers, carried as float64 like the rest
TEXTS = {"generate": ("prompt", "output")}


def _help(text: str, default, **meta):
    return field(default=default, metadata={"help": text, **meta})


@dataclass
class EvalConfig:
    model: str = _help("checkpoint directory to evaluate", "", path=True)
    data: tuple[str, ...] = _help("jsonl(.gz) files, directories, globs or pyarrow URIs", (), path=True)
    format: str = _help("record format of --data", "pretrain", choices=list(FORMATS))
    max_seq_len: int = _help("window: tokens per forward pass; longer documents are scored in strided "
                             "windows (0: the model's maximum, at most 512)", 0)
    generate: int = _help("greedy replies to generate (chat, reason): from --prompts or the first N records", 0)
    prompts: str = _help("jsonl of prompts for --generate: {\"prompt\": ...} or chat records", "", path=True)
    max_new_tokens: int = _help("token limit of each generated reply", 256)
    samples: int = _help("generated replies to include in the report", 4)
    reference: str = _help("dpo: the reference checkpoint ('' = compare the policy's own log-probs)", "",
                           path=True)
    beta: float = _help("dpo: the beta of the reported margin and loss", 0.1)
    tokenizer: str = _help("tokenizer directory or tokenizer.json ('' = the --model checkpoint's)", "", path=True)
    pack: bool = _help("pretrain: score documents as packed training sees them (<|endoftext|> text "
                       "<|endoftext|>); --no-pack: MiniMind's <|im_start|> text <|im_end|>", True)
    text_field: str = _help("field holding the text in pretrain records", "text")
    reject_threshold: float = _help("stop when more than this fraction of records is rejected", 0.01)
    out: str = _help("write the report as JSON here ('' = print only)", "", path=True)
    documents: str = _help("write one JSON line per scored document here ('' = none)", "", path=True)
    ray: bool = _help("score on Ray Data actors; --no-ray scores in this process (same numbers)", True)
    workers: int = _help("actors (0: one per GPU, else half the cluster's CPUs)", 0)
    cpus_per_worker: float = _help("CPUs reserved per actor", 1.0)
    batch_size: int = _help("records per map_batches batch", 16)

    def validate(self):
        if not self.model:
            raise ValueError("--model is required: the checkpoint directory to evaluate")
        if not Path(self.model).is_dir():
            raise ValueError(f"--model {self.model}: no such checkpoint directory")
        if not self.data:
            raise ValueError("--data is required: the documents to score")
        if self.format not in FORMATS:
            raise ValueError(f"unknown --format {self.format!r}; choose one of {FORMATS}")
        for name in ("max_seq_len", "generate", "workers", "samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.max_seq_len == 1:
            raise ValueError("--max-seq-len must be at least 2 (0: the model's)")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.cpus_per_worker <= 0:
            raise ValueError("--batch-size, --max-new-tokens and --cpus-per-worker must be positive")
        if not 0 <= self.reject_threshold <= 1:
            raise ValueError("--reject-threshold must be within [0, 1]")
        if self.generate and self.format not in ("chat", "reason"):
            raise ValueError(f"--generate replies to conversations: use --format chat or reason, not {self.format}")
        if self.prompts and not self.generate:
            raise ValueError("--prompts needs --generate N")
        if self.reference and self.format != "dpo":
            raise ValueError("--reference is for --format dpo")
        for name in ("reference", "prompts"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise ValueError(f"--{name} {value}: no such file or directory")

    def for_driver(self) -> "EvalConfig":
        """Path flags made absolute: the actors run in other directories. URIs stay as they are."""
        def fix(value: str) -> str:
            return value if not value or "://" in value else str(Path(value).expanduser().absolute())
        return replace(self, data=tuple(fix(p) for p in self.data),
                       **{f: fix(getattr(self, f)) for f in ("model", "prompts", "reference", "tokenizer",
                                                             "out", "documents")})


# ------------------------------------------------------------------------------------------------- workers


def load_tokenizer(model: str, tokenizer: str = ""):
    from minimind.tokenizer import Tokenizer
    path = Path(tokenizer or model)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: has no tokenizer.json; give --tokenizer")
        return Tokenizer.from_dir(path)
    return Tokenizer.from_file(path)


class EvalWorker:
    """A Ray Data callable class: one model (and dpo reference) per actor, loaded once. Each batch holds
    records as JSON text with their file and line; each output row holds that record's numbers, or an
    `error` (a record that only fails when tokenised, such as a chat template refusing it)."""

    def __init__(self, task: str, model: str, fmt: str, window: int, tokenizer: str = "", reference: str = "",
                 beta: float = 0.1, pack: bool = True, text_field: str = "text", max_new_tokens: int = 256):
        import torch
        from minimind.checkpoint import load_model
        from minimind.scoring import Scorer
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides the GPUs of a CPU actor
        load = lambda path: load_model(path, device=device, dtype=torch.float32).eval()  # noqa: E731
        self.task, self.fmt, self.max_new_tokens = task, fmt, max_new_tokens
        self.tokenizer = load_tokenizer(model, tokenizer)
        self.model = load(model)
        self.scorer = Scorer(self.model, self.tokenizer, fmt, window, load(reference) if reference else None,
                             beta, pack, text_field) if task == "score" else None

    def _one(self, record) -> dict:
        from minimind.scoring import greedy_reply, prompt_messages
        if self.task == "score":
            return self.scorer.score(record)
        return greedy_reply(self.model, self.tokenizer, prompt_messages(record), self.max_new_tokens)

    def __call__(self, batch: dict) -> dict:
        key = self.task if self.task == "generate" else self.fmt
        numbers, texts = NUMBERS[key], TEXTS.get(key, ())
        out = {k: [] for k in ("file", "line", "error", *numbers, *texts)}
        for file, line, raw in zip(batch["file"], batch["line"], batch["record"]):
            try:
                row, error = self._one(json.loads(str(raw))), ""
            except RecordError as e:
                row, error = {}, str(e)
            out["file"].append(str(file))
            out["line"].append(int(line))
            out["error"].append(error)
            for k in numbers:
                out[k].append(float(row.get(k, 0.0)))  # float64 columns: a sum round-trips Arrow exactly
            for k in texts:
                out[k].append(row.get(k, ""))
        return out


def _actors(ray, cfg: EvalConfig, batches: int) -> tuple[int, int]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has GPUs, else half its CPUs (the other
    half stays free for Ray Data's own tasks), never more than there are batches."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n = cfg.workers or (gpus if gpus else max(1, int(resources.get("CPU", 1) / cfg.cpus_per_worker) // 2))
    return max(1, min(n, batches)), 1 if gpus else 0


def run_workers(items: list[dict], kwargs: dict, cfg: EvalConfig) -> list[dict]:
    """Every item through `EvalWorker(**kwargs)`: on Ray Data actors, or in this process with --no-ray."""
    if not items:
        return []
    batches = -(-len(items) // cfg.batch_size)
    if not cfg.ray:
        worker = EvalWorker(**kwargs)
        rows = []
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start:start + cfg.batch_size]
            out = worker({k: np.array([item[k] for item in chunk]) for k in ITEM_KEYS})
            rows.extend(dict(zip(out, values)) for values in zip(*out.values()))
        return rows
    import ray.data
    from cluster.runtime import init_ray
    init_ray()
    actors, gpus = _actors(ray, cfg, batches)
    ds = ray.data.from_items(items, override_num_blocks=min(batches, 4 * actors))
    ds = ds.map_batches(EvalWorker, fn_constructor_kwargs=kwargs, batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_worker,
                        num_gpus=gpus)
    return [{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()} for row in ds.take_all()]


# ------------------------------------------------------------------------------------------------- driver


def read_items(paths, parse) -> tuple[list[dict], list[Reject]]:
    """The records of `paths` as worker items, and the lines that cannot be one (bad JSON, a wrong record)."""
    from cluster.ingest import iter_records
    items, rejects = [], []
    for file, line, record in iter_records(paths):
        try:
            if isinstance(record, RecordError):
                raise record
            parse(record)
        except RecordError as e:
            message = str(e).removeprefix(f"{file}:{line}: ")  # iter_records already names file and line
            rejects.append(Reject(file, line, message, "" if isinstance(record, RecordError) else
                                  json.dumps(record, ensure_ascii=False)[:200]))
            continue
        items.append({"file": file, "line": line, "record": json.dumps(record, ensure_ascii=False)})
    return items, rejects


def check_rejects(records: int, rejects: list[Reject], threshold: float, what) -> None:
    total = records + len(rejects)
    if total == 0:
        raise ValueError(f"no records found in {what}")
    if len(rejects) / total > threshold:
        first = rejects[0]
        raise ValueError(f"{len(rejects)} of {total} records ({len(rejects) / total:.2%}) were rejected, above the "
                         f"threshold of {threshold:.2%} (--reject-threshold). First: {first.file}:{first.line}: "
                         f"{first.error}")


@dataclass
class Report:
    summary: dict                 # what --out receives
    documents: list[dict]         # one row per scored record, sorted by (file, line)


def reduce_rows(fmt: str, rows: list[dict]) -> dict:
    """The report's figures from per-document rows: sums (fsum: exact, order-free), then one division."""
    tokens, chars = sum(int(r["tokens"]) for r in rows), sum(int(r["chars"]) for r in rows)
    if tokens == 0:
        raise ValueError("no token was scored")
    nats = math.fsum(r["nats"] for r in rows)
    loss = nats / tokens
    out = {"records": len(rows), "tokens": tokens, "chars": chars, "loss": loss, "perplexity": math.exp(loss),
           "bits_per_char": nats / math.log(2) / chars if chars else None}
    if fmt in ("chat", "reason"):
        all_tokens = sum(int(r["all_tokens"]) for r in rows)
        out.update(loss_all_tokens=math.fsum(r["all_nats"] for r in rows) / all_tokens, tokens_all=all_tokens)
    if fmt == "dpo":
        n = len(rows)
        rejected = sum(int(r["rejected_tokens"]) for r in rows)
        out.update(pairs=n, preference_accuracy=sum(int(r["correct"]) for r in rows) / n,
                   margin=math.fsum(r["margin"] for r in rows) / n,
                   dpo_loss=math.fsum(r["dpo_loss"] for r in rows) / n,
                   rejected_loss=math.fsum(r["rejected_nats"] for r in rows) / rejected)
    return out


def _split(rows: list[dict], rejects: list[Reject]) -> list[dict]:
    """Rows sorted by (file, line); the failed ones moved to `rejects`."""
    good = []
    for row in sorted(rows, key=lambda r: (r["file"], r["line"])):
        if row["error"]:
            rejects.append(Reject(row["file"], row["line"], row["error"], ""))
        else:
            good.append({k: int(v) if k in COUNTS else v for k, v in row.items() if k != "error"})
    return good


def evaluate(cfg: EvalConfig) -> Report:
    """Score `cfg.data` with `cfg.model` (see the module docstring). Raises ValueError / FileNotFoundError on
    user errors, naming the file and line of bad records."""
    from minimind.checkpoint import load_config
    from minimind.scoring import parse_record, prompt_messages
    start = time.perf_counter()
    cfg = cfg.for_driver()
    cfg.validate()
    model_cfg = load_config(cfg.model)
    limit = model_cfg.max_position_embeddings
    window = cfg.max_seq_len or min(512, limit)
    if window > limit:
        raise ValueError(f"--max-seq-len {window} exceeds the model's context of {limit} tokens")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model_cfg.vocab_size}")
    if cfg.reference and load_config(cfg.reference).vocab_size != model_cfg.vocab_size:
        raise ValueError(f"--reference {cfg.reference} has another vocabulary than --model {cfg.model}")

    items, rejects = read_items(cfg.data, lambda r: parse_record(cfg.format, r, cfg.text_field))
    check_rejects(len(items), rejects, cfg.reject_threshold, list(cfg.data))
    common = dict(model=cfg.model, fmt=cfg.format, window=window, tokenizer=cfg.tokenizer)
    rows = run_workers(items, dict(common, task="score", reference=cfg.reference, beta=cfg.beta, pack=cfg.pack,
                                   text_field=cfg.text_field), cfg)
    documents = _split(rows, rejects)
    check_rejects(len(documents), rejects, cfg.reject_threshold, list(cfg.data))
    summary = {"model": cfg.model, "data": list(cfg.data), "format": cfg.format, "window": window,
               "rejected": len(rejects), **reduce_rows(cfg.format, documents)}
    if cfg.format == "dpo":
        summary.update(reference=cfg.reference or None, beta=cfg.beta)

    if cfg.generate:
        if cfg.prompts:
            prompts, bad = read_items([cfg.prompts], prompt_messages)
            check_rejects(len(prompts), bad, cfg.reject_threshold, cfg.prompts)
            rejects += bad
        else:
            scored = {(d["file"], d["line"]) for d in documents}
            prompts = [item for item in items if (item["file"], item["line"]) in scored]
        replies = _split(run_workers(prompts[:cfg.generate], dict(common, task="generate",
                                                                  max_new_tokens=cfg.max_new_tokens), cfg), rejects)
        summary.update(generated=len(replies), finished=_share(replies, "finished"),
                       samples=[{k: r[k] for k in ("file", "line", "prompt", "output", "well_formed")}
                                for r in replies[:cfg.samples]])
        if cfg.format == "reason":
            summary["well_formed"] = _share(replies, "well_formed")
    rejects.sort(key=lambda r: (r.file, r.line))
    summary.update(rejects=[{"file": r.file, "line": r.line, "error": r.error} for r in rejects],
                   ray=cfg.ray, seconds=round(time.perf_counter() - start, 2))
    for r in rejects[:10]:
        print(f"rejected {r.file}:{r.line}: {r.error}", file=sys.stderr)
    if len(rejects) > 10:
        print(f"... and {len(rejects) - 10} more rejects (all listed in the report)", file=sys.stderr)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if cfg.documents:
        Path(cfg.documents).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.documents).write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents),
                                       encoding="utf-8")
    return Report(summary, documents)


def _share(rows: list[dict], key: str) -> float | None:
    return sum(int(r[key]) for r in rows) / len(rows) if rows else None


def format_table(summary: dict) -> str:
    """The report as aligned `name  value` lines, then the sample generations."""
    lines = []
    for key, value in summary.items():
        if key in ("samples", "rejects", "data"):
            continue
        if isinstance(value, float):
            value = f"{value:.4%}" if key in ("preference_accuracy", "well_formed", "finished") else f"{value:.6g}"
        lines.append(f"{key:<20} {value}")
    for s in summary.get("samples", []):
        lines.append(f"--- {Path(s['file']).name}:{s['line']}  well_formed={bool(s['well_formed'])}")
        lines.append(f"prompt: {s['prompt']}")
        lines.append(f"output: {json.dumps(s['output'], ensure_ascii=False)}")
    return "\n".join(lines)
