"""Meta-learning recommender (seed 000): a Recommender plus a learned task Scheduler.

Meta-learning phase (steps ``< meta.steps``): each user is a task. For every task in the
step's batch the recommender's adapter is adapted on the support set (one first-order
inner step) and scored on the query set. The Scheduler turns per-task features into
probabilities, tasks are drawn from them, and the drawn tasks' query loss updates the
recommender (Adam, ``optim.meta_update_lr``). The Scheduler is trained by REINFORCE with
its own Adam: reward = minus the drawn tasks' query loss after the update, against a
moving-average baseline ``moving_avg_reward``.

Fine-tune phase: plain BPR on each user's support and query items (``optim.finetune_lr``).
Evaluation: recall@K and NDCG@K on each user's held-out test items.

The task sets are shuffled once per run and written once to ``RUN_DIR/tasks/`` (not into
every checkpoint); a resume reloads them and refuses a set whose fingerprint differs
from the one the checkpoint recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from launcher.config import Checks
from launcher.exact import average_gradients
from trainers.common import (
    DataError,
    all_reduce_mean,
    global_batch_indices,
    load_module_state,
    load_optimizer_state,
    module_state,
    optimizer_state,
)
from trainers.protocol import TrainContext
from trainers.recommender.data import (
    build_tasks,
    load_interactions,
    load_tasks,
    save_tasks,
    synthetic_interactions,
)
from trainers.recommender.model import Recommender, Scheduler, bpr_loss


@dataclass
class RecData:
    """Interactions and how each user's history becomes a task."""

    path: str = ""  # interactions CSV 'user,item[,rating,timestamp]'; "" = synthetic
    synthetic_users: int = 200  # users of the synthetic data
    synthetic_items: int = 300  # items of the synthetic data
    synthetic_per_user: int = 24  # interactions per synthetic user
    query_size: int = 4  # newest items before the test items form the query set
    test_size: int = 4  # newest items held out for recall/NDCG
    min_support: int = 4  # users with fewer support items are left out
    batch_size: int = 16  # global: tasks (users) per step, split over ranks
    negatives: int = 4  # sampled negative items per positive

    def __post_init__(self) -> None:
        check = Checks("data")
        for name in ("synthetic_users", "synthetic_items", "synthetic_per_user", "query_size", "test_size",
                     "min_support", "batch_size", "negatives"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check.done()


@dataclass
class RecModel:
    """Sizes of the recommender and the Scheduler (changing any on resume is refused)."""

    dim: int = 16  # embedding width
    hidden: int = 32  # adapter MLP width
    scheduler_hidden: int = 16  # Scheduler MLP width

    def __post_init__(self) -> None:
        check = Checks("model")
        for name in ("dim", "hidden", "scheduler_hidden"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check.done()


@dataclass
class RecOptim:
    """Learning rates of the two optimizers and of the inner loop."""

    meta_update_lr: float = 0.01  # recommender Adam lr in the meta-learning phase
    inner_lr: float = 0.1  # SGD step size of the per-task adaptation
    scheduler_lr: float = 0.001  # Scheduler Adam lr
    finetune_lr: float = 0.005  # recommender Adam lr in the fine-tune phase

    def __post_init__(self) -> None:
        check = Checks("optim")
        for name in ("meta_update_lr", "inner_lr", "scheduler_lr", "finetune_lr"):
            check(getattr(self, name) > 0, name, getattr(self, name), "a number > 0")
        check.done()


@dataclass
class RecMeta:
    """The meta-learning phase and evaluation."""

    steps: int = 60  # optimizer steps of the meta-learning phase; fine-tuning follows
    baseline_momentum: float = 0.9  # moving_avg_reward = m * moving_avg_reward + (1 - m) * reward
    top_k: int = 10  # K of recall@K and NDCG@K

    def __post_init__(self) -> None:
        check = Checks("meta")
        check(self.steps >= 0, "steps", self.steps, "an integer >= 0")
        check(0 <= self.baseline_momentum < 1, "baseline_momentum", self.baseline_momentum, "a number in [0, 1)")
        check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        check.done()


class RecommenderTrainer:
    """Meta-learning then fine-tuning of :class:`Recommender`, tasks weighted by :class:`Scheduler`."""

    config_sections = {"data": RecData, "model": RecModel, "optim": RecOptim, "meta": RecMeta}
    shape_fields = ("model.",)
    best = ("ndcg@10", "max")

    def setup(self, ctx: TrainContext) -> None:
        cfg = self.cfg = ctx.config
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        d = cfg.data
        data = load_interactions(d.path) if d.path else synthetic_interactions(
            d.synthetic_users, d.synthetic_items, d.synthetic_per_user, cfg.train.seed)
        task_dir = ctx.run_dir / "tasks"
        if ctx.fresh:
            self.tasks = build_tasks(data, d.query_size, d.test_size, d.min_support, cfg.train.seed)
            if ctx.rank == 0:
                save_tasks(self.tasks, task_dir)
        else:
            self.tasks = load_tasks(task_dir)
        self.fingerprint = self.tasks.fingerprint()
        if len(self.tasks.users) < d.batch_size:
            raise DataError(f"{len(self.tasks.users)} usable users (tasks) but data.batch_size={d.batch_size}; "
                            f"lower data.batch_size or add data")
        self.n_items = data.n_items
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        m = cfg.model
        self.model = Recommender(data.n_users, data.n_items, m.dim, m.hidden).to(self.device)
        self.scheduler = Scheduler(m.scheduler_hidden).to(self.device)
        self._build_optimizers()
        self.moving_avg_reward = 0.0
        torch.manual_seed(cfg.train.seed * 1000 + 1 + self.rank)  # per-rank negatives and task draws

    def _build_optimizers(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.meta_update_lr)
        self.scheduler_optimizer = torch.optim.Adam(self.scheduler.parameters(), lr=o.scheduler_lr)

    def steps_per_epoch(self) -> int:
        return len(self.tasks.users) // self.cfg.data.batch_size

    # ------------------------------------------------------------------ steps

    def _my_tasks(self, step: int) -> list[int]:
        return global_batch_indices(len(self.tasks.users), self.cfg.data.batch_size, self.cfg.train.seed,
                                    step, self.rank, self.world).tolist()

    def _ranking_batch(self, task: int, items) -> tuple[torch.Tensor, torch.Tensor]:
        """Users and ``[positive, negatives...]`` item rows for one task's ``items``."""
        pos = torch.as_tensor(items, dtype=torch.long)
        neg = torch.randint(self.n_items, (len(pos), self.cfg.data.negatives))
        users = torch.full((len(pos),), int(self.tasks.users[task]), dtype=torch.long)
        return users.to(self.device), torch.cat([pos[:, None], neg], 1).to(self.device)

    def train_step(self, step: int) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.meta_update_lr if step < self.cfg.meta.steps else self.cfg.optim.finetune_lr
        if step < self.cfg.meta.steps:
            return self._meta_step(step)
        return self._finetune_step(step)

    def _meta_step(self, step: int) -> dict[str, float]:
        fast = self.model.fast_weight_names()
        params = dict(self.model.named_parameters())
        features, query_losses, query_batches = [], [], []
        for task in self._my_tasks(step):
            users, items = self._ranking_batch(task, self.tasks.support[task])
            support_loss = bpr_loss(self.model(users, items))
            grads = torch.autograd.grad(support_loss, [params[n] for n in fast])
            lr = self.cfg.optim.inner_lr
            adapted = {**params, **{n: params[n] - lr * g for n, g in zip(fast, grads, strict=True)}}
            q_users, q_items = self._ranking_batch(task, self.tasks.query[task])
            query_loss = bpr_loss(functional_call(self.model, adapted, (q_users, q_items)))
            grad_norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            features.append(torch.stack([support_loss.detach(), query_loss.detach(), grad_norm]))
            query_losses.append(query_loss)
            query_batches.append((q_users, q_items))
        probs = torch.softmax(self.scheduler(torch.stack(features)), 0)
        chosen = torch.multinomial(probs.detach(), max(1, len(probs) // 2), replacement=False)
        meta_loss = torch.stack(query_losses)[chosen].mean()
        self.optimizer.zero_grad(set_to_none=True)
        meta_loss.backward()
        average_gradients(self.model.parameters())
        self.optimizer.step()

        with torch.no_grad():  # reward: how well the drawn tasks' queries do after the update
            after = torch.stack([bpr_loss(self.model(*query_batches[i])) for i in chosen.tolist()]).mean()
        reward = float(all_reduce_mean(-after.detach().double().reshape(1))[0])
        advantage = reward - self.moving_avg_reward
        scheduler_loss = -advantage * torch.log(probs[chosen]).sum()
        self.scheduler_optimizer.zero_grad(set_to_none=True)
        scheduler_loss.backward()
        average_gradients(self.scheduler.parameters())
        self.scheduler_optimizer.step()
        m = self.cfg.meta.baseline_momentum
        self.moving_avg_reward = m * self.moving_avg_reward + (1 - m) * reward
        return {"loss": meta_loss.item(), "lr": self.optimizer.param_groups[0]["lr"], "reward": reward,
                "phase": 0.0}

    def _finetune_step(self, step: int) -> dict[str, float]:
        losses = []
        for task in self._my_tasks(step):
            items = list(self.tasks.support[task]) + list(self.tasks.query[task])
            losses.append(bpr_loss(self.model(*self._ranking_batch(task, items))))
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model.parameters())
        self.optimizer.step()
        return {"loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"],
                "reward": self.moving_avg_reward, "phase": 1.0}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """recall@K and NDCG@K over all users' test items, users split across ranks."""
        k = self.cfg.meta.top_k
        mine = list(range(self.rank, len(self.tasks.users), self.world))
        recall = ndcg = 0.0
        for t in mine:
            scores = self.model.all_scores(torch.tensor([int(self.tasks.users[t])], device=self.device))[0]
            seen = torch.as_tensor(list(self.tasks.support[t]) + list(self.tasks.query[t]), dtype=torch.long)
            scores[seen.to(self.device)] = -math.inf
            top = torch.topk(scores, min(k, self.n_items)).indices.cpu().tolist()
            test = set(int(i) for i in self.tasks.test[t])
            hits = [r for r, item in enumerate(top) if item in test]
            recall += len(hits) / len(test)
            ideal = sum(1 / math.log2(r + 2) for r in range(min(len(test), k)))
            ndcg += sum(1 / math.log2(r + 2) for r in hits) / ideal
        totals = all_reduce_mean(torch.tensor([recall, ndcg], dtype=torch.float64)) * self.world
        n = len(self.tasks.users)
        return {f"recall@{k}": float(totals[0]) / n, f"ndcg@{k}": float(totals[1]) / n}

    # ------------------------------------------------------------------ state

    def state_dict(self, weights_only: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"model": module_state(self.model), "task_scheduler": module_state(self.scheduler),
                                 "tasks_fingerprint": self.fingerprint}
        if not weights_only:
            state["optim"] = optimizer_state(self.model, self.optimizer)
            state["task_scheduler_optim"] = optimizer_state(self.scheduler, self.scheduler_optimizer)
            state["moving_avg_reward"] = self.moving_avg_reward
        return state

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False, step: int = 0) -> None:
        if state["tasks_fingerprint"] != self.fingerprint:
            raise DataError(f"the task set in tasks/tasks.npz (fingerprint {self.fingerprint}) does not match the "
                            f"one this run was trained on ({state['tasks_fingerprint']}); it was changed or "
                            f"replaced. Restore the run's original tasks/ directory or start a new --run-dir.")
        load_module_state(self.model, state["model"])
        load_module_state(self.scheduler, state["task_scheduler"])
        if weights_only:
            self._build_optimizers()
            self.moving_avg_reward = 0.0
            return
        load_optimizer_state(self.model, self.optimizer, state["optim"])
        load_optimizer_state(self.scheduler, self.scheduler_optimizer, state["task_scheduler_optim"])
        self.moving_avg_reward = float(state["moving_avg_reward"])
        for group in self.scheduler_optimizer.param_groups:
            group["lr"] = self.cfg.optim.scheduler_lr  # the config's lr wins (fine-tuning with a new lr)
