"""The command line: exit codes and messages for bad input, `train`, `data inspect`, `report`, secrets."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

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
    evaluated = json.loads(capsys.readouterr().out)
    trained = json.loads((out / "scores.json").read_text())["seqft"]
    assert evaluated["arithmetic"]["pref_acc"] == trained["pref_acc"]["matrix"][0][0]
    assert abs(evaluated["arithmetic"]["margin"] - trained["margin"]["matrix"][0][0]) < 1e-5
