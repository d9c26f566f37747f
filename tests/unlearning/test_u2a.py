"""``lifealign unlearn`` end to end on the tiny model, the stop rule, resume, and a negative task inside a stream."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from lifealign.cli.main import main
from lifealign.config import RunConfig, config_from_dict
from lifealign.config.unlearn import UnlearnSection
from lifealign.data.records import Task
from lifealign.engine.items import read_items
from lifealign.engine.unlearn import COMPARED, run_unlearning
from lifealign.training.checkpoint import Checkpointer
from lifealign.training.metrics import read_metrics
from lifealign.unlearning.influence import ScoreResult
from lifealign.unlearning.inner import SolveOutcome
from lifealign.unlearning.u2a import U2A, U2AInputs, U2AProgress
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
    printed = capsys.readouterr().out  # the same table as report.md, like `lifealign run` prints its summary
    rows = [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["method", "original", "u2a", "ga", "topk", "dpo"] and "run folder:" in printed
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

    _check_items_and_statistics(run, results, printed)

    # --resume on a finished run redoes nothing and reports the same table
    n_records, n_items = len(records), len(read_items(run / "items.jsonl"))
    assert main(["unlearn", config, "--resume"]) == 0
    assert capsys.readouterr().out == printed
    assert len(read_metrics(run / "metrics.jsonl")) == n_records
    assert len(read_items(run / "items.jsonl")) == n_items


def _check_items_and_statistics(run, results, printed: str) -> None:
    """items.jsonl: one line per method and metric, one value per held-out pair, means = the table; results.json:
    intervals around the point values, U2A's paired tests against every baseline; the printed table shows both."""
    table, methods = results["table"], ["original", "u2a", "ga", "topk", "dpo"]
    lines = read_items(run / "items.jsonl")
    metrics = ["pref_acc", "J", "delta_J", "margin"]
    assert [(r["method"], r["metric"]) for r in lines] == [(m, k) for m in methods for k in metrics]
    n_test = results["data"]["test"]
    assert n_test == 8 and all(len(r["values"]) == len(r["ids"]) == n_test for r in lines)
    assert len({tuple(r["ids"]) for r in lines}) == 1  # the same pairs, in the same order, for every method
    for r in lines:
        assert sum(r["values"]) / n_test == pytest.approx(table[r["method"]][r["metric"]], abs=1e-9)
        assert set(r["values"]) <= {0.0, 50.0, 100.0} or r["metric"] != "pref_acc"
        lo, hi = table[r["method"]][f"{r['metric']}_ci"]
        assert lo - 1e-9 <= table[r["method"]][r["metric"]] <= hi + 1e-9
        assert table[r["method"]][f"{r['metric']}_se"] >= 0
    assert table["original"]["pref_acc_ci"] == [50.0, 50.0]  # every pair a tie: no uncertainty
    assert results["statistics"]["n_items"] == n_test and results["statistics"]["n_seeds"] == 1
    rows = results["comparisons"]
    assert [(c["baseline"], c["metric"]) for c in rows] == [(b, m) for b in ("ga", "topk", "dpo") for m in COMPARED]
    for c in rows:
        assert c["method"] == "u2a"
        assert c["diff"] == pytest.approx(table["u2a"][c["metric"]] - table[c["baseline"]][c["metric"]], abs=1e-9)
        assert c["ci"][0] - 1e-9 <= c["diff"] <= c["ci"][1] + 1e-9 and 0 < c["p"] <= c["p_holm"] <= 1
        assert table[c["baseline"]]["vs_u2a"][c["metric"]]["p_holm"] == c["p_holm"]
    # the printed table (= report.md's) shows the intervals and U2A's tests against each row
    header = next(line for line in printed.splitlines() if line.startswith("| method"))
    assert "U2A − row: pref_acc" in header and "U2A − row: delta_J" in header
    u2a_row = next(line for line in printed.splitlines() if line.startswith("| u2a "))
    assert f"{table['u2a']['delta_J']:.3f} [{table['u2a']['delta_J_ci'][0]:.3f}, " in u2a_row
    report = (run / "report.md").read_text()
    assert "Paired tests: U2A vs each baseline" in report and "p (Holm)" in report


