"""Model quality: each trainer against its baselines, at its shipped defaults, for several seeds.

Usage::

    python scripts/model_quality.py                       # seeds 0 1 2: the table in docs/benchmarks.md
    python scripts/model_quality.py --seeds 0 1 2 3 4 --out-dir runs/quality

Every row is a real run of ``launcher/run.py`` with ``configs/encoder.yaml`` or
``configs/recommender.yaml`` (one process, ``--set train.seed=S``; the seed also generates the
synthetic data). The numbers are those of the evaluation with the best *validation* metric (the
run's best checkpoint), read from the run's ``metrics.jsonl``:

* encoder: masked-span MSE on the validation windows (normalised units, lower is better), beside
  the two simple baselines the trainer evaluates on the same windows and masks (linear
  interpolation across the span, the window's visible mean) and, as a reference that is not a
  simple baseline, a least-squares linear predictor fitted on the training windows for each span
  position;
* recommender: recall@10 / NDCG@10 of the held-out *test* users, each adapted on the support set,
  for meta-learning then fine-tuning (the default), the same model without the meta-learning
  phase (``--set meta.steps=0``), and popularity.

The last lines say, for every seed, whether the model beat each baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def best_eval(run_dir: Path, metric: str, mode: str) -> dict:
    """The evaluation record with the best ``metric`` (the best checkpoint's), earliest on ties."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if metric in r]
    if not evals:
        raise SystemExit(f"{run_dir}: no evaluation with {metric} in metrics.jsonl")
    sign = 1 if mode == "min" else -1
    return min(evals, key=lambda r: (sign * r[metric], r["step"]))


def train(trainer: str, run_dir: Path, seed: int, extra: list[str]) -> Path:
    cmd = [sys.executable, str(REPO / "launcher" / "run.py"), "--config", str(REPO / "configs" / f"{trainer}.yaml"),
           "--run-dir", str(run_dir), "--set", f"train.seed={seed}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(run_dir.with_suffix(".log"), "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=1800).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; see {run_dir.with_suffix('.log')}")
    return run_dir


def linear_fit_reference(seed: int) -> float:
    """Masked-span MSE of a ridge regression from the visible steps to the span, one per span start."""
    import torch

    from launcher.config import load_config
    from trainers.encoder.data import make_windows, synthetic_series
    from trainers.encoder.model import span_masks

    cfg = load_config(REPO / "configs" / "encoder.yaml", [f"train.seed={seed}"])
    d = cfg.data
    series = synthetic_series(d.synthetic_length, d.synthetic_channels, seed)
    split = int(len(series) * (1 - d.val_fraction))
    mean, std = series[:split].mean(0), series[:split].std(0) + 1e-6
    train_x = torch.from_numpy((make_windows(series[:split], d.window, d.stride) - mean) / std).double()
    val_x = torch.from_numpy((make_windows(series[split:], d.window, d.stride) - mean) / std).double()
    masks = span_masks(len(val_x), d.window, d.mask_span, torch.Generator().manual_seed(seed + 7))
    err_sum, count = 0.0, 0
    for start in range(d.window - d.mask_span + 1):
        hide = torch.zeros(d.window, dtype=torch.bool)
        hide[start:start + d.mask_span] = True
        rows = (masks == hide).all(1)
        if not rows.any():
            continue
        a, b = _visible_features(train_x, hide), train_x[:, hide].flatten(1)
        w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
        pred = (_visible_features(val_x[rows], hide) @ w).reshape(-1, d.mask_span, val_x.shape[-1])
        err_sum += float(((pred - val_x[rows][:, hide]) ** 2).mean(-1).sum())
        count += int(rows.sum()) * d.mask_span
    return err_sum / count


def _visible_features(x, hide):
    import torch
    return torch.cat([x[:, ~hide].flatten(1), torch.ones(len(x), 1, dtype=x.dtype)], 1)


def encoder_table(seeds: list[int], out: Path) -> tuple[list[str], list[str]]:
    lines = ["| seed | encoder (best val_loss) | linear interpolation | window mean | least-squares fit (reference) |",
             "|---|---|---|---|---|"]
    verdicts = []
    for seed in seeds:
        rec = best_eval(train("encoder", out / f"encoder-seed{seed}", seed, []), "val_loss", "min")
        ref = linear_fit_reference(seed)
        lines.append(f"| {seed} | {rec['val_loss']:.4f} (step {rec['step']}) | {rec['val_loss_linear_interp']:.4f} | "
                     f"{rec['val_loss_window_mean']:.4f} | {ref:.4f} |")
        wins = rec["val_loss"] < min(rec["val_loss_linear_interp"], rec["val_loss_window_mean"])
        verdicts.append(f"encoder seed {seed}: {'beats' if wins else 'does NOT beat'} both simple baselines; "
                        f"{'beats' if rec['val_loss'] < ref else 'does not beat'} the least-squares reference")
    return lines, verdicts


def recommender_table(seeds: list[int], out: Path) -> tuple[list[str], list[str]]:
    lines = ["| seed | meta-learning + fine-tune | no meta (`meta.steps=0`) | popularity |", "|---|---|---|---|"]
    verdicts = []
    for seed in seeds:
        meta = best_eval(train("recommender", out / f"rec-seed{seed}", seed, []), "val_ndcg@10", "max")
        plain = best_eval(train("recommender", out / f"rec-nometa-seed{seed}", seed, ["--set", "meta.steps=0"]),
                          "val_ndcg@10", "max")
        cell = lambda r, s="": f"{r['test_recall@10' + s]:.4f} / {r['test_ndcg@10' + s]:.4f}"  # noqa: E731
        lines.append(f"| {seed} | {cell(meta)} (step {meta['step']}) | {cell(plain)} (step {plain['step']}) | "
                     f"{cell(meta, '_popular')} |")
        for name, other, suffix in (("no meta", plain, ""), ("popularity", meta, "_popular")):
            wins = all(meta[f"test_{m}@10"] > other[f"test_{m}@10{suffix}"] for m in ("recall", "ndcg"))
            verdicts.append(f"recommender seed {seed}: meta-learning {'beats' if wins else 'does NOT beat'} {name} "
                            f"on test recall@10 and NDCG@10")
    return lines, verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out-dir", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--only", choices=["encoder", "recommender"], default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        verdicts = []
        if args.only in (None, "encoder"):
            lines, v = encoder_table(args.seeds, out)
            print("Encoder: masked-span MSE on the validation windows (normalised units; lower is better)\n")
            print("\n".join(lines) + "\n")
            verdicts += v
        if args.only in (None, "recommender"):
            lines, v = recommender_table(args.seeds, out)
            print("Recommender: test users' recall@10 / NDCG@10 at the best validation checkpoint (higher is better)\n")
            print("\n".join(lines) + "\n")
            verdicts += v
        print("\n".join(verdicts))
    return 0 if all(" NOT " not in v for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
