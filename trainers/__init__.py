"""Trainers: ours (``encoder``, ``recommender``) and a way to load a user's own."""

from __future__ import annotations

import importlib

BUILTIN = {
    "encoder": "trainers.encoder.trainer:EncoderTrainer",
    "recommender": "trainers.recommender.trainer:RecommenderTrainer",
}


def resolve_trainer(name: str) -> type:
    """Trainer class for ``encoder``, ``recommender`` or ``package.module:ClassName``."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ValueError(f"trainer = {name!r}: expected one of {sorted(BUILTIN)} or 'package.module:ClassName'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"trainer = {name!r}: cannot import {module_name} ({e}); is it on PYTHONPATH?") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"trainer = {name!r}: {module_name} has no attribute {attr}")
    missing = [m for m in ("config_sections", "setup", "steps_per_epoch", "train_step", "evaluate",
                           "state_dict", "load_state_dict") if not hasattr(cls, m)]
    if missing:
        raise ValueError(f"trainer = {name!r}: {cls.__name__} lacks {', '.join(missing)} "
                         f"(see trainers/protocol.py)")
    return cls
