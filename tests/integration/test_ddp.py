"""Two processes (accelerate + gloo on CPU) give the same stream scores as one process with the same global batch.

Two methods: LifeAlign (replay + SLMC) and EWC + A-GEM (Fisher and memory gradients computed on every rank).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
MARGIN_TOL = 1e-4  # mean implicit-reward margin on held-out pairs (typical size after training: 1e-2)
WEIGHT_TOL = 1e-5  # all-reduce sums gradients in a different order than one process does
# Adam's first steps are ~lr·sign(g): a coordinate whose gradient is ~1e-9 flips sign with the reduction order, so
# the test uses adam_eps=1e-4, which damps such coordinates without changing the well-determined ones.


@pytest.mark.slow
def test_two_process_stream_matches_one_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LIFEALIGN_FAULT", None)
    methods = [
        {
            "name": "lifealign",
            "loss": {"name": "fpo"},
            "plugins": [{"name": "replay", "buffer_size": 100, "fraction": 0.5}, {"name": "slmc"}],
        },
        {  # the Fisher and the memory gradients are computed on every rank from the same data: identical
            "name": "ewc-agem",
            "loss": {"name": "dpo"},
            "plugins": [
                {"name": "ewc", "lam": 100.0, "n_samples": 4},
                {"name": "agem", "memory_per_task": 4, "sample_size": 4},
            ],
        },
    ]
    one = tiny_config(
        tmp_path / "one", n_tasks=2, methods=methods, train={"batch_size": 4, "max_steps": 3, "adam_eps": 1e-4}
    )
    two = tiny_config(
        tmp_path / "two", n_tasks=2, methods=methods, train={"batch_size": 2, "max_steps": 3, "adam_eps": 1e-4}
    )
    paths = {}
    for name, cfg in (("one", one), ("two", two)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    single = subprocess.run(
        [sys.executable, "-m", "lifealign", "run", str(paths["one"]), "--out", str(tmp_path / "r1"), "--no-report"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    multi = subprocess.run(
        [*launcher, "-m", "lifealign", "run", str(paths["two"]), "--out", str(tmp_path / "r2"), "--no-report"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    for name in ("lifealign", "ewc-agem"):
        scores1 = json.loads((tmp_path / "r1" / "scores.json").read_text())[name]
        scores2 = json.loads((tmp_path / "r2" / "scores.json").read_text())[name]
        assert scores1["pref_acc"]["matrix"] == scores2["pref_acc"]["matrix"], name
        for row1, row2 in zip(scores1["margin"]["matrix"], scores2["margin"]["matrix"]):
            for a, b in zip(row1, row2):
                assert (a is None and b is None) or abs(a - b) <= MARGIN_TOL, name
        a1 = load_file(str(tmp_path / "r1" / name / "adapter" / "adapter_model.safetensors"))
        a2 = load_file(str(tmp_path / "r2" / name / "adapter" / "adapter_model.safetensors"))
        for k in a1:
            assert (a1[k] - a2[k]).abs().max() <= WEIGHT_TOL, (name, k)
        # only rank 0 wrote checkpoints and metrics: one line per step, no duplicates
        steps = [json.loads(x) for x in (tmp_path / "r2" / name / "metrics.jsonl").read_text().splitlines()]
        keys = [(r["task"], r["step"]) for r in steps if r["event"] == "step"]
        assert len(keys) == len(set(keys)) == 6, name


def test_lora_under_ddp_does_not_search_for_unused_parameters(tmp_path):
    """Every LoRA weight gets a gradient each step, so DDP's unused-parameter search (trl turns it on with gradient
    checkpointing) would only cost a graph traversal per step and break with reentrant checkpointing."""
    from lifealign.engine.experiment import make_accelerator

    accelerator = make_accelerator(tiny_config(tmp_path))
    assert accelerator.ddp_handler is not None and accelerator.ddp_handler.find_unused_parameters is False


@pytest.mark.slow
def test_two_process_stream_with_a_negative_task_matches_one_process(tmp_path):
    """U2A inside a stream: impact scores, the selected subset and its weights are the same on two ranks as on one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LIFEALIGN_FAULT", None)
    tasks = [
        {"name": "arithmetic", "train": "synthetic:arithmetic", "max_train": 8, "max_test": 4},
        {"name": "safety", "train": "synthetic:safety", "kind": "negative", "max_train": 12, "max_test": 4},
    ]
    unlearn = {"objective": "npo", "k": 3, "rounds": 2, "inner_max_steps": 2, "reg_weight": 0.1}
    paths = {}
    for name, batch in (("one", 4), ("two", 2)):
        cfg = tiny_config(
            tmp_path / name, tasks=tasks, unlearn=unlearn, train={"batch_size": batch, "max_steps": 2, "adam_eps": 1e-4}
        )
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = [sys.executable, "-m", "lifealign", "run"]
    single = subprocess.run(
        [*run, str(paths["one"]), "--out", str(tmp_path / "r1"), "--no-report"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    multi = subprocess.run(
        [*launcher, "-m", "lifealign", "run", str(paths["two"]), "--out", str(tmp_path / "r2"), "--no-report"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    stages = [json.loads((tmp_path / r / "run_info.json").read_text())["stages"]["t1:unlearn"] for r in ("r1", "r2")]
    progress = [s["progress"] for s in stages]
    assert progress[0]["selected"] == progress[1]["selected"] and len(progress[0]["selected"]) == 3
    for key in ("scores", "weights"):
        for a, b in zip(progress[0][key], progress[1][key], strict=True):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), key
    scores = [json.loads((tmp_path / r / "scores.json").read_text())["seqft"] for r in ("r1", "r2")]
    assert scores[0]["pref_acc"]["matrix"] == scores[1]["pref_acc"]["matrix"]
    for row1, row2 in zip(scores[0]["margin"]["matrix"], scores[1]["margin"]["matrix"]):
        for a, b in zip(row1, row2):
            assert (a is None and b is None) or abs(a - b) <= MARGIN_TOL


@pytest.mark.slow
def test_two_process_unlearn_matches_one_process(tmp_path):
    """``lifealign unlearn`` on two ranks: the same scores, selection, weights and (sharded, gathered) evaluation."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LIFEALIGN_FAULT", None)
    base = {
        "model": {"name_or_path": "tiny"},
        "data": {"max_length": 96, "max_prompt_length": 48},
        "tasks": [
            {"name": "safety", "train": "synthetic:safety", "test": "synthetic:safety", "max_train": 40, "max_test": 8}
        ],
        "train": {"lr": 1e-3, "save_every": 50, "progress": False, "adam_eps": 1e-4},
        "eval": {"scorers": ["pref_acc"], "max_examples": 8, "batch_size": 2},
        "unlearn": {"objective": "npo", "k": 4, "rounds": 2, "inner_max_steps": 2, "baselines": ["ga", "dpo"]},
    }
    paths = {}
    for name, batch in (("one", 4), ("two", 2)):
        cfg = json.loads(json.dumps(base))
        cfg["train"]["batch_size"] = batch
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    single = subprocess.run(
        [sys.executable, "-m", "lifealign", "unlearn", str(paths["one"]), "--out", str(tmp_path / "r1")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    multi = subprocess.run(
        [*launcher, "-m", "lifealign", "unlearn", str(paths["two"]), "--out", str(tmp_path / "r2")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("r1", "r2"))
    assert r1["u2a"]["selected_ids"] == r2["u2a"]["selected_ids"]
    for a, b in zip(r1["u2a"]["weights"], r2["u2a"]["weights"], strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
    for method, row in r1["table"].items():
        assert row["pref_acc"] == r2["table"][method]["pref_acc"], method
        for key in ("J", "forget_nll", "retain_nll"):
            assert abs(row[key] - r2["table"][method][key]) <= 1e-4, (method, key)