def test_forget_nll_bound_stops_unlearning_with_a_structured_event(tmp_path):
    """``stop_scope: run`` (ours): the first trigger ends U2A; the full-set baseline, one solve, ends too."""
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
                "stop_scope": "run",
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
    # GradDiff has the retain term; the regulariser is GA's only (U2A's code, unlearn.reg_objectives: [ga])
    assert len(unlearn) == 4 and all("loss/retain" in r and "loss/anchor" not in r for r in unlearn)
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


# ----- the procedure around its solves (a recording solver, scores given) -----------------------------------------


class _RecordingSolver:
    """Stands for ``InnerSolver``: records each solve's planned steps; solve ``stop_at`` returns a stop event."""

    def __init__(self, world: int, stop_at: int | None = None, scope: str = "epoch"):
        self.world, self.stop_at, self.scope, self.planned = world, stop_at, scope, []

    def solve(self, task, examples, loss, *, max_steps, plugins=(), weights=None, resume=None):
        self.planned.append(max_steps)
        if len(self.planned) - 1 != self.stop_at:
            return SolveOutcome(planned_steps=max_steps, steps=max_steps)
        event = {"event": "unlearn_stopped", "reason": "forget_nll_above_bound", "scope": self.scope}
        return SolveOutcome(planned_steps=max_steps, steps=1, stopped=event, events=[event])


def _procedure(solver, n: int = 10, **unlearn) -> tuple[U2A, U2AInputs]:
    section = UnlearnSection(k=n, rounds=2, positive_only=False, inner_epochs=1.0, **unlearn)
    train = RunConfig().train.model_copy(update={"batch_size": 2, "grad_accum": 1})
    procedure = U2A(section, train, None, 0, None, solver, plugins=lambda label: [], task=Task("t", []))

    def scores(inputs, subset=None, weights=None):
        m = n if subset is None else len(subset)
        return ScoreResult(torch.arange(m, 0, -1, dtype=torch.float64), objective=0.5, grad_norm=1.0)

    procedure.scores = scores
    return procedure, U2AInputs([{"id": str(i)} for i in range(n)], [], torch.zeros(0, 2))


def test_each_solve_counts_its_steps_on_the_global_batch_of_every_process():
    """10 selected, batch 2, no accumulation: one epoch is ceil(10 / (2 * 2)) = 3 steps on 2 processes (5 on one,
    which each process would otherwise run, i.e. 2 epochs); 3 solves, so the baselines' budget is 9."""
    for world, steps in ((2, 3), (1, 5)):
        solver = _RecordingSolver(world)
        procedure, inputs = _procedure(solver)
        progress = procedure.run(inputs, U2AProgress(), lambda p: None)
        assert solver.planned == [steps] * 3 and progress.finished and not progress.stopped
        assert procedure.budget(10) == 3 * steps == procedure.steps_per_solve(10) * 3


@pytest.mark.parametrize(("scope", "solves", "stopped"), [("epoch", 3, False), ("solve", 3, False), ("run", 1, True)])
def test_a_stop_in_the_first_solve_ends_the_run_only_with_scope_run(scope, solves, stopped):
    """U2A's code: the stop leaves an epoch and every later round still runs (``epoch``, ``solve``); ours as the
    option ``run``: the first stop ends the procedure. The event is recorded either way."""
    solver = _RecordingSolver(world=1, stop_at=0, scope=scope)
    procedure, inputs = _procedure(solver, stop_scope=scope)
    progress = procedure.run(inputs, U2AProgress(), lambda p: None)
    assert len(solver.planned) == solves and progress.stopped is stopped and progress.finished
    assert [e["scope"] for e in progress.events] == [scope]
    assert [r["round"] for r in progress.rounds] == list(range(solves))


