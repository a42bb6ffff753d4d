"""Multivariate time series for the temporal encoder: real files, or a deterministic generator."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from trainers.common import DataError


def synthetic_series(length: int, channels: int, seed: int) -> np.ndarray:
    """A reproducible series: per-channel sums of sinusoids, a slow trend and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)[:, None]
    periods = rng.uniform(8, 96, size=(3, channels))
    phases = rng.uniform(0, 2 * np.pi, size=(3, channels))
    amps = rng.uniform(0.3, 1.5, size=(3, channels))
    series = sum(amps[i] * np.sin(2 * np.pi * t / periods[i] + phases[i]) for i in range(3))
    series = series + 0.001 * t * rng.normal(size=(1, channels)) + 0.1 * rng.normal(size=(length, channels))
    return series.astype(np.float32)


def load_series(path: str | Path) -> np.ndarray:
    """Read a ``[time, channels]`` float series from ``.npy`` or ``.csv``.

    CSV: one row per time step, one numeric column per channel, an optional header row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (set data.path to a .npy or .csv series, or leave it empty "
                        f"for the built-in synthetic series)")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from None
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"{path}: array of shape {arr.shape} and dtype {arr.dtype}; expected a numeric "
                            f"2-D array [time, channels]")
        arr = arr.astype(np.float32)
    elif path.suffix == ".csv":
        arr = _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported suffix {path.suffix!r}; expected .npy or .csv")
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise DataError(f"{path}: non-finite value at time step {row}; expected finite numbers")
    return arr


def _read_csv(path: Path) -> np.ndarray:
    rows: list[list[float]] = []
    width = None
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                values = [float(c) for c in row]
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise DataError(f"{path}, line {lineno}: {row!r} is not all numbers; expected one numeric "
                                f"value per channel") from None
            if width is None:
                width = len(values)
            elif len(values) != width:
                raise DataError(f"{path}, line {lineno}: {len(values)} columns; expected {width} like the "
                                f"first data row")
            rows.append(values)
    if not rows:
        raise DataError(f"{path}: no data rows; expected one row per time step")
    return np.asarray(rows, dtype=np.float32)


def make_windows(series: np.ndarray, window: int, stride: int) -> np.ndarray:
    """``[n, window, channels]`` windows taken every ``stride`` steps."""
    starts = range(0, len(series) - window + 1, stride)
    if len(series) < window:
        return np.empty((0, window, series.shape[1]), np.float32)
    return np.stack([series[s:s + window] for s in starts])
