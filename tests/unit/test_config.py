import pytest
from helpers import config_path

from launcher.config import ConfigError, apply_overrides, diff_configs, load_config


def test_shipped_configs_load():
    for name in ("encoder", "recommender"):
        cfg = load_config(config_path(name))
        assert cfg.trainer == name
        assert cfg.train.max_steps > 0 and cfg.checkpoint.interval_steps > 0


def test_every_problem_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer: encoder\n"
        "train: {max_steps: 0, seed: -1, colour: blue}\n"
        "checkpoint: {keep_last: 1, async: maybe}\n"
        "model: {d_model: 30, n_heads: 4, dropout: 2}\n"
        "optim: {lr: fast}\n"
        "extra_section: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    text = str(e.value)
    for needle in ("train.max_steps = 0", "train.seed = -1", "train.colour: unknown key",
                   "checkpoint.keep_last = 1", "checkpoint.async = 'maybe'", "model.n_heads = 4",
                   "model.dropout = 2", "optim.lr = 'fast'", "extra_section: unknown section"):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert len(e.value.problems) == 9


def test_overrides_win_over_file_and_parse_types():
    cfg = load_config(config_path("encoder"), ["train.max_steps=7", "optim.lr=0.5", "checkpoint.async=true",
                                               "data.path="])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 0.5 and cfg.checkpoint.async_save is True
    assert cfg.data.path == ""


def test_bad_override_is_clear():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="train.max_steps = 'many': expected an integer"):
        load_config(config_path("encoder"), ["train.max_steps=many"])


def test_unknown_trainer_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "t.yaml"
    p.write_text("trainer: nosuchmodule:Thing\n")
    with pytest.raises(ConfigError, match="cannot import nosuchmodule"):
        load_config(p)


def test_saved_config_round_trips_and_diffs():
    cfg = load_config(config_path("recommender"))
    d = cfg.to_dict()
    assert d["checkpoint"]["async"] is False and "async_save" not in d["checkpoint"]
    other = load_config(config_path("recommender"), ["model.dim=32", "optim.finetune_lr=0.1"]).to_dict()
    assert diff_configs(d, other) == {"model.dim": (16, 32), "optim.finetune_lr": (0.01, 0.1)}
