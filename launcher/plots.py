"""``RUN_DIR/plots/loss.png``: the whole history of a run, across every resume, in one figure.

Drawn from the files the run keeps (``metrics.jsonl`` and ``events.jsonl``), not from the
memory of one attempt, so the picture is the same whether the observer redraws it at an
epoch end or a user runs ``python -m launcher.ckpt plot RUN_DIR`` after the job died.

Panels: the per-step training loss (raw and smoothed) with the epoch-end train and
validation losses; the learning rate; and, when the trainer reports any, the other
evaluation metrics (recall@K, NDCG@K...) and the other per-step metrics (the recommender's
reward...). Each resume is a dashed vertical line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.runfiles import is_eval, read_metrics, resume_points, scalars

PLOT = Path("plots") / "loss.png"
MAX_POINTS = 4000  # per-step curves longer than this are drawn as bucket means
MAX_MARKERS = 60  # evaluation curves with more points than this are drawn as plain lines
_LOSS_WORDS = ("loss", "error", "mse", "mae", "perplexity", "ppl")


def is_loss_like(name: str) -> bool:
    """Lower is better for these names; higher is better for the rest (recall, NDCG, reward)."""
    return any(w in name.lower() for w in _LOSS_WORDS)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so a resume boundary never mixes in future steps."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _thin(x: list[int], y: list[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most about ``limit`` points: means of consecutive buckets, so a long run draws quickly."""
    k = -(-len(x) // limit)
    if k <= 1:
        return x, y
    return ([sum(x[i:i + k]) / len(x[i:i + k]) for i in range(0, len(x), k)],
            [sum(y[i:i + k]) / len(y[i:i + k]) for i in range(0, len(y), k)])


def _series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` over ``records``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        for k, v in scalars(rec).items():
            steps, values = out.setdefault(k, ([], []))
            steps.append(rec["step"])
            values.append(v)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's history into ``out`` (default ``RUN_DIR/plots/loss.png``); return the path.

    Raises:
        FileNotFoundError: the run directory has no metrics records to draw.
    """
    import matplotlib
    matplotlib.use("Agg")  # no display on cluster nodes; must precede any pyplot import
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no metrics records to plot (is {run_dir} the "
                                f"--run-dir of a run that has taken at least one step?)")
    steps = _series([r for r in records if not is_eval(r)])
    evals = _series([r for r in records if is_eval(r)])
    others = {k: v for k, v in evals.items() if not is_loss_like(k)}
    extras = {k: v for k, v in steps.items() if k not in ("loss", "lr")}
    resumes = resume_points(run_dir)

    rows = 2 + bool(others) + bool(extras)
    height = 3.2 * rows + 0.6
    fig = Figure(figsize=(10, height))
    # Fixed margins: an automatic layout engine costs as much as the drawing itself.
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.75 / height, bottom=0.5 / height, hspace=0.35)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    _draw_losses(axes[0], steps, evals)
    _draw_lr(axes[1], steps)
    if others:
        _draw_others(axes[2], others, "evaluation metrics (higher is better)", marker="o")
    if extras:
        _draw_others(axes[-1], extras, "other per-step metrics", marker=None)
    for ax in axes:
        for i, s in enumerate(resumes):
            ax.axvline(s, color="tab:red", linestyle="--", linewidth=1, alpha=0.8,
                       label="resumed" if i == 0 and ax is axes[0] else None)
        ax.grid(True, alpha=0.3)
    for s in resumes:
        axes[0].annotate(f"resumed @ {s}", xy=(s, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                         textcoords="offset points", color="tab:red", fontsize=8)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    _epoch_axis(axes[0], [r for r in records if is_eval(r)])
    last = max(r["step"] for r in records)
    last_epoch = max((r["epoch"] for r in records if isinstance(r.get("epoch"), int)), default=None)
    epochs = f" (epoch {last_epoch})" if last_epoch else ""
    fig.suptitle(f"{run_dir.resolve().name}: steps 1-{last}{epochs}, {len(resumes)} resume(s)")

    out = Path(out) if out else run_dir / PLOT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    # Written aside and renamed, so a viewer refreshing the file never reads half a PNG.
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
    return out


def _epoch_axis(ax, eval_records: list[dict]) -> None:
    """Epoch ends on a top axis, numbered as in the logs and ``metrics.jsonl`` (``launcher/epochs.py``)."""
    ends = [(r["step"], r["epoch"]) for r in eval_records if isinstance(r.get("epoch"), int)]
    if not ends:
        return
    every = max(1, len(ends) // 12)  # at most about a dozen labels
    shown = ends[every - 1::every]
    top = ax.secondary_xaxis("top")
    top.set_xticks([s for s, _ in shown], labels=[str(e) for _, e in shown], fontsize=7)
    ax.set_title("loss (top axis: ends of epochs 1, 2, ...)", fontsize=10, loc="left", pad=14)


def _draw_losses(ax, steps: dict, evals: dict) -> None:
    if "loss" in steps:
        x, y = steps["loss"]
        window = len(y) // 25  # smoothing only once there are enough steps for it to mean something
        ax.plot(*_thin(x, y), color="tab:blue", alpha=0.35 if window > 1 else 1.0, linewidth=0.8,
                label="train loss (step)")
        if window > 1:
            ax.plot(*_thin(x, _smooth(y, window)), color="tab:blue", linewidth=1.5,
                    label=f"train loss ({window}-step mean)")
    styles = iter([("tab:purple", "o"), ("tab:orange", "s"), ("tab:brown", "D"), ("tab:olive", "^")])
    for k, (x, y) in sorted(evals.items()):
        if is_loss_like(k):
            color, marker = next(styles, ("tab:gray", "v"))
            ax.plot(*_thin(x, y), color=color, marker=marker if len(x) <= MAX_MARKERS else None, linewidth=1.2,
                    label=f"{k} (epoch)")
    ax.set_ylabel("loss")
    ax.set_title("loss", fontsize=10, loc="left")


def _draw_lr(ax, steps: dict) -> None:
    if "lr" in steps:
        ax.plot(*_thin(*steps["lr"]), color="tab:green", linewidth=1.2, label="lr")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _draw_others(ax, series: dict, title: str, marker: str | None) -> None:
    for k, (x, y) in sorted(series.items()):
        ax.plot(*_thin(x, y), marker=marker if len(x) <= MAX_MARKERS else None, linewidth=1.2, label=k)
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(loc="best", fontsize=8)
