"""Model packages: one self-contained directory to share a trained model (seed 003).

Write one from any verified checkpoint::

    python -m launcher.ckpt package runs/enc1/checkpoints/step_00000120 packages/enc1

    packages/enc1/
      model.safetensors   the model's weights (safetensors; no DDP ``module.`` prefix)
      config.yaml         the run config the checkpoint was trained with
      package.json        trainer, step, epoch, metrics, the trainer's extras (the encoder's
                          normalisation statistics, the recommender's item ids), library versions

Use it (no run directory, no process group)::

    from launcher.package import load_package
    pkg = load_package("packages/enc1")
    pkg.model                                  # the model in eval mode
    pkg.reconstruct(raw_window, mask)          # encoder: raw series in, raw units out
    pkg.recommend(["item 12", "item 7"], k=10)  # recommender: top-K items for a user's history

``load_package`` returns the trainer's package class (``from_package`` on the trainer) with the
methods documented there; for a trainer without one it returns a :class:`Package` holding the
weights and config, for the user's own model to load.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.record import read_record
from launcher.config import load_config
from trainers import resolve_trainer

FORMAT = 1
WEIGHTS, CONFIG, INFO = "model.safetensors", "config.yaml", "package.json"


class PackageError(ValueError):
    """A package that cannot be written or read, with what to do about it."""


@dataclass
class Package:
    """A package of a trainer that has no package class: its weights and config."""

    config: Any  # launcher.config.RunConfig
    info: dict[str, Any]
    weights: dict[str, torch.Tensor]


def write_package(checkpoint: Path, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Write a package of the verified ``checkpoint`` to ``out_dir``; return its ``package.json``.

    Written next to ``out_dir`` and renamed into place when complete; an existing ``out_dir`` is
    replaced only with ``force`` and only once the new package is complete.
    """
    from launcher.checkpoint.offline import load_full

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise PackageError(f"{out_dir} already exists; choose a new directory or pass --force to replace it")
    info = read_record(checkpoint).to_json()  # trainers' package_meta read it as plain JSON
    config = info.get("config") or {}
    cls = resolve_trainer(info.get("trainer") or config.get("trainer", ""))
    state = load_full(checkpoint, list(getattr(cls, "package_keys", ("model",))))
    weights = {k: v.detach().cpu().contiguous() for k, v in (state.get("model") or {}).items()
               if isinstance(v, torch.Tensor)}
    if not weights:
        raise CheckpointError(f"{checkpoint}: no model weights to package")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    extras = cls.package_meta(state, info, run_dir) if hasattr(cls, "package_meta") else {}
    meta = {"format": FORMAT, "trainer": config.get("trainer"), "step": info.get("step"), "epoch": info.get("epoch"),
            "metrics": info.get("metrics") or {}, "last_eval": info.get("last_eval"),
            **extras, "source": str(Path(checkpoint).resolve()), "created": time.time(), "versions": _versions()}
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / WEIGHTS), metadata={"trainer": str(meta["trainer"]), "step": str(meta["step"])})
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / INFO).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def load_package(path: str | Path):
    """The packaged model in eval mode, with its config and statistics (see the module docstring)."""
    path = Path(path)
    missing = [n for n in (WEIGHTS, CONFIG, INFO) if not (path / n).is_file()]
    if missing:
        raise PackageError(f"{path}: not a package (missing {', '.join(missing)}); write one with "
                           f"python -m launcher.ckpt package CHECKPOINT {path}")
    try:
        info = json.loads((path / INFO).read_text())
    except ValueError as e:
        raise PackageError(f"{path / INFO}: not valid JSON ({e})") from None
    if info.get("format") != FORMAT:
        raise PackageError(f"{path / INFO}: package format {info.get('format')!r}; this version reads {FORMAT}")
    config = load_config(path / CONFIG)
    weights = load_file(str(path / WEIGHTS))
    cls = resolve_trainer(config.trainer)
    if hasattr(cls, "from_package"):
        return cls.from_package(config, weights, info)
    return Package(config, info, weights)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("ftlaunch", "safetensors", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out
