"""The recommender and the learned task Scheduler of seed 000.

A user is represented by a vector that is *adapted*: it starts at a learned initial vector and
takes ``inner_steps`` gradient steps on the user's support items (softmax over all items), with
learned per-dimension step sizes. Meta-learning trains the initial vector, the step sizes and
the item embeddings so that this adaptation predicts a user's other items; the same adaptation
ranks items for a held-out user at evaluation and in a package (:func:`top_k`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Recommender(nn.Module):
    """Item embeddings and biases, the initial user vector, and the inner loop's step sizes."""

    def __init__(self, n_items: int, dim: int, inner_lr: float):
        super().__init__()
        self.item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.item.weight, std=0.1)
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        self.user_init = nn.Parameter(torch.zeros(dim))
        self.log_step = nn.Parameter(torch.full((dim,), math.log(inner_lr)))

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user vector: ``[B, dim]`` -> ``[B, n_items]``."""
        return users @ self.item.weight.T + self.item_bias

    def adapt(self, items: torch.Tensor, valid: torch.Tensor, steps: int,
              create_graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """User vectors adapted on ``items`` ([B, L], padded; ``valid`` marks real entries).

        Returns the vectors, each task's loss before adaptation and its first gradient's norm
        (the Scheduler's features). With ``create_graph`` the result is differentiable with
        respect to the parameters (second-order meta-gradient); without, it is detached.
        """
        users = self.user_init.expand(len(items), -1)
        step = self.log_step.exp()
        if not create_graph:
            users, step = users.detach().requires_grad_(True), step.detach()
        first_loss = first_norm = None
        with torch.enable_grad():
            for _ in range(steps):
                loss = item_loss(self.scores(users), items, valid)
                (grad,) = torch.autograd.grad(loss.sum(), users, create_graph=create_graph)
                if first_loss is None:
                    first_loss, first_norm = loss.detach(), grad.detach().norm(dim=1)
                users = users - step * grad
                if not create_graph:
                    users = users.detach().requires_grad_(True)
        if first_loss is None:
            first_loss = item_loss(self.scores(users), items, valid).detach()
            first_norm = torch.zeros_like(first_loss)
        return (users if create_graph else users.detach()), first_loss, first_norm


class Scheduler(nn.Module):
    """Turns per-task features (support loss, query loss, gradient norm) into sampling logits."""

    n_features = 3

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(self.n_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def item_loss(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each row's mean negative log-likelihood of its ``items`` under a softmax over all items."""
    logp = scores.log_softmax(-1).gather(1, items)
    return -(logp * valid).sum(1) / valid.sum(1).clamp_min(1)


def pad(sequences: list, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` item indices (padded with 0) and the mask of real entries."""
    width = max((len(s) for s in sequences), default=0)
    items = torch.zeros(len(sequences), max(width, 1), dtype=torch.long)
    valid = torch.zeros(len(sequences), max(width, 1), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        items[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        valid[row, :len(seq)] = True
    return items.to(device), valid.to(device)


@torch.no_grad()
def top_k(model: Recommender, supports: list, k: int, steps: int) -> torch.Tensor:
    """The ``k`` best items for each user, adapted on their support items, which are never ranked.

    The one ranking rule of the recommender: evaluation and packages both call it.
    """
    device = model.user_init.device
    items, valid = pad(supports, device)
    users, _, _ = model.adapt(items, valid, steps, create_graph=False)
    scores = model.scores(users)
    scores.masked_fill_(torch.zeros_like(scores, dtype=torch.bool).scatter_(1, items, valid), -math.inf)
    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices


def recall_ndcg(top: list[list[int]], queries: list, k: int) -> tuple[float, float]:
    """Sums over users of recall@k (hits / query size) and NDCG@k of ranked lists against query sets."""
    recall = ndcg = 0.0
    for ranked, query in zip(top, queries, strict=True):
        wanted = {int(i) for i in query}
        hits = [r for r, item in enumerate(ranked[:k]) if item in wanted]
        recall += len(hits) / len(wanted)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(wanted), k)))
        ndcg += sum(1 / math.log2(r + 2) for r in hits) / ideal
    return recall, ndcg
