"""``lifealign unlearn`` end to end on the tiny model, the stop rule, resume, and a negative task inside a stream."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from lifealign.cli.main import main
from lifealign.config import config_from_dict
from lifealign.engine.unlearn import run_unlearning
from lifealign.training.checkpoint import Checkpointer
from lifealign.training.metrics import read_metrics
from lifealign.utils.jsonio import nan_to_null

CONFIG = {
    "model": {"name_or_path": "tiny"},
    "data": {"max_length": 96, "max_prompt_length": 48},
    "tasks": [
        {"name": "safety", "train": "synthetic:safety", "test": "synthetic:safety", "max_train": 40, "max_test": 8}
    ],
    "train": {"lr": 1e-3, "batch_size": 4, "save_every": 50, "progress": False},
    "eval": {"scorers": ["pref_acc"], "max_examples": 8},
    "unlearn": {"objective": "npo", "k": 4, "rounds": 2, "inner_max_steps": 2, "baselines": ["ga", "topk", "dpo"]},
}


def _write_config(tmp_path, **unlearn) -> str:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["output_dir"] = str(tmp_path / "run")
    cfg["unlearn"].update(unlearn)
    path = tmp_path / "u2a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_cli_unlearn_end_to_end_on_the_tiny_model(tmp_path, capsys):
    config = _write_config(tmp_path)
    assert main(["unlearn", config]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["original", "u2a", "ga", "topk", "dpo"]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    table = results["table"]
    # the original model is the reference: every held-out pair is a tie and J = ln 2
    assert table["original"]["pref_acc"] == 50.0
    assert table["original"]["J"] == pytest.approx(math.log(2), abs=1e-6)
    # U2A: 3 solves of 2 steps; every baseline gets the same budget of optimizer steps
    assert results["budget"] == 6
    assert all(table[m]["steps"] == 6 for m in ("u2a", "ga", "topk", "dpo"))
    u2a = results["u2a"]
    assert u2a["selection"]["selected"] == len(u2a["selected_ids"]) == len(u2a["weights"]) <= 4
    assert sum(u2a["weights"]) == pytest.approx(len(u2a["weights"]))
    assert len(results["scores"]["values"]) == results["data"]["tokenized_candidates"]
    selected = [results["scores"]["ids"].index(i) for i in u2a["selected_ids"]]
    scores = results["scores"]["values"]
    assert [scores[i] for i in selected] == sorted((s for s in scores if s > 0), reverse=True)[: len(selected)]
    assert [r["round"] for r in u2a["rounds"]] == [0, 1, 2]
    for name in ("report.md", "impact_scores.png", "weights.png", "delta_J.png", "config.yaml", "adapter"):
        assert (run / name).exists(), name
    assert "U2A vs baselines" in (run / "report.md").read_text()
    records = read_metrics(run / "metrics.jsonl")
    unlearn_steps = [r for r in records if r.get("event") == "step" and r.get("stage") == "unlearn"]
    assert {r["method"] for r in unlearn_steps} == {"u2a", "ga", "topk", "dpo"}
    # the table moved: every trained method changed J from ln 2
    assert all(table[m]["J"] != table["original"]["J"] for m in ("u2a", "ga", "topk", "dpo"))

    # --resume on a finished run redoes nothing and reports the same table
    n_records = len(records)
    assert main(["unlearn", config, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out) == printed
    assert len(read_metrics(run / "metrics.jsonl")) == n_records


def test_forget_nll_bound_stops_unlearning_with_a_structured_event(tmp_path):
    cfg = config_from_dict(
        {
            **CONFIG,
            "output_dir": str(tmp_path / "run"),
            "train": {**CONFIG["train"], "lr": 5e-2},
            "unlearn": {
                "objective": "ga",
                "k": 4,
                "rounds": 3,
                "inner_max_steps": 4,
                "reg_weight": 0.0,
                "max_forget_nll": 5.6,
                "stop_patience": 1,
                "positive_only": False,
                "baselines": ["ga"],
            },
        }
    )
    results = run_unlearning(cfg)
    events = [e for e in results["u2a"]["events"] if e["event"] == "unlearn_stopped"]
    assert len(events) == 1 and events[0]["reason"] == "forget_nll_above_bound"
    assert events[0]["forget_nll"] > 5.6 and events[0]["method"] == "u2a"
    assert results["table"]["u2a"]["stopped"] is True
    assert results["table"]["u2a"]["steps"] < results["budget"]
    assert results["table"]["ga"]["stopped"] is True  # the full-set baseline is guarded by the same rule
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "unlearn_stopped"]
    assert {r["method"] for r in logged} == {"u2a", "ga"}
    adapter = Checkpointer(tmp_path / "run" / "checkpoints").latest().tensors("adapter")
    assert all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.slow
def test_a_run_interrupted_inside_a_solve_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Crash at the 2nd step of U2A's 2nd solve (after a mid-stage checkpoint); resume = uninterrupted run."""
    import lifealign.training.loop as loop

    unlearn = {"k": 4, "rounds": 1, "inner_max_steps": 3, "baselines": ["npo"]}
    base = {**CONFIG, "train": {**CONFIG["train"], "save_every": 1}, "unlearn": {**CONFIG["unlearn"], **unlearn}}
    clean = run_unlearning(config_from_dict({**base, "output_dir": str(tmp_path / "clean")}))

    real, calls = loop.maybe_fault, {"n": 0}

    def crash(point, **where):
        if point == "step" and where.get("stage") == "unlearn":
            calls["n"] += 1
            if calls["n"] == 5:  # solve 0: steps 1-3; solve 1: step 1 done and checkpointed, crash in step 2
                raise RuntimeError("simulated crash")
        return real(point, **where)

    monkeypatch.setattr(loop, "maybe_fault", crash)
    cfg = config_from_dict({**base, "output_dir": str(tmp_path / "crashed")})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_unlearning(cfg)
    monkeypatch.setattr(loop, "maybe_fault", real)
    latest = Checkpointer(tmp_path / "crashed" / "checkpoints").latest().state
    assert latest["position"] == {"phase": "u2a", "stage_step": 1} and latest["loop"]["stage_step"] == 1
    resumed = run_unlearning(cfg, resume=True)
    assert resumed["table"] == clean["table"]
    assert resumed["u2a"]["weights"] == clean["u2a"]["weights"]


