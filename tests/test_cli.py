"""The command line: exit codes and messages for bad input, `train`, `data inspect`, `report`, secrets."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from lifealign.cli.main import main
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_unknown_config_key_exits_2_naming_key_and_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name_or_path: tiny\ntrain:\n  learing_rate: 1\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml:4: unknown key 'train.learing_rate'" in err


def test_nonexistent_model_path_fails_fast_with_the_path(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": {"name_or_path": "./models/missing"}, "tasks": [{"name": "t", "train": str(data)}]})
    )
    assert main(["train", str(cfg), "--out", str(tmp_path / "out")]) != 0
    assert "models/missing" in capsys.readouterr().err


def test_bad_data_line_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a",}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny"}, "tasks": [{"name": "t", "train": str(data)}]}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert f"{data}:2" in capsys.readouterr().err


def test_unwritable_output_dir_fails_before_loading_a_model(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, n_tasks=1).model_dump(mode="json")))
    assert main(["run", str(cfg), "--out", str(blocker / "run")]) == 1
    assert "is not writable" in capsys.readouterr().err


def test_train_one_task_writes_config_metrics_adapter_and_redacts_secrets(tmp_path, capsys, monkeypatch):
    secret = f"sk-test-{uuid.uuid4()}"
    monkeypatch.setenv("LIFEALIGN_TEST_KEY", secret)
    cfg = tiny_config(
        tmp_path,
        n_tasks=1,
        eval={
            "scorers": ["pref_acc"],
            "max_examples": 8,
            "judge": {"base_url": "http://127.0.0.1:9", "model": "m", "api_key_env": "LIFEALIGN_TEST_KEY"},
        },
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "out"
    assert main(["train", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "pref_acc" in printed.out
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "scores.json").read_text())["seqft"]["pref_acc"]["matrix"][0][0] is not None
    for file in out.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file
    assert secret not in printed.out + printed.err


def test_train_refuses_a_stream(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, n_tasks=2).model_dump(mode="json")))
    assert main(["train", str(path)]) == 2
    assert "exactly one task" in capsys.readouterr().err


def test_data_inspect_reports_counts_and_skips(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps(
            [
                {"query": "q1", "chosen": "a", "rejected": "b"},
                {"query": "q2", "chosen": "same", "rejected": "same"},
                {"query": "q3", "chosen": "", "rejected": "b"},
            ]
        )
    )
    assert main(["data", "inspect", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    text = json.dumps(result)
    assert "identical_pair" in text and "empty_response" in text


def test_module_entry_point_and_report(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, n_tasks=2, train={"max_steps": 2}).model_dump(mode="json")))
    run = subprocess.run(
        [sys.executable, "-m", "lifealign", "run", str(cfg), "--out", str(tmp_path / "r")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| seqft |" in run.stdout
    rep = subprocess.run(
        [sys.executable, "-m", "lifealign", "report", str(tmp_path / "r"), "--out", str(tmp_path / "rep")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "rep" / "report.md").exists()
    assert list((tmp_path / "rep").glob("*.png"))


def test_eval_scores_a_saved_adapter_like_the_run_did(tmp_path, capsys):
    cfg = tiny_config(tmp_path, n_tasks=1, eval={"scorers": ["pref_acc"], "max_examples": 8, "drift": False})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "out"
    assert main(["train", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(path), "--adapter", str(out / "adapter"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["arithmetic"]
    trained = json.loads((out / "scores.json").read_text())["seqft"]
    assert evaluated["scores"]["pref_acc"] == trained["pref_acc"]["matrix"][0][0]
    assert abs(evaluated["scores"]["margin"] - trained["margin"]["matrix"][0][0]) < 1e-5
    assert evaluated["n"]["pref_acc"] == trained["pref_acc"]["n_items"][0] == 8


def test_eval_of_the_base_model_reports_a_likelihood_accuracy_beside_the_50_of_pref_acc(tmp_path, capsys):
    """Without an adapter pref_acc is the model against itself (every pair ties: 50); logp_acc compares
    log pi(chosen) with log pi(rejected), which means something for any model; the table says how many pairs."""
    path = _one_task_config(tmp_path)
    assert main(["eval", str(path), "eval.drift=false", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["arithmetic"]
    assert result["scores"]["pref_acc"] == 50.0
    assert {"logp_acc", "logp_acc_norm"} <= set(result["scores"]) and result["n"]["logp_acc"] == 8
    assert main(["eval", str(path), "eval.drift=false"]) == 0
    table = capsys.readouterr().out
    assert "| task | pairs | pref_acc |" in table and "| arithmetic | 8 |" in table and "50 by construction" in table


def test_eval_with_no_held_out_pairs_is_an_error(tmp_path, capsys):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]))
    path = _one_task_config(tmp_path)
    assert main(["eval", str(path), f"tasks.0.train={data}", "tasks.0.test=null"]) == 2
    assert "no task of the config has held-out pairs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a first hour without surprises


def _one_task_config(tmp_path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, n_tasks=1).model_dump(mode="json")))
    return path


def test_overrides_after_flags_reach_the_config_for_every_subcommand(tmp_path, capsys):
    """`eval CONFIG --adapter DIR tasks.0.max_test=8` used to stop at argparse ("unrecognized arguments")."""
    cfg = str(_one_task_config(tmp_path))
    out = str(tmp_path / "out")
    for argv in (
        ["eval", cfg, "--adapter", str(tmp_path), "train.nope=1"],
        ["train", cfg, "--out", out, "train.nope=1"],
        ["run", cfg, "--no-report", "--out", out, "train.nope=1"],
        ["unlearn", cfg, "--out", out, "train.nope=1"],
        ["run", "--out", out, cfg, "train.batch_size=true", "--no-report", "train.batch_size=4", "train.nope=1"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "unknown key 'train.nope'" in err and "unrecognized" not in err, argv
        assert "batch_size" not in err  # the later override of the same key wins
    assert main(["eval", cfg, "--adapter", str(tmp_path), "tasks.5.max_test=8"]) == 2
    assert "tasks.5 is out of range: tasks is a list of 1 item(s)" in capsys.readouterr().err


def test_unknown_flags_and_stray_words_are_still_usage_errors(tmp_path, capsys):
    cfg = str(_one_task_config(tmp_path))
    for argv, stray in (
        (["train", cfg, "--reume"], "--reume"),
        (["report", str(tmp_path), "--out", "x", "y=1"], "y=1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_version_prints_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lifealign {version('lifealign')}"


def test_config_path_that_is_a_fifo_or_a_directory_is_named_as_such(tmp_path, capsys):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    assert main(["train", str(fifo)]) == 2
    assert f"config path {fifo} is not a regular file (a FIFO)" in capsys.readouterr().err
    assert main(["train", str(tmp_path)]) == 2
    assert f"config path {tmp_path} is a directory, not a YAML file" in capsys.readouterr().err


def test_out_with_a_tilde_is_expanded(tmp_path, capsys, monkeypatch):
    """`--out=~/x` reaches the program unexpanded (the shell expands ~ only at the start of a word)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "file").write_text("x")
    assert main(["run", str(_one_task_config(tmp_path)), "--out=~/file/run"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "file" / "run") in err and "~" not in err


def test_eval_with_a_truncated_adapter_names_the_file(tmp_path, capsys):
    from lifealign.config.schema import LoraSection
    from lifealign.models.lora import attach_lora, save_adapter
    from lifealign.models.tiny import tiny_model_and_tokenizer

    adapter = save_adapter(attach_lora(tiny_model_and_tokenizer()[0], LoraSection()), tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = str(_one_task_config(tmp_path))
    assert main(["eval", cfg, "--adapter", str(adapter), "eval.drift=false"]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is not a valid safetensors file" in err and "truncated or corrupt" in err
    assert "Traceback" not in err and "SafetensorError:" not in err
    (adapter / "adapter_config.json").unlink()
    assert main(["eval", cfg, "--adapter", str(adapter)]) == 2
    assert f"adapter folder {adapter} has no adapter_config.json" in capsys.readouterr().err
