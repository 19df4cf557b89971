"""The end of a sweep: a table (console, CSV, JSON), loss vs tokens seen per trial (PNG) and the best
trial's config as a file `stages/<stage>.py --config` accepts.

Trials are ranked at equal tokens seen, on the sweep's metric: `val_loss` when the stage validates (held-out
loss, reported on evaluation steps only), else training `loss`. Each trial's score is its last measured
value at or before the fewest tokens any complete trial reached. A trial is complete when it ran all its
steps: it reached max_steps, ran out of data first (its final model was exported), or reached ASHA's
max tokens. Trials ASHA stopped before that are listed but not ranked.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tune.space import PER_TRIAL
from tune.trial import TRIAL_KEY, trial_config, trial_out, trial_params, workers

# Left out of the best config: they name this sweep's directories, not the recipe.
NOT_RECIPE = PER_TRIAL | {"cache_dir"}


@dataclass
class TrialRun:
    """What the report needs of one trial, whatever ran it."""
    trial_id: str
    params: dict            # the config fields this trial set
    cfg: object             # its full config
    records: list[dict]     # reports in order: step, tokens, loss and, on evaluation steps, val_loss
    finished: bool          # its run returned (the final model was exported)
    ended: bool             # Tune ended it (finished, or stopped by the scheduler); False: interrupted
    error: str | None = None
    name: str = ""          # a built-in experiment's trial name
    path: str = ""


def status(t: TrialRun, max_tokens: int = 0) -> str:
    if t.error is not None:
        return "error"
    if not t.records:
        return "not started"
    last = t.records[-1]
    complete = (t.finished or (t.cfg.max_steps and last["step"] >= t.cfg.max_steps)
                or (max_tokens and last["tokens"] >= max_tokens))
    if complete:
        return "done"
    return "stopped early" if t.ended else "interrupted"


def curve(records: list[dict], metric: str) -> list[tuple[int, float]]:
    return [(r["tokens"], r[metric]) for r in records if r.get(metric) is not None]


def value_at(points, tokens: int):
    """The value of the last point at or before `tokens` seen: (tokens, value), or None."""
    before = [p for p in points if p[0] <= tokens]
    return before[-1] if before else None


def labels(trials: list[TrialRun]) -> list[str]:
    """A trial's label: its experiment name, else the parameters that differ between trials
    ("lr=0.001 warmup=0.1"); trial ids mean nothing to a reader."""
    keys = sorted({k for t in trials for k in t.params})
    varying = [k for k in keys if len({repr(t.params.get(k)) for t in trials}) > 1] or keys

    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    return [t.name or " ".join(f"{k}={fmt(t.params[k])}" for k in varying if k in t.params) or t.trial_id
            for t in trials]


def rank(trials: list[TrialRun], metric: str = "loss", max_tokens: int = 0) -> list[dict]:
    """One row per trial, best first; ranked rows carry `rank`."""
    rows = []
    for t, label in zip(trials, labels(trials)):
        cfg, last = t.cfg, (t.records[-1] if t.records else {})
        val = curve(t.records, "val_loss")
        rows.append({
            "trial": label, "trial_id": t.trial_id, "status": status(t, max_tokens),
            **{f"param.{k}": v for k, v in t.params.items()},
            "effective_batch": cfg.batch_size * cfg.accumulation_steps * workers(cfg),
            "steps": last.get("step", 0), "tokens": last.get("tokens", 0),
            "final_loss": last.get("loss"),
            **({"final_val_loss": val[-1][1] if val else None} if metric == "val_loss" or val else {}),
            "_train": curve(t.records, "loss"), "_val": val, "_score": curve(t.records, metric),
            "_cfg": cfg, "_dir": t.path, "_error": t.error,
        })
    done = [r for r in rows if r["status"] == "done" and r["_score"]]
    compare = min((r["_score"][-1][0] for r in done), default=0)
    for r in rows:
        r["compare_tokens"] = compare
        at = value_at(r["_score"], compare) if r in done else None
        r[f"{metric}_at_compare"] = at[1] if at else None
        if metric == "val_loss":
            r["val_tokens"] = at[0] if at else None  # where that val_loss was measured
    key = f"{metric}_at_compare"
    ranked = sorted((r for r in rows if r[key] is not None and math.isfinite(r[key])), key=lambda r: r[key])
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return sorted(rows, key=lambda r: r.get("rank", len(rows) + 1))


def _records(result) -> list[dict]:
    df = result.metrics_dataframe
    if df is None or "tokens" not in df or "loss" not in df:
        return []
    out = []
    for row in df.to_dict("records"):
        if row.get("tokens") is None or row.get("loss") is None or math.isnan(row["tokens"]):
            continue
        rec = {"step": int(row.get("step", 0)), "tokens": int(row["tokens"]), "loss": float(row["loss"])}
        v = row.get("val_loss")
        if v is not None and not math.isnan(v):
            rec["val_loss"] = float(v)
        out.append(rec)
    return out


def from_results(results, record: dict, base, sweep_dir: Path) -> list[TrialRun]:
    trials = []
    for result in results:
        params = trial_params(result.config, record["named_trials"])
        name = Path(result.path).name
        trial_id = (result.metrics or {}).get("trial_id") or "_".join(name.split("_")[2:4])
        cfg = trial_config(base, params, sweep_dir, trial_id, record["token_budget"], record["gpus_per_trial"])
        trials.append(TrialRun(
            trial_id=trial_id, params=params, cfg=cfg, records=_records(result),
            finished=(trial_out(sweep_dir, trial_id) / "trainer_state.json").is_file(),
            ended=bool((result.metrics or {}).get("done")),
            error=None if result.error is None else str(result.error).strip().splitlines()[-1][:300],
            name=result.config.get(TRIAL_KEY, ""), path=str(result.path)))
    return trials


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def format_table(rows: list[dict]) -> str:
    cols = []
    for r in rows:
        cols += [k for k in public(r) if k not in cols and k not in ("compare_tokens", "trial_id")]
    cells = [[("" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r[c]))
              for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])


def write_plot(rows: list[dict], path: Path) -> None:
    """Training loss (solid) and validation loss (dashed, one marker per evaluation) against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")  # no display on the cluster
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        if r["_train"]:
            tokens, losses = zip(*r["_train"])
            ax.plot(tokens, losses, color=color, label=f"{r['trial']} ({r['status']})",
                    marker="." if len(tokens) < 30 else None)
        if r["_val"]:
            tokens, losses = zip(*r["_val"])
            ax.plot(tokens, losses, color=color, linestyle="--", marker="o", markersize=4,
                    label=f"{r['trial']}: val")
    if rows and rows[0]["compare_tokens"]:
        ax.axvline(rows[0]["compare_tokens"], color="grey", linestyle=":", linewidth=1, label="compared here")
    ax.set_xlabel("tokens seen (all workers)")
    ax.set_ylabel("loss (nats per token); solid: train, dashed: validation")
    ax.set_title("loss vs tokens seen per trial")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_best_config(row: dict, stage: str, metric: str, path: Path) -> None:
    import yaml
    values = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(row["_cfg"]).items() if k not in NOT_RECIPE}
    header = (f"# Best trial {row['trial']} ({row['trial_id']}) of a Tune sweep: {metric} "
              f"{row[f'{metric}_at_compare']:.4f} at {row['compare_tokens']:,} tokens.\n"
              f"# Train it: python stages/{stage}.py --config {path.name}\n")
    path.write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")