def test_a_negative_task_inside_a_stream_runs_u2a_through_the_runner(tmp_path):
    from lifealign.engine.experiment import run_experiment

    cfg = _stream_config(
        tmp_path / "stream",
        unlearn={"objective": "grad_diff", "retain": "kl", "k": 3, "rounds": 1, "inner_max_steps": 2},
    )
    scores = run_experiment(cfg, report=False)
    info = json.loads((tmp_path / "stream" / "run_info.json").read_text())
    stage = info["stages"]["t1:unlearn"]
    assert stage["mode"] == "u2a" and stage["objective"] == "grad_diff"
    assert 1 <= stage["selected"] <= 3 and stage["steps"] == 4
    records = read_metrics(tmp_path / "stream" / "metrics.jsonl")
    unlearn = [r for r in records if r.get("event") == "step" and r.get("stage") == "unlearn"]
    assert len(unlearn) == 4 and all("loss/retain" in r and "loss/anchor" in r for r in unlearn)
    matrix = scores["seqft"]["pref_acc"]["matrix"]
    assert matrix[1][1] is not None and not math.isnan(matrix[1][1])


def _stream_config(out, save_every: int = 50, unlearn: dict | None = None):
    """A pairwise task then a negative-only one on the tiny model; ``unlearn`` replaces the NPO section."""
    return config_from_dict(
        {
            "output_dir": str(out),
            "model": {"name_or_path": "tiny"},
            "data": {"max_length": 96, "max_prompt_length": 48},
            "tasks": [
                {"name": "arithmetic", "train": "synthetic:arithmetic", "max_train": 8, "max_test": 4},
                {"name": "safety", "train": "synthetic:safety", "kind": "negative", "max_train": 12, "max_test": 4},
            ],
            "method": {"name": "seqft", "loss": {"name": "dpo", "beta": 0.1}},
            "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "save_every": save_every, "progress": False},
            "eval": {"scorers": ["pref_acc"], "max_examples": 4},
            "unlearn": unlearn or {"objective": "npo", "k": 3, "rounds": 1, "inner_max_steps": 3, "reg_weight": 0.1},
        }
    )


@pytest.mark.slow
def test_a_stream_killed_inside_an_unlearning_solve_resumes_exactly(tmp_path, monkeypatch):
    """RELIABILITY F8 (in-process): crash in the 2nd solve of the negative task; resume gives the clean scores."""
    import lifealign.training.loop as loop
    from lifealign.engine.experiment import run_experiment

    clean = run_experiment(_stream_config(tmp_path / "clean", save_every=1), report=False)
    real, calls = loop.maybe_fault, {"n": 0}

    def crash(point, **where):
        if point == "step" and where.get("stage") == "unlearn":
            calls["n"] += 1
            if calls["n"] == 6:  # solve 0: 3 steps; solve 1: steps 1-2 done, crash in step 3
                raise RuntimeError("simulated crash")
        return real(point, **where)

    monkeypatch.setattr(loop, "maybe_fault", crash)
    cfg = _stream_config(tmp_path / "crashed", save_every=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg, report=False)
    monkeypatch.setattr(loop, "maybe_fault", real)
    latest = Checkpointer(tmp_path / "crashed" / "checkpoints").latest().state
    assert latest["position"] == {"phase": "t1:unlearn", "stage_step": 2}
    resumed = run_experiment(cfg, resume=True, report=False)
    assert nan_to_null(resumed) == nan_to_null(clean)  # the matrices' upper triangles are NaN
    from safetensors.torch import load_file

    final = [
        load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (tmp_path / "clean", tmp_path / "crashed")
    ]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
