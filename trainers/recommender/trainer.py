"""Meta-learning recommender (seed 000): a Recommender plus a learned task Scheduler.

Users are split once per run into training users and held-out validation and test users
(``data.val_users``, ``data.test_users``). A user is represented by a vector adapted on the
user's items (``trainers/recommender/model.py``).

Meta-learning phase (steps ``< meta.steps``): each training user is a task. Every step each
task's items are drawn anew into a support set (``meta.support_fraction``) and a query set;
the user vector is adapted on the support set and scored on the query set. The Scheduler turns
per-task features into probabilities, half of the tasks are drawn from them, and their query
loss, differentiated through the adaptation (second order), updates the recommender (Adam,
``optim.meta_update_lr``). The Scheduler is trained by REINFORCE with its own Adam: reward =
minus the drawn tasks' query loss after the update, against a moving-average baseline
``moving_avg_reward``.

Fine-tune phase: plain training without the support/query split: each training user's vector
is adapted on all the user's items and trained to rank those items (``optim.finetune_lr``).
``meta.steps=0`` trains this way only: the same model without meta-learning.

Evaluation: each held-out user's vector is adapted on the support set (all but the newest
``data.query_size`` items) and recall@K / NDCG@K are measured on the query set, for the
validation users (``val_*``, which choose the best checkpoint) and the test users (``test_*``),
next to a popularity ranking of the same users (``*_popular``).

The task set is shuffled once per run and written once to ``RUN_DIR/tasks/`` (not into every
checkpoint); a resume reloads it and refuses a set whose fingerprint differs from the one the
checkpoint recorded. A run started with ``--init-from`` carries the source run's task set, or
builds its own (``data.tasks_on_init``).
"""

from __future__ import annotations

import inspect
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.adam import adam

from launcher.config import Checks
from launcher.exact import average_gradients
from launcher.rng import step_generator
from trainers.common import (
    DataError,
    all_reduce_mean,
    global_batch_indices,
    load_module_state,
    load_optimizer_state,
    module_state,
    optimizer_state,
)
from trainers.lr import LrControl
from trainers.protocol import TrainContext
from trainers.recommender.data import (
    TEST,
    TRAIN,
    VAL,
    TaskSet,
    build_tasks,
    load_interactions,
    load_tasks,
    save_tasks,
    synthetic_interactions,
)
from trainers.recommender.model import Recommender, Scheduler, item_loss, pad, recall_ndcg, top_k

log = logging.getLogger("launcher")


