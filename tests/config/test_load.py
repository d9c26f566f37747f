"""Config loading: strict keys, types, YAML pitfalls (RELIABILITY.md §3.3 C1–C7) and dotted overrides."""

import math
import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from lifealign.config import ConfigError, RunConfig, dump_config, load_config, trajectory_hash
from lifealign.config.load import apply_override, read_yaml

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


def test_trajectory_hash_ignores_fused_scoring_kernels_but_not_the_score_precision(tmp_path):
    base = load_config(write(tmp_path, "unlearn:\n  score_fused: true\n"))
    eager = base.model_copy(update={"unlearn": base.unlearn.model_copy(update={"score_fused": False})})
    bf16 = base.model_copy(update={"unlearn": base.unlearn.model_copy(update={"score_precision": "bf16"})})
    assert trajectory_hash(base) == trajectory_hash(eager)
    assert trajectory_hash(base) != trajectory_hash(bf16)


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "src/lifealign/configs").rglob("*.yaml"))
    assert configs, "no shipped configs found"
    for path in configs:
        if "accelerate" in path.parts:
            continue
        load_config(path)


# ------------------------------------------------------------------------------------- a first hour without surprises


def two_tasks(tmp_path: Path) -> Path:
    return write(tmp_path, "tasks:\n  - {name: a, train: a.json}\n  - {name: b, train: b.json}\ntrain:\n  lr: 0.1\n")


def test_override_past_the_end_of_a_list_names_the_key_and_the_length(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks\.5 is out of range: tasks is a list of 2 item\(s\)"):
        load_config(two_tasks(tmp_path), ["tasks.5.max_train=3"])
    assert load_config(two_tasks(tmp_path), ["tasks.2.name=c"]).tasks[2].name == "c"  # len(list) appends


def test_override_with_a_non_integer_index_or_below_a_scalar_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks is a list, so 'first' must be an index \(0\.\.1"):
        load_config(two_tasks(tmp_path), ["tasks.first.max_train=3"])
    with pytest.raises(ConfigError, match=r"tasks is a list, so '-1' must be an index"):
        load_config(two_tasks(tmp_path), ["tasks.-1.max_train=3"])
    with pytest.raises(ConfigError, match=r"cannot set 'train.lr.x': train.lr is float \(0.1\), not a mapping"):
        load_config(two_tasks(tmp_path), ["train.lr.x=3"])
    with pytest.raises(ConfigError, match=r"cannot set 'tasks.0.name.x': tasks.0.name is str"):
        load_config(two_tasks(tmp_path), ["tasks.0.name.x=3"])


MERGE_KEYS = """\
tasks:
  - &task {name: a, train: a.json, max_train: 8, max_test: 4}
  - <<: *task
    name: b
    max_test: 2
methods:
  - &m {name: x, loss: {name: dpo, beta: 0.1}}
  - <<: *m
    name: y
"""


def test_yaml_merge_keys_work_and_explicit_keys_win(tmp_path):
    cfg = load_config(write(tmp_path, MERGE_KEYS))
    assert [(t.name, t.train, t.max_train, t.max_test) for t in cfg.tasks] == [
        ("a", "a.json", 8, 4),
        ("b", "a.json", 8, 2),
    ]
    assert [(m.name, m.loss[0].kwargs["beta"]) for m in cfg.methods] == [("x", 0.1), ("y", 0.1)]


def test_yaml_merge_list_takes_the_first_mapping_and_duplicates_next_to_a_merge_are_errors(tmp_path):
    text = "a: &a {lr: 0.1, seed: 1}\nb: &b {lr: 0.2, epochs: 2}\ntrain:\n  <<: [*a, *b]\n"
    data, lines = read_yaml(write(tmp_path, text))
    assert data["train"] == {"lr": 0.1, "seed": 1, "epochs": 2}
    assert lines[("train", "lr")] == 1  # a merged key is located where it is written
    with pytest.raises(ConfigError, match=r"cfg.yaml:5: duplicate key 'lr' \(first at line 4\)"):
        load_config(write(tmp_path, "d: &d {lr: 0.1}\ntrain:\n  <<: *d\n  lr: 0.2\n  lr: 0.3\n"))


def test_override_through_a_merge_or_alias_changes_only_its_own_place(tmp_path):
    """Merged values are shared objects in PyYAML's output; an override must not leak into the other place."""
    cfg = load_config(write(tmp_path, MERGE_KEYS), ["methods.1.loss.beta=0.5", "tasks.0.columns.q=prompt"])
    assert [m.loss[0].kwargs["beta"] for m in cfg.methods] == [0.1, 0.5]
    assert [t.columns for t in cfg.tasks] == [{"q": "prompt"}, {}]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=.inf", "train.lr"),
        ("train.lr=-.inf", "train.lr"),
        ("train.warmup_ratio=.nan", "train.warmup_ratio"),
        ("train.lr=inf", "train.lr"),  # a string for a float field
        ("sft.lr=nan", "sft.lr"),
        ("method.loss.0.beta=.inf", "method.loss.0.beta"),  # loss kwargs are not pydantic floats
        ("method.plugins=[{name: ewc, lam: .nan}]", "method.plugins.0.lam"),
        ("unlearn.loss_args={beta: .inf}", "unlearn.loss_args.beta"),
        ("eval.judge={base_url: 'http://x', model: m, backoff_seconds: .inf}", "eval.judge.backoff_seconds"),
    ],
)
def test_every_number_must_be_finite(tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"cfg.yaml(:\d+)?: {re.escape(key)}: .*finite"):
        load_config(two_tasks(tmp_path), [override])


