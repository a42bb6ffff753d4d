"""Running a packaged recommender: top-K items for a user (``launcher.package.load_package``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainers.recommender.model import Recommender, top_k


@dataclass
class RecommenderPackage:
    """The trained recommender in eval mode, its config and item ids.

    A user is given by the items they interacted with (their support set, original item ids
    as in the training data): the user vector is adapted on them exactly as in evaluation, and
    the best other items are returned. A user needs no id and need not be in the training data.
    """

    model: Recommender
    config: Any  # launcher.config.RunConfig
    info: dict[str, Any]  # package.json
    item_ids: list[str] | None  # original id of each item index (None: indices are the ids)

    @classmethod
    def build(cls, config, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> RecommenderPackage:
        n_items, dim = weights["item.weight"].shape
        model = Recommender(n_items, dim, config.optim.inner_lr)
        model.load_state_dict(weights, strict=True)
        return cls(model.eval(), config, meta, meta.get("item_ids"))

    def _index(self, items: list) -> list[int]:
        if self.item_ids is None:
            return [int(i) for i in items]
        lookup = {name: i for i, name in enumerate(self.item_ids)}
        unknown = [i for i in items if str(i) not in lookup]
        if unknown:
            raise KeyError(f"unknown item id(s) {unknown[:5]}: the model knows {len(lookup)} items from its "
                           f"training data")
        return [lookup[str(i)] for i in items]

    def recommend(self, seen: list, k: int | None = None) -> list:
        """The ``k`` (default ``meta.top_k``) best item ids for a user who interacted with ``seen``."""
        return self.recommend_many([seen], k)[0]

    def recommend_many(self, users: list[list], k: int | None = None) -> list[list]:
        """:meth:`recommend` for many users at once (one batched adaptation)."""
        k = k or self.config.meta.top_k
        if any(not seen for seen in users):
            raise ValueError("each user needs at least one item they interacted with")
        top = top_k(self.model, [self._index(seen) for seen in users], k, self.config.meta.inner_steps).tolist()
        if self.item_ids is None:
            return top
        return [[self.item_ids[i] for i in row] for row in top]
