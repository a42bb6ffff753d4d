"""Interactions for the meta-learning recommender: a CSV file or a deterministic generator.

Each user is one meta-learning task. Users are split once per run into training users (the
meta-learning and fine-tuning tasks) and two groups of held-out users, validation and test,
who are never trained on: at evaluation each held-out user's history, in time order, is cut
into a support set (adapted on) and a query set (the newest ``query_size`` items, scored).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.common import DataError

TRAIN, VAL, TEST = 0, 1, 2
ROLES = {"train": TRAIN, "val": VAL, "test": TEST}


@dataclass
class Interactions:
    """Contiguous ``users`` and ``items`` indices in time order, and the original item ids."""

    users: np.ndarray
    items: np.ndarray
    n_users: int
    n_items: int
    item_ids: list[str]  # original id of item index i (what a package's user passes in)


def synthetic_interactions(n_users: int, n_items: int, per_user: int, seed: int) -> Interactions:
    """Users with latent tastes pick items they like: a reproducible implicit-feedback set."""
    rng = np.random.default_rng(seed)
    u_lat, i_lat = rng.normal(size=(n_users, 8)), rng.normal(size=(n_items, 8))
    users, items = [], []
    for u in range(n_users):
        logits = i_lat @ u_lat[u] * 1.5
        p = np.exp(logits - logits.max())
        chosen = rng.choice(n_items, size=min(per_user, n_items), replace=False, p=p / p.sum())
        users.extend([u] * len(chosen))
        items.extend(chosen.tolist())
    return Interactions(np.asarray(users), np.asarray(items), n_users, n_items, [str(i) for i in range(n_items)])


def load_interactions(path: str | Path) -> Interactions:
    """Read ``user,item[,rating,timestamp]`` rows (optional header) in time order.

    Ids may be any strings; they are mapped to contiguous indices. With a timestamp column
    rows are ordered by it (stable), otherwise by file order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (set data.path to an interactions CSV "
                        f"'user,item[,rating,timestamp]', or leave it empty for synthetic data)")
    rows: list[tuple[str, str, float]] = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and row[0].strip().lower() in ("user", "user_id", "userid"):
                continue
            if not 2 <= len(row) <= 4:
                raise DataError(f"{path}, line {lineno}: {len(row)} columns; expected user,item[,rating,timestamp]")
            try:
                ts = float(row[3]) if len(row) == 4 else float(len(rows))
                if len(row) >= 3 and row[2].strip():
                    float(row[2])
            except ValueError:
                raise DataError(f"{path}, line {lineno}: {row!r}: rating and timestamp must be numbers") from None
            if not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}, line {lineno}: empty user or item id")
            rows.append((row[0].strip(), row[1].strip(), ts))
    if not rows:
        raise DataError(f"{path}: no interactions; expected rows 'user,item[,rating,timestamp]'")
    rows.sort(key=lambda r: r[2])
    user_ids = {u: i for i, u in enumerate(sorted({r[0] for r in rows}))}
    item_names = sorted({r[1] for r in rows})
    item_ids = {t: i for i, t in enumerate(item_names)}
    return Interactions(np.asarray([user_ids[r[0]] for r in rows]), np.asarray([item_ids[r[1]] for r in rows]),
                        len(user_ids), len(item_ids), item_names)


@dataclass
class TaskSet:
    """Every usable user's history, the user's role, in the order shuffled once for the run."""

    users: np.ndarray  # [n] user index
    roles: np.ndarray  # [n] TRAIN, VAL or TEST
    histories: list[np.ndarray]  # each user's distinct items in time order
    item_ids: list[str]  # original id of each item index

    def of(self, role: int) -> list[int]:
        """Positions (into ``users``/``histories``) of the users with ``role``, in task order."""
        return np.flatnonzero(self.roles == role).tolist()

    def counts(self) -> str:
        return (f"{len(self.users)} users: {len(self.of(TRAIN))} training, {len(self.of(VAL))} validation, "
                f"{len(self.of(TEST))} test")

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.users.tobytes())
        h.update(np.asarray(self.roles, np.int64).tobytes())
        for arr in self.histories:
            h.update(np.asarray(arr, np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def build_tasks(data: Interactions, query_size: int, min_support: int, val_users: float, test_users: float,
                seed: int) -> TaskSet:
    """Keep users with enough history, shuffle them once, and give each a role."""
    by_user: dict[int, list[int]] = {}
    for u, i in zip(data.users.tolist(), data.items.tolist(), strict=True):
        seq = by_user.setdefault(u, [])
        if i not in seq:
            seq.append(i)
    need = min_support + query_size
    users = [u for u in sorted(by_user) if len(by_user[u]) >= need]
    n_val, n_test = int(len(users) * val_users), int(len(users) * test_users)
    if len(users) - n_val - n_test < 1 or n_val < 1 or n_test < 1:
        raise DataError(f"{len(users)} users have the {need} interactions needed for data.min_support + "
                        f"data.query_size, too few for data.val_users={val_users} and data.test_users={test_users} "
                        f"(each group needs at least one user, and one must remain for training); lower "
                        f"data.min_support or data.query_size, or add data")
    index = np.random.default_rng(seed).permutation(len(users))
    ordered = [users[j] for j in index]
    roles = np.full(len(ordered), TRAIN)
    roles[:n_val], roles[n_val:n_val + n_test] = VAL, TEST
    return TaskSet(np.asarray(ordered), roles, [np.asarray(by_user[u]) for u in ordered], list(data.item_ids))


def save_tasks(tasks: TaskSet, directory: Path) -> str:
    """Write the task set once per run (``tasks.npz`` + ``tasks.json``); return its fingerprint."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"users": tasks.users, "roles": tasks.roles,
              "items": np.concatenate(tasks.histories) if tasks.histories else np.empty(0, np.int64),
              "lengths": np.asarray([len(h) for h in tasks.histories]),
              "item_ids": np.asarray(tasks.item_ids, dtype=str)}
    tmp = directory / "tasks.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(directory / "tasks.npz")
    fingerprint = tasks.fingerprint()
    summary = {"fingerprint": fingerprint, "tasks": len(tasks.users),
               **{name: len(tasks.of(role)) for name, role in ROLES.items()}}
    (directory / "tasks.json").write_text(json.dumps(summary))
    return fingerprint


def load_tasks(directory: Path) -> TaskSet:
    """Read a task set written by :func:`save_tasks`; ``FileNotFoundError`` if there is none."""
    path = directory / "tasks.npz"
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            lengths = z["lengths"]
            histories = np.split(z["items"], np.cumsum(lengths)[:-1]) if len(lengths) else []
            return TaskSet(z["users"], z["roles"], histories, [str(i) for i in z["item_ids"]])
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a task set this trainer can read ({e}); it was written by another version "
                        f"or damaged. Restore the run's tasks/ directory or start a new --run-dir.") from None