def test_run_config_built_in_code_refuses_non_finite_numbers_too():
    with pytest.raises(ValidationError, match="finite"):
        RunConfig.model_validate({"train": {"weight_decay": math.inf}})
    with pytest.raises(ValidationError, match=r"method.loss.gamma = nan"):
        RunConfig.model_validate({"method": {"loss": {"name": "fpo", "gamma": math.nan}}})
    cfg = RunConfig()
    with pytest.raises(ValidationError, match="finite"):
        cfg.train.lr = math.inf


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.batch_size=true", "train.batch_size", "expected an integer, got a boolean"),
        ("train.max_steps=false", "train.max_steps", "expected an integer, got a boolean"),  # int | None
        ("tasks.0.max_train=true", "tasks.0.max_train", "expected an integer, got a boolean"),
        ("train.lr=true", "train.lr", "expected a number, got a boolean"),
        ("data.max_skipped_fraction=false", "data.max_skipped_fraction", "expected a number, got a boolean"),
        ("model.lora.r=yes", "model.lora.r", "expected an integer, got a boolean"),  # YAML 1.1 booleans too
        ("unlearn.k=true", "unlearn.k", "expected an integer, got a boolean"),
        ("train.batch_size=2.5", "train.batch_size", "Input should be a valid integer, got a number with a fractional"),
    ],
)
def test_booleans_are_not_numbers_and_ints_do_not_truncate(tmp_path, override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(two_tasks(tmp_path), [override])
    assert f"{key}: {expected}" in str(err.value)


def test_numbers_still_parse_where_they_should(tmp_path):
    cfg = load_config(two_tasks(tmp_path), ["train.lr=1e-5", "train.batch_size=2.0", "train.tensorboard=true"])
    assert cfg.train.lr == pytest.approx(1e-5) and cfg.train.batch_size == 2 and cfg.train.tensorboard is True


def test_method_and_methods_both_set_is_an_error_naming_both(tmp_path):
    text = "method: {name: a}\nmethods:\n  - {name: b}\n  - {name: c}\n"
    with pytest.raises(ConfigError, match=r"both 'method' \(line 1\) and 'methods' \(line 2\) are set"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="both 'method'"):
        load_config(write(tmp_path, "method: {name: a}\n"), ["methods=[{name: b}]"])
    assert load_config(write(tmp_path, "method: {name: a}\nmethods: []\n")).all_methods()[0].name == "a"


def test_a_dumped_comparison_loads_again_and_keeps_its_hashes(tmp_path):
    """``config.yaml`` of a run with ``methods`` leaves the unused ``method`` out, so it is a valid config."""
    cfg = load_config(write(tmp_path, "methods:\n  - {name: b}\n  - {name: c, loss: {name: ipo}}\n"))
    dumped = dump_config(cfg)
    assert "\nmethod:" not in "\n" + dumped and "method" not in cfg.model_dump()
    again = load_config(write(tmp_path, dumped))
    assert again == cfg
    assert trajectory_hash(again) == trajectory_hash(cfg)
    assert trajectory_hash(again, again.methods[1]) == trajectory_hash(cfg, cfg.methods[1])
    single = RunConfig()
    assert "method" in single.model_dump()  # one method: dumped as before


def test_output_dir_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(write(tmp_path, "output_dir: ~/runs/x\n")).output_dir == str(tmp_path / "home/runs/x")
    assert load_config(write(tmp_path, "{}\n"), ["output_dir=~/y"]).output_dir == str(tmp_path / "home/y")


def test_config_path_problems_each_have_their_own_message(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml$"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"config path .* is a directory, not a YAML file"):
        load_config(tmp_path)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"config path .*fifo.yaml is not a regular file \(a FIFO\)"):
        load_config(fifo)  # never opened: opening a FIFO would block
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(ConfigError, match=r"not found: .*link.yaml \(a broken symbolic link to .*gone.yaml\)"):
        load_config(link)
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_config(tmp_path / "latin1.yaml")
    locked = write(tmp_path, "train: {lr: 0.1}\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod 000 does not stop root, who runs CI here
    with pytest.raises(ConfigError, match=r"cannot read config file .*cfg.yaml: Permission denied"):
        load_config(locked)
