"""The end of a sweep: a table (console, CSV, JSON), loss vs tokens seen per trial (PNG) and the best
trial's config as a file `stages/<stage>.py --config` accepts.

Trials are ranked at equal tokens seen: the loss each finished trial had when it reached the fewest tokens
any finished trial reached. Trials stopped early by ASHA never got there and are listed but not ranked.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from tune.space import PER_TRIAL
from tune.trial import TRIAL_KEY, tokens_per_step, trial_config, trial_params, workers

# Left out of the best config: they name this sweep's directories, not the recipe.
NOT_RECIPE = PER_TRIAL | {"cache_dir"}


def trial_curve(result) -> list[tuple[int, float]]:
    df = result.metrics_dataframe
    if df is None or "tokens" not in df or "loss" not in df:
        return []
    df = df.dropna(subset=["tokens", "loss"])
    return [(int(t), float(v)) for t, v in zip(df["tokens"], df["loss"])]


def loss_at(curve, tokens: int):
    """The loss of the last report at or before `tokens` seen."""
    before = [loss for t, loss in curve if t <= tokens]
    return before[-1] if before else None


def collect(results, record: dict, base, sweep_dir: Path) -> list[dict]:
    rows = []
    for result in results:
        params = trial_params(result.config, record["named_trials"])
        trial_dir = Path(result.path)
        trial_id = trial_dir.name.split("_")[-2] if "_" in trial_dir.name else trial_dir.name
        trial_id = (result.metrics or {}).get("trial_id", trial_id)
        cfg = trial_config(base, params, trial_dir, sweep_dir / "train", trial_id, record["token_budget"],
                           record["gpus_per_trial"])
        curve = trial_curve(result)
        planned = cfg.max_steps * tokens_per_step(cfg)
        last_tokens = curve[-1][0] if curve else 0
        if result.error is not None:
            status = "error"
        elif planned and last_tokens < planned:
            status = "stopped early"
        else:
            status = "done"
        rows.append({
            "trial": result.config.get(TRIAL_KEY, trial_id), "trial_id": trial_id, "status": status,
            **{f"param.{k}": v for k, v in params.items()},
            "effective_batch": cfg.batch_size * cfg.accumulation_steps * workers(cfg),
            "steps": cfg.max_steps, "tokens": last_tokens,
            "final_loss": curve[-1][1] if curve else None,
            "_curve": curve, "_cfg": cfg, "_dir": str(trial_dir),
        })
    done = [r for r in rows if r["status"] == "done" and r["_curve"]]
    compare = min((r["tokens"] for r in done), default=0)
    for r in rows:
        r["compare_tokens"] = compare
        r["loss_at_compare"] = loss_at(r["_curve"], compare) if r in done else None
    ranked = sorted((r for r in rows if r["loss_at_compare"] is not None), key=lambda r: r["loss_at_compare"])
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return sorted(rows, key=lambda r: r.get("rank", len(rows) + 1))


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def format_table(rows: list[dict]) -> str:
    cols = []
    for r in rows:
        cols += [k for k in public(r) if k not in cols and k != "compare_tokens"]
    cells = [[("" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r[c]))
              for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on the cluster
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["_curve"]:
            tokens, losses = zip(*r["_curve"])
            ax.plot(tokens, losses, label=f"{r['trial']} ({r['status']})", marker="." if len(tokens) < 30 else None)
    if rows and rows[0]["compare_tokens"]:
        ax.axvline(rows[0]["compare_tokens"], color="grey", linestyle="--", linewidth=1, label="compared here")
    ax.set_xlabel("tokens seen (all workers)")
    ax.set_ylabel("training loss")
    ax.set_title("loss vs tokens seen per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_best_config(row: dict, stage: str, path: Path) -> None:
    import yaml
    values = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(row["_cfg"]).items() if k not in NOT_RECIPE}
    header = (f"# Best trial {row['trial']} ({row['trial_id']}) of a Tune sweep: loss {row['loss_at_compare']:.4f} "
              f"at {row['compare_tokens']:,} tokens.\n# Train it: python stages/{stage}.py --config {path.name}\n")
    path.write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")


def write_report(results, record: dict, base, sweep_dir: Path) -> list[dict]:
    rows = collect(results, record, base, sweep_dir)
    print("\n" + format_table(rows), flush=True)
    with open(sweep_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        fields = []
        for r in rows:
            fields += [k for k in public(r) if k not in fields]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(public(r) for r in rows)
    (sweep_dir / "results.json").write_text(json.dumps([{**public(r), "curve": r["_curve"], "dir": r["_dir"]}
                                                        for r in rows], indent=2) + "\n")
    write_plot(rows, sweep_dir / "loss_vs_tokens.png")
    if rows and "rank" in rows[0]:
        write_best_config(rows[0], record["stage"], sweep_dir / "best_config.yaml")
        print(f"best: {rows[0]['trial']} -> {sweep_dir / 'best_config.yaml'}", flush=True)
    else:
        print("no trial finished: no best config written", flush=True)
    return rows