def write_report(results, record: dict, base, sweep_dir: Path) -> list[dict]:
    metric = record.get("metric", "loss")
    rows = rank(from_results(results, record, base, sweep_dir), metric, record.get("max_tokens", 0))
    return write_rows(rows, record["stage"], metric, sweep_dir)


def write_rows(rows: list[dict], stage: str, metric: str, sweep_dir: Path) -> list[dict]:
    print("\n" + format_table(rows), flush=True)
    for r in rows:
        if r["_error"]:
            print(f"{r['trial']}: {r['_error']}", flush=True)
    with open(sweep_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        fields = []
        for r in rows:
            fields += [k for k in public(r) if k not in fields]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(public(r) for r in rows)
    (sweep_dir / "results.json").write_text(json.dumps(
        [{**public(r), "curve": r["_train"], "val_curve": r["_val"], "dir": r["_dir"], "error": r["_error"]}
         for r in rows], indent=2) + "\n")
    write_plot(rows, sweep_dir / "loss_vs_tokens.png")
    if rows and "rank" in rows[0]:
        write_best_config(rows[0], stage, metric, sweep_dir / "best_config.yaml")
        print(f"best: {rows[0]['trial']} -> {sweep_dir / 'best_config.yaml'}", flush=True)
    else:
        print("no trial completed: no best config written", flush=True)
    return rows
