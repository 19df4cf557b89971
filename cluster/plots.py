"""The loss curve of one run, drawn from its metrics.jsonl: train and validation loss against tokens seen.

Tokens, not steps, on the x axis: runs with different batch sizes or sequence lengths then compare directly.
Drawn with matplotlib's Agg canvas on a Figure object, never pyplot, so no global backend or figure state is
touched (safe inside Ray workers and tests).
"""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not a JSON object is a ValueError naming file:line."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
        records.append(rec)
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["tokens"], r[key]) for r in records if isinstance(r.get(key), (int, float))
              and isinstance(r.get("tokens"), (int, float))]
    return [x for x, _ in points], [y for _, y in points]


def plot_loss(metrics_jsonl, out_png, title: str = "") -> Path:
    """Write `out_png` with train loss (and val loss, where records carry `val_loss`) against tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    records = read_metrics(metrics_jsonl)
    train_x, train_y = _series(records, "loss")
    val_x, val_y = _series(records, "val_loss")
    if not train_x and not val_x:
        raise ValueError(f"{metrics_jsonl}: no records with tokens and loss to plot")
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_x:
        ax.plot(train_x, train_y, label="train loss", color="tab:blue", linewidth=1.2)
    if val_x:
        ax.plot(val_x, val_y, label="val loss", color="tab:orange", marker="o", markersize=4, linewidth=1.5)
    ax.set_xlabel("tokens")
    ax.xaxis.set_major_formatter(EngFormatter())  # 40k, 1.2M rather than 1200000
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or metrics_jsonl.parent.name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
