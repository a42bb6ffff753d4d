"""Interactions for the meta-learning recommender: a CSV file or a deterministic generator.

Each user is one meta-learning task. A user's interactions, in time order, are split into a
support set (adapted on), a query set (meta-loss) and held-out test items (recall/NDCG).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.common import DataError


@dataclass
class Interactions:
    """Contiguous ``users`` and ``items`` indices in time order, and their original ids."""

    users: np.ndarray
    items: np.ndarray
    n_users: int
    n_items: int


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
    return Interactions(np.asarray(users), np.asarray(items), n_users, n_items)


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
    item_ids = {t: i for i, t in enumerate(sorted({r[1] for r in rows}))}
    return Interactions(np.asarray([user_ids[r[0]] for r in rows]), np.asarray([item_ids[r[1]] for r in rows]),
                        len(user_ids), len(item_ids))


@dataclass
class TaskSet:
    """Per-user tasks in their shuffled order: support items, query items, test items."""

    users: np.ndarray  # [n_tasks] user index of each task
    support: list[np.ndarray]
    query: list[np.ndarray]
    test: list[np.ndarray]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.users.tobytes())
        for part in (self.support, self.query, self.test):
            for arr in part:
                h.update(np.asarray(arr, np.int64).tobytes())
                h.update(b"|")
        return h.hexdigest()[:16]


def build_tasks(data: Interactions, query_size: int, test_size: int, min_support: int, seed: int) -> TaskSet:
    """Split each user's history into support/query/test and shuffle the task order once."""
    by_user: dict[int, list[int]] = {}
    for u, i in zip(data.users.tolist(), data.items.tolist(), strict=True):
        seq = by_user.setdefault(u, [])
        if i not in seq:
            seq.append(i)
    users, support, query, test = [], [], [], []
    for u in sorted(by_user):
        seq = by_user[u]
        if len(seq) < min_support + query_size + test_size:
            continue
        users.append(u)
        support.append(np.asarray(seq[:len(seq) - query_size - test_size]))
        query.append(np.asarray(seq[len(seq) - query_size - test_size:len(seq) - test_size]))
        test.append(np.asarray(seq[len(seq) - test_size:]))
    if not users:
        raise DataError(f"no user has the {min_support + query_size + test_size} interactions needed for "
                        f"data.min_support + data.query_size + data.test_size; lower them or add data")
    index = np.random.default_rng(seed).permutation(len(users))
    pick = lambda seq: [seq[j] for j in index]  # noqa: E731
    return TaskSet(np.asarray(users)[index], pick(support), pick(query), pick(test))


def save_tasks(tasks: TaskSet, directory: Path) -> str:
    """Write the task set once per run (``tasks.npz`` + ``tasks.json``); return its fingerprint."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"users": tasks.users}
    for name in ("support", "query", "test"):
        seqs = getattr(tasks, name)
        arrays[f"{name}_items"] = np.concatenate(seqs) if seqs else np.empty(0, np.int64)
        arrays[f"{name}_lengths"] = np.asarray([len(s) for s in seqs])
    tmp = directory / "tasks.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(directory / "tasks.npz")
    fingerprint = tasks.fingerprint()
    (directory / "tasks.json").write_text(json.dumps({"fingerprint": fingerprint, "tasks": len(tasks.users)}))
    return fingerprint


def load_tasks(directory: Path) -> TaskSet:
    path = directory / "tasks.npz"
    if not path.is_file():
        raise DataError(f"{path}: the run's task set is missing, but checkpoints exist. It is written once "
                        f"at the start of a run and reloaded on resume; restore it, or start a new --run-dir.")
    with np.load(path, allow_pickle=False) as z:
        def split(name: str) -> list[np.ndarray]:
            lengths = z[f"{name}_lengths"]
            return np.split(z[f"{name}_items"], np.cumsum(lengths)[:-1]) if len(lengths) else []
        return TaskSet(z["users"], split("support"), split("query"), split("test"))