def test_the_u2a_adapter_stacks_on_its_saved_original_with_plain_peft(tmp_path):
    """With ``original_sft_steps > 0`` U2A trains on base + a merged SFT LoRA: that LoRA is saved as
    original_adapter/ and, stacked as adapter/README.md says, plain peft reproduces the run's pref_acc."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lifealign.data.sources import load_stream
    from lifealign.data.tokenize import tokenize_pairs
    from lifealign.evaluation.scorers.preference import pair_logps, preference_accuracy
    from lifealign.models.load import load_model_and_tokenizer

    data = json.loads(json.dumps(CONFIG))
    data["unlearn"].update(original_sft_steps=2, baselines=[])
    cfg = config_from_dict({**data, "output_dir": str(tmp_path / "run")})
    results = run_unlearning(cfg)
    run = tmp_path / "run"
    assert "merge_and_unload" in (run / "adapter" / "README.md").read_text()
    base_path = json.loads((run / "original_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    _, tokenizer = load_model_and_tokenizer(cfg.model)
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(run / "original_adapter"))
    model = PeftModel.from_pretrained(original.merge_and_unload(), str(run / "adapter")).eval()
    task = load_stream(cfg.tasks, cfg.data)[0]
    examples = tokenize_pairs(task.test[: cfg.eval.max_examples], tokenizer, cfg.data).examples
    policy = pair_logps(model, examples, tokenizer.pad_token_id, batch_size=4)
    with model.disable_adapter():
        reference = pair_logps(model, examples, tokenizer.pad_token_id, batch_size=4)
    accuracy, _ = preference_accuracy(policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    assert accuracy == pytest.approx(results["table"]["u2a"]["pref_acc"], abs=1e-9)
    assert results["table"]["u2a"]["steps"] > 0


# ----- per-pair items across a kill, and bench/u2a.py's aggregation over seeds ------------------------------------


def test_a_run_killed_after_an_evaluation_resumes_without_losing_or_doubling_item_lines(tmp_path, monkeypatch):
    """The kill comes after ``eval:u2a`` wrote its lines but before the phase's commit: the resumed run truncates
    items.jsonl to the last commit's offset and scores U2A again, so every line is there once, as in a clean run."""
    import lifealign.engine.run as run_module

    base = {**CONFIG, "unlearn": {**CONFIG["unlearn"], "baselines": ["ga"]}}
    run_unlearning(config_from_dict({**base, "output_dir": str(tmp_path / "clean")}))
    real = run_module.maybe_fault

    def kill(point, **where):
        if point == "phase" and where.get("phase") == "eval:u2a":
            raise RuntimeError("simulated kill")
        return real(point, **where)

    monkeypatch.setattr(run_module, "maybe_fault", kill)
    cfg = config_from_dict({**base, "output_dir": str(tmp_path / "crashed")})
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_unlearning(cfg)
    written = read_items(tmp_path / "crashed" / "items.jsonl")
    assert [r["method"] for r in written] == ["original"] * 4 + ["u2a"] * 4  # U2A's lines, not yet committed
    monkeypatch.setattr(run_module, "maybe_fault", real)
    resumed = run_unlearning(cfg, resume=True)
    clean_items = read_items(tmp_path / "clean" / "items.jsonl")
    assert read_items(tmp_path / "crashed" / "items.jsonl") == clean_items
    assert [r["method"] for r in clean_items] == ["original"] * 4 + ["u2a"] * 4 + ["ga"] * 4
    assert resumed["comparisons"] == json.loads((tmp_path / "clean" / "results.json").read_text())["comparisons"]


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "u2a.py"
    spec = importlib.util.spec_from_file_location("bench_u2a", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(method: str, per_seed: dict[str, list[list[float]]], ids=("a", "b", "c", "d")) -> list[list[dict]]:
    """Per seed, the items.jsonl lines of ``method``: ``per_seed[metric][s]`` are seed ``s``'s per-pair values."""
    n_seeds = len(next(iter(per_seed.values())))
    return [
        [{"method": method, "metric": m, "ids": list(ids), "values": v[s]} for m, v in per_seed.items()]
        for s in range(n_seeds)
    ]


def test_bench_aggregation_over_seeds_gives_hand_checkable_numbers():
    """2 seeds x 4 pairs. U2A's pref_acc: 3 wins of 4 in each seed (75); GA has the same per-pair wins (difference 0,
    p = 1). U2A's delta_J is GA's minus 0.05 on every pair and seed: the paired difference is -0.05 in every
    resample, so its interval is [-0.05, -0.05] and p = 2 / (B + 1), Holm over the 2 rows: 2 · 2 / (B + 1).
    U2A's mean delta_J = (-0.4 - 0.4) / 8 = -0.1, -0.1 in each seed. Forget NLL: the seeds' mean, (2 + 3) / 2.
    The binomial MDE bound at 75% on 4 pairs: (1.960 + 0.842) · sqrt(2 · 0.75 · 0.25) / sqrt(4) = 85.78 points."""
    bench = _bench_module()
    wins = [[100.0, 100.0, 0.0, 100.0], [100.0, 0.0, 100.0, 100.0]]
    u2a_dj = [[-0.2, -0.1, 0.0, -0.1], [-0.1, -0.1, -0.1, -0.1]]
    ga_dj = [[v + 0.05 for v in seed] for seed in u2a_dj]
    zeros = [[0.0] * 4, [0.0] * 4]
    original = _records("original", {"pref_acc": [[50.0] * 4] * 2, "delta_J": zeros})
    u2a = _records("u2a", {"pref_acc": wins, "delta_J": u2a_dj})
    ga = _records("ga", {"pref_acc": wins, "delta_J": ga_dj})
    runs = [o + u + g for o, u, g in zip(original, u2a, ga)]
    tables = [
        {m: {"forget_nll": nll, "retain_nll": 1.0, "steps": 9} for m in ("original", "u2a", "ga")} for nll in (2.0, 3.0)
    ]
    n_boot = 200
    summary = bench.aggregate(runs, tables, n_boot=n_boot)
    table = summary["table"]
    assert table["u2a"]["pref_acc"] == pytest.approx(75.0) and table["u2a"]["delta_J"] == pytest.approx(-0.1)
    assert table["u2a"]["per_seed"]["delta_J"] == pytest.approx([-0.1, -0.1])
    assert table["ga"]["delta_J"] == pytest.approx(-0.05) and table["u2a"]["forget_nll"] == 2.5
    assert table["original"]["pref_acc_ci"] == pytest.approx([50.0, 50.0])
    lo, hi = table["u2a"]["pref_acc_ci"]
    assert 0.0 <= lo <= 75.0 <= hi <= 100.0 and "variance_components" in table["u2a"]
    assert summary["statistics"]["n_seeds"] == 2 and summary["statistics"]["n_items"] == 4
    rows = {c["metric"]: c for c in summary["comparisons"]}
    assert set(rows) == {"pref_acc", "delta_J"} and all(c["baseline"] == "ga" for c in rows.values())
    dj = rows["delta_J"]
    assert dj["diff"] == pytest.approx(-0.05) and dj["ci"] == pytest.approx([-0.05, -0.05])
    assert dj["p"] == pytest.approx(2 / (n_boot + 1)) and dj["p_holm"] == pytest.approx(4 / (n_boot + 1))
    assert dj["significant"] and dj["mde_items"] == pytest.approx(0.0, abs=1e-12)
    pa = rows["pref_acc"]
    assert pa["diff"] == 0.0 and pa["p"] == 1.0 and pa["p_holm"] == 1.0 and not pa["significant"]
    assert summary["power"]["binomial_bound_at_u2a_accuracy"] == pytest.approx(85.78, abs=0.01)
    text = bench.render_summary(summary)
    assert "U2A is significantly better (lower) than ga" in text
    assert "pref_acc: no significant difference from ga (+0.0, p_holm 1.000)" in text
    assert "Methods (4 held-out pairs × 2 seeds)" in text


def test_bench_aggregation_refuses_seeds_scored_on_different_pairs():
    bench = _bench_module()
    one = _records("u2a", {"pref_acc": [[100.0, 0.0]]}, ids=("a", "b"))[0]
    other = _records("u2a", {"pref_acc": [[100.0, 0.0]]}, ids=("a", "c"))[0]
    tables = [{"u2a": {"steps": 9}}] * 2
    with pytest.raises(ValueError, match="other held-out pairs"):
        bench.aggregate([one, other], tables, n_boot=100)
