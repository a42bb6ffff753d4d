"""The trainers learn: at their shipped defaults (seed 0) each beats its baselines on held-out data.

``scripts/model_quality.py`` runs the same comparison for several seeds (docs/benchmarks.md,
"Model quality"); these tests use its code, so the table and the tests cannot disagree."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import REPO

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("model_quality", REPO / "scripts" / "model_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encoder_beats_interpolation_and_the_window_mean(quality, tmp_path):
    best = quality.best_eval(quality.train("encoder", tmp_path / "enc", 0, []), "val_loss", "min")
    assert best["val_loss"] < 0.8 * best["val_loss_linear_interp"], best
    assert best["val_loss"] < best["val_loss_window_mean"], best


def test_recommender_meta_learning_beats_popularity_and_the_model_without_it(quality, tmp_path):
    meta = quality.best_eval(quality.train("recommender", tmp_path / "meta", 0, []), "val_ndcg@10", "max")
    plain = quality.best_eval(quality.train("recommender", tmp_path / "plain", 0, ["--set", "meta.steps=0"]),
                              "val_ndcg@10", "max")
    for metric in ("test_recall@10", "test_ndcg@10"):
        assert meta[metric] > plain[metric], (metric, meta, plain)
        assert meta[metric] > 3 * meta[f"{metric}_popular"], (metric, meta)
