"""The recommender and the learned task Scheduler of seed 000."""

from __future__ import annotations

import torch
from torch import nn


class Recommender(nn.Module):
    """Scores ``<adapter(user), item>``; the adapter MLP is what each task adapts in the inner loop."""

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: int):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        self.adapter = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``items`` ([B, K]) for ``users`` ([B])."""
        u = self.adapter(self.user(users))
        return (u[:, None, :] * self.item(items)).sum(-1)

    def all_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.user(users)) @ self.item.weight.T

    def fast_weight_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith("adapter.")]


class Scheduler(nn.Module):
    """Turns per-task features (support loss, query loss, gradient norm) into sampling logits."""

    n_features = 3

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(self.n_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def bpr_loss(scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: column 0 is the positive, the rest negatives."""
    return -torch.nn.functional.logsigmoid(scores[:, :1] - scores[:, 1:]).mean()
