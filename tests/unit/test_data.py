import numpy as np
import pytest

from trainers.common import DataError, global_batch_indices
from trainers.encoder.data import load_series, synthetic_series
from trainers.recommender.data import (
    TEST,
    TRAIN,
    VAL,
    build_tasks,
    load_interactions,
    load_tasks,
    save_tasks,
    synthetic_interactions,
)


def test_series_files(tmp_path):
    arr = synthetic_series(100, 3, seed=1)
    np.save(tmp_path / "s.npy", arr)
    assert np.array_equal(load_series(tmp_path / "s.npy"), arr)
    (tmp_path / "s.csv").write_text("a,b\n1,2\n3,4\n")
    assert load_series(tmp_path / "s.csv").tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("name,content,needle", [
    ("bad.csv", "1,2\n3,x\n", "bad.csv, line 2"),
    ("ragged.csv", "1,2\n3,4,5\n", "line 2: 3 columns; expected 2"),
    ("empty.csv", "", "no data rows"),
    ("s.txt", "1\n", "unsupported suffix"),
])
def test_series_errors_name_file_and_line(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=needle):
        load_series(tmp_path / name)


def test_series_npy_shape_error(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match=r"shape \(2, 3, 4\).*expected a numeric 2-D array"):
        load_series(tmp_path / "cube.npy")


def test_interactions_csv(tmp_path):
    (tmp_path / "i.csv").write_text("user,item,rating,timestamp\nu2,b,5,20\nu1,a,4,10\nu1,c,3,30\n")
    data = load_interactions(tmp_path / "i.csv")
    assert (data.n_users, data.n_items) == (2, 3)
    assert data.users.tolist() == [0, 1, 0]  # ordered by timestamp
    (tmp_path / "bad.csv").write_text("u1,a,4,10\nu1,b,x,11\n")
    with pytest.raises(DataError, match="bad.csv, line 2"):
        load_interactions(tmp_path / "bad.csv")
    (tmp_path / "wide.csv").write_text("u1,a,4,10,extra\n")
    with pytest.raises(DataError, match="5 columns; expected user,item"):
        load_interactions(tmp_path / "wide.csv")


def test_task_set_saved_once_and_fingerprinted(tmp_path):
    data = synthetic_interactions(40, 40, 16, seed=0)
    tasks = build_tasks(data, query_size=3, min_support=4, val_users=0.2, test_users=0.2, seed=5)
    fp = save_tasks(tasks, tmp_path)
    again = load_tasks(tmp_path)
    assert again.fingerprint() == fp
    assert [a.tolist() for a in again.histories] == [a.tolist() for a in tasks.histories]
    assert again.item_ids == tasks.item_ids and again.roles.tolist() == tasks.roles.tolist()
    assert build_tasks(data, 3, 4, 0.2, 0.2, seed=6).fingerprint() != fp  # another shuffle is another task set


def test_held_out_users_are_separate_and_never_trained_on():
    data = synthetic_interactions(50, 40, 12, seed=1)
    tasks = build_tasks(data, query_size=3, min_support=4, val_users=0.2, test_users=0.1, seed=0)
    groups = [set(tasks.users[tasks.of(role)].tolist()) for role in (TRAIN, VAL, TEST)]
    assert [len(g) for g in groups] == [35, 10, 5]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    with pytest.raises(DataError, match="too few for data.val_users"):
        build_tasks(synthetic_interactions(3, 40, 12, seed=1), 3, 4, 0.2, 0.1, seed=0)


def test_global_batches_cover_each_epoch_once_at_any_world_size():
    n, b = 50, 8
    for world in (1, 2, 4):
        seen = [global_batch_indices(n, b, 3, s, r, world).tolist() for s in range(6) for r in range(world)]
        flat = [i for part in seen for i in part]
        assert len(flat) == len(set(flat)) == 48
        assert flat == [i for s in range(6) for i in global_batch_indices(n, b, 3, s, 0, 1).tolist()]
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        global_batch_indices(n, b, 0, 0, 0, 3)
