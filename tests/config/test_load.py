"""Config loading: strict keys, types, YAML pitfalls (RELIABILITY.md §3.3 C1–C7) and dotted overrides."""

from pathlib import Path

import pytest

from lifealign.config import ConfigError, load_config, trajectory_hash
from lifealign.config.load import apply_override

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_dotted_path_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: tiny\ntrain:\n  lr: 1.0e-4\n  learing_rate: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:5: unknown key 'train.learing_rate'" in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 1.5\n  lr: high\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "train.batch_size" in msg and "1.5" in msg
    assert "train.lr" in msg and "'high'" in msg


@pytest.mark.parametrize("text, value", [("1e-5", 1e-5), ("5e-07", 5e-7), ("0.001", 1e-3)])
def test_float_written_without_dot_is_a_float(tmp_path, text, value):
    """PyYAML reads ``1e-5`` as a string; float fields must still accept it (C3)."""
    cfg = load_config(write(tmp_path, f"train:\n  lr: {text}\n"))
    assert cfg.train.lr == pytest.approx(value)


def test_duplicate_key_is_an_error_with_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  seed: 1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:4: duplicate key 'lr' \(first at line 2\)"):
        load_config(path)


def test_invalid_yaml_reports_position(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "train:\n\tlr: 1\n"))


def test_out_of_range_values_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(write(tmp_path, "train:\n  lr: -1\n"))
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(write(tmp_path, "data:\n  max_length: 64\n  max_prompt_length: 64\n"))


def test_task_name_with_path_separator_rejected(tmp_path):
    with pytest.raises(ConfigError, match="tasks.0.name"):
        load_config(write(tmp_path, "tasks:\n  - name: ../evil\n    train: x.json\n"))


def test_overrides_parse_as_yaml_and_validate(tmp_path):
    path = write(tmp_path, "tasks:\n  - {name: a, train: a.json}\n")
    cfg = load_config(path, ["train.lr=2e-4", "tasks.0.max_train=8", "method.loss.0.name=fpo"])
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.tasks[0].max_train == 8
    assert cfg.method.loss[0].name == "fpo"
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(path, ["train.nope=1"])


def test_apply_override_requires_equals():
    with pytest.raises(ConfigError):
        apply_override({}, "train.lr")


def test_loss_accepts_single_mapping_and_keeps_extra_kwargs(tmp_path):
    cfg = load_config(write(tmp_path, "method:\n  loss: {name: fpo, beta: 0.2, gamma: 2.0}\n"))
    assert len(cfg.method.loss) == 1
    assert cfg.method.loss[0].kwargs == {"beta": 0.2, "gamma": 2.0}


def test_trajectory_hash_ignores_logging_keys_only(tmp_path):
    base = load_config(write(tmp_path, "train:\n  lr: 0.1\n"))
    logging_change = base.model_copy(update={"train": base.train.model_copy(update={"log_every": 7})})
    lr_change = base.model_copy(update={"train": base.train.model_copy(update={"lr": 0.2})})
    assert trajectory_hash(base) == trajectory_hash(logging_change)
    assert trajectory_hash(base) != trajectory_hash(lr_change)


def test_trajectory_hash_ignores_threads_and_covers_one_method_when_given(tmp_path):
    two = load_config(write(tmp_path, "methods:\n  - {name: a, loss: {name: dpo}}\n  - {name: b, loss: {name: ipo}}\n"))
    three = load_config(
        write(
            tmp_path,
            "methods:\n  - {name: a, loss: {name: dpo}}\n  - {name: b, loss: {name: ipo}}\n  - {name: c, loss: {name: fpo}}\n",
        )
    )
    threads = two.model_copy(update={"train": two.train.model_copy(update={"threads": 1})})
    assert trajectory_hash(two) == trajectory_hash(threads)
    assert trajectory_hash(two) != trajectory_hash(three)  # the whole list counts without a method
    a2, a3 = two.all_methods()[0], three.all_methods()[0]
    assert trajectory_hash(two, a2) == trajectory_hash(three, a3)  # adding method c keeps a's checkpoints valid
    assert trajectory_hash(two, a2) != trajectory_hash(two, two.all_methods()[1])


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "src/lifealign/configs").rglob("*.yaml"))
    assert configs, "no shipped configs found"
    for path in configs:
        if "accelerate" in path.parts:
            continue
        load_config(path)