@dataclass
class RecData:
    """Interactions, the users held out for evaluation, and the task batches."""

    path: str = ""  # interactions CSV 'user,item[,rating,timestamp]'; "" = synthetic
    synthetic_users: int = 2000  # users of the synthetic data
    synthetic_items: int = 300  # items of the synthetic data
    synthetic_per_user: int = 24  # interactions per synthetic user
    query_size: int = 4  # newest items of a held-out user that are scored (the rest is adapted on)
    min_support: int = 4  # users with fewer than min_support + query_size items are left out
    val_users: float = 0.15  # share of users held out for validation (they choose the best checkpoint)
    test_users: float = 0.15  # share of users held out for the test metrics
    batch_size: int = 128  # global: tasks (training users) per step, split over ranks
    tasks_on_init: str = "carry"  # with --init-from: "carry" the source run's task set, or "rebuild" it here

    def __post_init__(self) -> None:
        check = Checks("data")
        for name in ("synthetic_users", "synthetic_items", "synthetic_per_user", "query_size", "min_support",
                     "batch_size"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("val_users", "test_users"):
            check(0 < getattr(self, name) < 0.5, name, getattr(self, name), "a number between 0 and 0.5")
        check(self.tasks_on_init in ("carry", "rebuild"), "tasks_on_init", self.tasks_on_init, "'carry' or 'rebuild'")
        check.done()


@dataclass
class RecModel:
    """Sizes of the recommender and the Scheduler (changing any on resume is refused)."""

    dim: int = 16  # embedding width (items and the adapted user vector)
    scheduler_hidden: int = 16  # Scheduler MLP width

    def __post_init__(self) -> None:
        check = Checks("model")
        for name in ("dim", "scheduler_hidden"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check.done()


@dataclass
class RecOptim:
    """Learning rates of the two optimizers, and where the inner loop's step sizes start."""

    meta_update_lr: float = 0.03  # recommender Adam lr in the meta-learning phase
    inner_lr: float = 5.0  # initial step size of the per-user adaptation (then learned per dimension)
    scheduler_lr: float = 0.001  # Scheduler Adam lr
    finetune_lr: float = 0.01  # recommender Adam lr in the fine-tune phase

    def __post_init__(self) -> None:
        check = Checks("optim")
        for name in ("meta_update_lr", "inner_lr", "scheduler_lr", "finetune_lr"):
            check(getattr(self, name) > 0, name, getattr(self, name), "a number > 0")
        check.done()


@dataclass
class RecMeta:
    """The meta-learning phase, the per-user adaptation and evaluation."""

    steps: int = 80  # optimizer steps of the meta-learning phase; fine-tuning follows
    inner_steps: int = 3  # gradient steps that adapt a user vector (training, evaluation, packages)
    support_fraction: float = 0.5  # share of a training user's items drawn as support set each meta step
    baseline_momentum: float = 0.9  # moving_avg_reward = m * moving_avg_reward + (1 - m) * reward
    top_k: int = 10  # K of recall@K and NDCG@K

    def __post_init__(self) -> None:
        check = Checks("meta")
        check(self.steps >= 0, "steps", self.steps, "an integer >= 0")
        check(self.inner_steps >= 1, "inner_steps", self.inner_steps, "an integer >= 1")
        check(0 < self.support_fraction < 1, "support_fraction", self.support_fraction, "a number between 0 and 1")
        check(0 <= self.baseline_momentum < 1, "baseline_momentum", self.baseline_momentum, "a number in [0, 1)")
        check(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        check.done()


class RecommenderTrainer:
    """Meta-learning then fine-tuning of :class:`Recommender`, tasks weighted by :class:`Scheduler`."""

    config_sections = {"data": RecData, "model": RecModel, "optim": RecOptim, "meta": RecMeta}
    shape_fields = ("model.",)
    best = ("val_ndcg@10", "max")
    #: State entries a package needs (``python -m launcher.ckpt package``).
    package_keys = ("model",)

    def setup(self, ctx: TrainContext) -> None:
        cfg = self.cfg = ctx.config
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        self.report = ctx.step_metrics
        self.initializing = ctx.fresh and ctx.source is not None  # --init-from: a new run from another's weights
        self.tasks = self._task_set(ctx)
        self.fingerprint = self.tasks.fingerprint()
        self.train_tasks = self.tasks.of(TRAIN)
        if len(self.train_tasks) < cfg.data.batch_size:
            raise DataError(f"{len(self.train_tasks)} training users (tasks) but data.batch_size="
                            f"{cfg.data.batch_size}; lower data.batch_size or add data")
        self.n_items = len(self.tasks.item_ids)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        m = cfg.model
        self.model = Recommender(self.n_items, m.dim, cfg.optim.inner_lr).to(self.device)
        self.scheduler = Scheduler(m.scheduler_hidden).to(self.device)
        self.lr_control = LrControl({"model": (self._model_lr_key(0), "optim"),
                                     "scheduler": ("optim.scheduler_lr", "task_scheduler_optim")},
                                    {"model": self._model_lr(0), "scheduler": cfg.optim.scheduler_lr})
        self._build_optimizers()
        # Scratch copy for the meta step's look-ahead (the parameters Adam's update will give): not saved.
        self._ahead = Recommender(self.n_items, m.dim, cfg.optim.inner_lr).to(self.device)
        self.moving_avg_reward = 0.0
        self._popular: dict[str, float] | None = None

    # ------------------------------------------------------------------ the task set

    def _task_set(self, ctx: TrainContext) -> TaskSet:
        """This run's task set: reloaded, carried from the run of ``ctx.source``, or built (and saved once)."""
        own = ctx.run_dir / "tasks"
        try:
            return load_tasks(own)
        except FileNotFoundError:
            pass
        source_run = ctx.source.parent.parent if ctx.source is not None else None
        if source_run is not None and source_run.resolve() == ctx.run_dir.resolve():
            raise DataError(f"{own / 'tasks.npz'}: the run's task set is missing, but this run has checkpoints. It "
                            f"is written once at the start of a run and reloaded on resume; restore it, or start "
                            f"a new --run-dir.")
        # Continuing another run's checkpoint needs its task set; a run initialised from one may choose.
        if source_run is not None and (not ctx.fresh or self.cfg.data.tasks_on_init == "carry"):
            return self._carry(source_run / "tasks", own, ctx)
        tasks = self._build()
        if ctx.rank == 0:
            save_tasks(tasks, own)
        if source_run is not None:
            log.info("Task set rebuilt from this run's data (data.tasks_on_init=rebuild): %s; users held out in "
                     "%s's run may be training users here", tasks.counts(), ctx.source)
        return tasks

    def _carry(self, source: Path, own: Path, ctx: TrainContext) -> TaskSet:
        try:
            tasks = load_tasks(source)
        except FileNotFoundError:
            raise DataError(f"{ctx.source} belongs to a run whose task set ({source / 'tasks.npz'}) is missing, and "
                            f"this run has none yet. Restore it, or pass --set data.tasks_on_init=rebuild to build "
                            f"a new one from this run's data (the held-out users may then differ).") from None
        if ctx.rank == 0:
            own.mkdir(parents=True, exist_ok=True)
            for name in ("tasks.npz", "tasks.json"):
                shutil.copyfile(source / name, own / f".{name}.tmp")
                (own / f".{name}.tmp").replace(own / name)
        log.info("Task set carried from %s (fingerprint %s): %s, the same users held out", source,
                 tasks.fingerprint(), tasks.counts())
        return tasks

    def _build(self) -> TaskSet:
        d = self.cfg.data
        data = load_interactions(d.path) if d.path else synthetic_interactions(
            d.synthetic_users, d.synthetic_items, d.synthetic_per_user, self.cfg.train.seed)
        return build_tasks(data, d.query_size, d.min_support, d.val_users, d.test_users, self.cfg.train.seed)

    def steps_per_epoch(self) -> int:
        return len(self.train_tasks) // self.cfg.data.batch_size

    def milestones(self) -> dict[int, str]:
        """Steps whose checkpoint retention keeps: the end of the meta-learning phase."""
        return {self.cfg.meta.steps: "end of meta-learning"} if self.cfg.meta.steps > 0 else {}

    # ------------------------------------------------------------------ steps

    def _build_optimizers(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.meta_update_lr)
        self.scheduler_optimizer = torch.optim.Adam(self.scheduler.parameters(), lr=o.scheduler_lr)

    def _model_lr_key(self, step: int) -> str:
        """The config key of the recommender optimizer's lr at ``step``: one per phase."""
        return "optim.meta_update_lr" if step < self.cfg.meta.steps else "optim.finetune_lr"

    def _model_lr(self, step: int) -> float:
        return getattr(self.cfg.optim, self._model_lr_key(step).split(".")[1])

    def _lrs(self, step: int) -> tuple[float, float]:
        """The learning rates of step ``step``: the recommender's and the Scheduler's."""
        return (self.lr_control.base("model", self._model_lr(step)),
                self.lr_control.base("scheduler", self.cfg.optim.scheduler_lr))

    def _set_lrs(self, step: int) -> None:
        """Apply step ``step``'s learning rates (saved state: only after the step's last collective)."""
        lr, slr = self._lrs(step)
        for optimizer, value in ((self.optimizer, lr), (self.scheduler_optimizer, slr)):
            for group in optimizer.param_groups:
                group["lr"] = value
        self.lr_control.record("model", lr, self._model_lr_key(step + 1), self._model_lr(step + 1))
        self.lr_control.record("scheduler", slr, "optim.scheduler_lr", self.cfg.optim.scheduler_lr)

    def _my_tasks(self, step: int) -> list[int]:
        picks = global_batch_indices(len(self.train_tasks), self.cfg.data.batch_size, self.cfg.train.seed,
                                     step, self.rank, self.world).tolist()
        return [self.train_tasks[i] for i in picks]

    def train_step(self, step: int) -> dict[str, float]:
        """One step. Every collective of a step comes before its first change to saved state, so a
        peer lost during it leaves this rank at the step boundary (a snapshot can be written)."""
        lr = self._lrs(step)[0]  # before the step: its end may hand a set-lr override to the next phase
        histories = [self.tasks.histories[t] for t in self._my_tasks(step)]
        if step < self.cfg.meta.steps:
            return self._meta_step(step, histories, lr)
        return self._finetune_step(step, histories, lr)

    def _split(self, histories: list, g: torch.Generator) -> tuple[list, list]:
        """Each training user's items drawn anew into a support set and a query set."""
        supports, queries = [], []
        for items in histories:
            order = torch.randperm(len(items), generator=g).tolist()
            n = min(len(items) - 1, max(1, round(self.cfg.meta.support_fraction * len(items))))
            supports.append([int(items[i]) for i in order[:n]])
            queries.append([int(items[i]) for i in order[n:]])
        return supports, queries

    def _meta_step(self, step: int, histories: list, lr: float) -> dict[str, float]:
        # The step's draws (support/query splits, the tasks drawn) from its own stream: a function of
        # (seed, step, rank), so nothing about them is saved and any rank's checkpoint restores all.
        seed = self.cfg.train.seed
        supports, queries = self._split(histories, step_generator(seed, step, self.rank, "splits"))
        s_items, s_valid = pad(supports, self.device)
        q_items, q_valid = pad(queries, self.device)
        users, support_loss, grad_norm = self.model.adapt(s_items, s_valid, self.cfg.meta.inner_steps, True)
        query_loss = item_loss(self.model.scores(users), q_items, q_valid)
        features = torch.stack([support_loss, query_loss.detach(), grad_norm], 1)
        probs = torch.softmax(self.scheduler(features), 0)
        chosen = torch.multinomial(probs.detach(), max(1, len(probs) // 2), replacement=False,
                                   generator=step_generator(seed, step, self.rank, "tasks", self.device))
        meta_loss = query_loss[chosen].mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler_optimizer.zero_grad(set_to_none=True)
        meta_loss.backward()
        # REINFORCE: the Scheduler's gradient is -advantage times this one; the advantage needs the
        # reward, known only after the update, so it scales the averaged gradient below.
        torch.log(probs[chosen]).sum().backward()
        average_gradients([*self.model.parameters(), *self.scheduler.parameters()])  # one collective for both

        # Reward: how well the drawn tasks' queries do after the update, on the parameters Adam's
        # update will give (computed on a copy: the model and the optimizers change only after the
        # step's last collective, the reward's average).
        adam_look_ahead(self.optimizer, lr, list(self._ahead.parameters()))
        picked = chosen.tolist()
        after_users, _, _ = self._ahead.adapt(s_items[picked], s_valid[picked], self.cfg.meta.inner_steps, False)
        with torch.no_grad():
            after = item_loss(self._ahead.scores(after_users), q_items[picked], q_valid[picked]).mean()
        mine = -after.detach().double().reshape(1).cpu()
        # This rank's reward in the step's metrics (the loop averages them over the ranks, as the
        # collective below does): on record before the step's last collective and any change of
        # state, so the survivors' snapshot has this step whenever this rank dies (the step contract).
        metrics = {"loss": meta_loss.detach(), "reward": float(mine[0]), "phase": 0.0, "lr": lr}
        self.report(**metrics)
        reward = float(all_reduce_mean(mine)[0])
        advantage = reward - self.moving_avg_reward

        self._set_lrs(step)  # saved state changes from here on; no collective follows
        self.optimizer.step()
        for p in self.scheduler.parameters():
            if p.grad is not None:
                p.grad.mul_(-advantage)
        self.scheduler_optimizer.step()
        m = self.cfg.meta.baseline_momentum
        self.moving_avg_reward = m * self.moving_avg_reward + (1 - m) * reward
        return metrics

    def _finetune_step(self, step: int, histories: list, lr: float) -> dict[str, float]:
        items, valid = pad([list(h) for h in histories], self.device)
        users, _, _ = self.model.adapt(items, valid, self.cfg.meta.inner_steps, True)
        loss = item_loss(self.model.scores(users), items, valid).mean()
        metrics = {"loss": loss.detach(), "reward": self.moving_avg_reward, "phase": 1.0, "lr": lr}  # no sync here
        self.report(**metrics)  # on record before the collective and any change of state (the step contract)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model.parameters())  # the step's collective; saved state changes only after it
        self._set_lrs(step)
        self.optimizer.step()
        return metrics

    # ------------------------------------------------------------------ evaluation

    def held_out(self, role: int) -> tuple[list, list]:
        """Support and query sets of the held-out users with ``role`` (VAL or TEST), in task order."""
        q = self.cfg.data.query_size
        hist = [self.tasks.histories[t] for t in self.tasks.of(role)]
        return [h[:-q].tolist() for h in hist], [h[-q:].tolist() for h in hist]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """recall@K and NDCG@K of the validation and test users, each adapted on its support set,
        next to a popularity ranking; users split across ranks."""
        k = self.cfg.meta.top_k
        out: dict[str, float] = {}
        for name, role in (("val", VAL), ("test", TEST)):
            supports, queries = self.held_out(role)
            mine = list(range(self.rank, len(supports), self.world))
            top = top_k(self.model, [supports[i] for i in mine], k, self.cfg.meta.inner_steps).cpu().tolist()
            sums = self._reduce(recall_ndcg(top, [queries[i] for i in mine], k))
            out[f"{name}_recall@{k}"], out[f"{name}_ndcg@{k}"] = sums[0] / len(supports), sums[1] / len(supports)
        if self._popular is None:
            self._popular = self._popularity(k)
        return {**out, **self._popular}

    def _reduce(self, sums: tuple[float, float]) -> list[float]:
        return (all_reduce_mean(torch.tensor(sums, dtype=torch.float64)) * self.world).tolist()

    def _popularity(self, k: int) -> dict[str, float]:
        """The same metrics for ranking by the number of training users who chose each item."""
        counts = torch.zeros(self.n_items, dtype=torch.float64)
        for t in self.train_tasks:
            counts[torch.as_tensor(self.tasks.histories[t], dtype=torch.long)] += 1
        out = {}
        for name, role in (("val", VAL), ("test", TEST)):
            supports, queries = self.held_out(role)
            top = []
            for seen in supports:
                scores = counts.clone()
                scores[torch.as_tensor(seen, dtype=torch.long)] = -1
                top.append(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())
            recall, ndcg = recall_ndcg(top, queries, k)
            out[f"{name}_recall@{k}_popular"], out[f"{name}_ndcg@{k}_popular"] = recall / len(top), ndcg / len(top)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self, weights_only: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"model": module_state(self.model), "task_scheduler": module_state(self.scheduler),
                                 "tasks_fingerprint": self.fingerprint}
        if not weights_only:
            state["optim"] = optimizer_state(self.model, self.optimizer)
            state["task_scheduler_optim"] = optimizer_state(self.scheduler, self.scheduler_optimizer)
            state["moving_avg_reward"] = self.moving_avg_reward
            state["lr_control"] = self.lr_control.to_json()
        return state

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False, step: int = 0,
                        restart_schedule: bool = False) -> None:
        if state["tasks_fingerprint"] != self.fingerprint and not self.initializing:
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
        if self.initializing:
            return  # a new run: its learning rates come from its own config
        self.lr_control.load(state["lr_control"], {"model": (self._model_lr_key(step), self._model_lr(step)),
                                                   "scheduler": ("optim.scheduler_lr", self.cfg.optim.scheduler_lr)})

    # ------------------------------------------------------------------ packages

    @classmethod
    def package_meta(cls, state: dict[str, Any], info: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
        """The item ids (from the run's task set) and the adaptation a package must repeat."""
        cfg = info.get("config", {})
        try:
            item_ids = load_tasks(run_dir / "tasks").item_ids if run_dir is not None else None
        except (FileNotFoundError, DataError):
            item_ids = None
        return {"item_ids": item_ids, "inner_steps": cfg.get("meta", {}).get("inner_steps"),
                "top_k": cfg.get("meta", {}).get("top_k")}

    @classmethod
    def from_package(cls, config, weights: dict[str, torch.Tensor], meta: dict[str, Any]):
        from trainers.recommender.package import RecommenderPackage
        return RecommenderPackage.build(config, weights, meta)


@torch.no_grad()
def adam_look_ahead(optimizer: torch.optim.Adam, lr: float, into: list[torch.nn.Parameter]) -> None:
    """Set ``into`` (tensors shaped like ``optimizer``'s parameters, in order) to what
    ``optimizer.step()`` at ``lr`` would make of its parameters; the optimizer, its state and its
    parameters stay as they are. torch's own Adam function runs on copies of the moments."""
    signature = inspect.signature(adam).parameters
    targets = iter(into)
    for group in optimizer.param_groups:
        params, grads, avgs, sqs, maxes, steps = [], [], [], [], [], []
        for p in group["params"]:
            q = next(targets)
            q.copy_(p)
            if p.grad is None:
                continue
            st = optimizer.state.get(p) or {}
            on_device = group.get("capturable") or group.get("fused")
            params.append(q)
            grads.append(p.grad)
            avgs.append(st["exp_avg"].clone() if st else torch.zeros_like(p, memory_format=torch.preserve_format))
            sqs.append(st["exp_avg_sq"].clone() if st else torch.zeros_like(p, memory_format=torch.preserve_format))
            if group["amsgrad"]:
                maxes.append(st["max_exp_avg_sq"].clone() if st else torch.zeros_like(p))
            steps.append(st["step"].clone() if st else torch.tensor(0.0, device=p.device if on_device else None))
        flags = {k: group[k] for k in ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
                 if k in group and k in signature}
        beta1, beta2 = group["betas"]
        adam(params, grads, avgs, sqs, maxes, steps, amsgrad=group["amsgrad"], beta1=beta1,
                              beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
                              maximize=group["maximize"], **flags)
