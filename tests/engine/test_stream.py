"""The stream runner: hook order, exact resume after SIGKILL, no repeated evaluation, MTL/STL runners."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lifealign.continual import METHODS
from lifealign.engine.experiment import run_experiment
from lifealign.engine.run import ResumeError
from lifealign.training.metrics import read_metrics
from lifealign.training.plugin import Plugin
from tests.helpers import run_lifealign, tiny_config

REPO = Path(__file__).resolve().parents[2]
CALLS: list[str] = []


class RecordingPlugin(Plugin):
    name = "recording"

    def before_task(self, ctx):
        CALLS.append(f"before_task:{ctx.task_index}")

    def train_data(self, ctx, records):
        CALLS.append(f"train_data:{ctx.task_index}:{ctx.stage}")
        return records

    def before_stage(self, ctx):
        CALLS.append(f"before_stage:{ctx.task_index}:{ctx.stage}")

    def extra_loss(self, ctx, batch, outputs):
        CALLS.append("extra_loss")
        return outputs["loss"].new_zeros(())

    def after_backward(self, ctx):
        CALLS.append("after_backward")

    def after_stage(self, ctx):
        CALLS.append(f"after_stage:{ctx.task_index}:{ctx.stage}")

    def after_task(self, ctx):
        CALLS.append(f"after_task:{ctx.task_index}")


def _compress(calls: list[str]) -> list[str]:
    out: list[str] = []
    for c in calls:
        if not out or out[-1] != c:
            out.append(c)
    return out


def test_every_hook_is_reached_in_order_over_two_tasks(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "recording", RecordingPlugin)
    CALLS.clear()
    cfg = tiny_config(
        tmp_path,
        n_tasks=2,
        method={"name": "rec", "loss": {"name": "dpo"}, "plugins": [{"name": "recording"}]},
        sft={"enabled": True, "max_steps": 2},
        train={"max_steps": 2},
    )
    run_experiment(cfg, report=False)
    per_task = []
    for t in (0, 1):
        per_task += [f"before_task:{t}"]
        for stage in ("sft", "pref"):
            per_task += [
                f"train_data:{t}:{stage}",
                f"before_stage:{t}:{stage}",
                "extra_loss",
                "after_backward",
                "extra_loss",
                "after_backward",
                f"after_stage:{t}:{stage}",
            ]
        per_task += [f"after_task:{t}"]
    assert CALLS == per_task or _compress(CALLS) == _compress(per_task)
    assert CALLS.count("extra_loss") == 8 and CALLS.count("after_backward") == 8


def _write_cfg(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return run_lifealign(args, fault)


def _final_state(run_dir: Path) -> tuple[dict, dict, list]:
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    scores = json.loads((run_dir / "scores.json").read_text())
    steps = [
        (r["task"], r["stage"], r["step"], r["loss"])
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r["event"] == "step"
    ]
    return adapter, scores, steps


@pytest.mark.parametrize(
    "fault",
    [
        "kill:point=step,task=1,stage=pref,step=3",  # mid-stage, after the step-2 checkpoint
        "kill:point=phase,phase=t0:eval",  # after an evaluation finished, before its checkpoint
        "kill:point=save,after_file=adapter.safetensors",  # during the first checkpoint save
    ],
)
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, fault):
    cfg = tiny_config(
        tmp_path,
        n_tasks=2,
        method={
            "name": "er",
            "loss": {"name": "fpo"},
            "plugins": [{"name": "replay", "buffer_size": 100, "fraction": 0.5}],
        },
    )
    path = _write_cfg(tmp_path, cfg)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    assert _cli(["run", str(path), "--out", str(ref_dir), "--no-report"]).returncode == 0
    killed = _cli(["run", str(path), "--out", str(run_dir), "--no-report"], fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _cli(["run", str(path), "--out", str(run_dir), "--no-report", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_adapter, ref_scores, ref_steps = _final_state(ref_dir)
    adapter, scores, steps = _final_state(run_dir)
    assert ref_adapter.keys() == adapter.keys()
    for k in ref_adapter:
        assert torch.equal(ref_adapter[k], adapter[k]), k
    assert scores == ref_scores
    assert steps == ref_steps  # metrics: no duplicated or missing step after resume
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "eval"]
    assert [e["task_index"] for e in evals] == [0, 1]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_resume_without_checkpoint_is_an_error(tmp_path):
    path = _write_cfg(tmp_path, tiny_config(tmp_path, n_tasks=1))
    result = _cli(["run", str(path), "--out", str(tmp_path / "empty"), "--resume"])
    assert result.returncode != 0
    assert "holds no run to resume" in result.stderr
    assert not (tmp_path / "empty").exists()  # a refused resume leaves nothing behind


def test_resume_with_changed_config_is_refused(tmp_path):
    path = _write_cfg(tmp_path, tiny_config(tmp_path, n_tasks=1))
    out = tmp_path / "r"
    assert _cli(["run", str(path), "--out", str(out), "--no-report"]).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    result = _cli(["run", str(path), "train.lr=0.5", "eval.max_examples=4", "--out", str(out), "--resume"])
    assert result.returncode != 0 and "config changed" in result.stderr
    assert (
        "train.lr, eval.max_examples differ" in result.stderr or "eval.max_examples, train.lr differ" in result.stderr
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before  # nothing was rewritten


def test_mtl_fills_last_row_and_stl_the_diagonal(tmp_path):
    cfg = tiny_config(
        tmp_path,
        n_tasks=2,
        methods=[
            {"name": "mtl", "loss": {"name": "dpo"}, "runner": "mtl"},
            {"name": "stl", "loss": {"name": "dpo"}, "runner": "stl"},
        ],
    )
    scores = run_experiment(cfg, report=False)
    mtl = scores["mtl"]["pref_acc"]["matrix"]
    assert all(v == v for v in mtl[1]) and all(v != v for v in mtl[0])  # NaN != NaN
    stl = scores["stl"]["pref_acc"]["matrix"]
    assert stl[0][0] == stl[0][0] and stl[1][1] == stl[1][1] and stl[1][0] != stl[1][0]
    assert (tmp_path / "run" / "mtl" / "adapter").is_dir() and (tmp_path / "run" / "stl" / "metrics.jsonl").exists()


@pytest.mark.parametrize("action, code", [("term", 143), ("int", 130)])
def test_sigterm_commits_the_current_step_and_resume_matches(tmp_path, action, code):
    """F9: a stop signal finishes the running step, commits a checkpoint for it, exits 130/143."""
    cfg = tiny_config(tmp_path, n_tasks=1, train={"max_steps": 5, "save_every": 100})
    path = _write_cfg(tmp_path, cfg)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "stopped"
    assert _cli(["run", str(path), "--out", str(ref_dir), "--no-report"]).returncode == 0
    stopped = _cli(["run", str(path), "--out", str(run_dir), "--no-report"], fault=f"{action}:point=step,step=2")
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert "resume with" in stopped.stderr
    from lifealign.training.checkpoint import Checkpointer

    latest = Checkpointer(run_dir / "checkpoints").latest()
    assert latest.state["loop"]["stage_step"] == 3  # the step running at the signal (index 2) finished and was saved
    resumed = _cli(["run", str(path), "--out", str(run_dir), "--no-report", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_adapter, ref_scores, ref_steps = _final_state(ref_dir)
    adapter, scores, steps = _final_state(run_dir)
    assert all(torch.equal(ref_adapter[k], adapter[k]) for k in ref_adapter)
    assert scores == ref_scores and steps == ref_steps


def test_scores_carry_intervals_and_every_cell_is_recomputable_from_its_items(tmp_path):
    cfg = tiny_config(tmp_path, n_tasks=2, train={"max_steps": 2}, eval={"scorers": ["pref_acc"], "max_examples": 6})
    scores = run_experiment(cfg, report=False)["seqft"]["pref_acc"]
    lo, hi = scores["bwt_ci"]
    assert lo <= scores["bwt"] <= hi and scores["bwt_se"] >= 0
    assert scores["last_ci"][0] <= scores["last"] <= scores["last_ci"][1]
    assert scores["n_items"] == [6, 6] and scores["n_seeds"] == 1 and scores["level"] == 0.95
    assert all(math.isnan(v) for v in scores["matrix_ci"][0][1])  # task 1 is not evaluated after task 0
    assert scores["conventions"] == {"bwt": "lifealign", "forgetting": "chaudhry", "fwt": "untrained"}
    from lifealign.engine.items import read_items

    records = read_items(tmp_path / "run" / "items.jsonl")
    pref = [r for r in records if r["metric"] == "pref_acc"]
    assert len(pref) == 2 + 3  # the untrained model on both tasks, then rows 0 (one task) and 1 (two tasks)
    for r in pref:
        cell = scores["initial"][r["task_index"]] if r["row"] is None else scores["matrix"][r["row"]][r["task_index"]]
        assert sum(r["values"]) / len(r["values"]) == pytest.approx(cell, abs=1e-9)
    assert all(len(r["ids"]) == 6 for r in pref)
    on_disk = json.loads((tmp_path / "run" / "scores.json").read_text())["seqft"]["pref_acc"]
    assert on_disk["bwt_ci"] == pytest.approx([lo, hi])


@pytest.mark.slow
def test_seeds_run_in_their_own_folders_and_a_kill_in_the_second_resumes_to_the_same_numbers(tmp_path):
    """``--seeds 1,2``: seed-1/ and seed-2/, a top-level scores.json with intervals (hierarchical over the seeds),
    comparisons.json and a report showing both; SIGKILL inside seed 2, then ``--resume``, ends identical."""
    cfg = tiny_config(
        tmp_path,
        n_tasks=2,
        methods=[
            {"name": "seqft", "loss": {"name": "dpo"}},
            {"name": "er", "loss": {"name": "dpo"}, "plugins": [{"name": "replay", "fraction": 0.5}]},
        ],
        train={"max_steps": 3, "save_every": 2},
        eval={"scorers": ["pref_acc"], "max_examples": 6, "drift": False, "n_boot": 200},
    )
    path = _write_cfg(tmp_path, cfg)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert _cli(["run", str(path), "--out", str(clean), "--seeds", "1,2"]).returncode == 0
    fault = "kill:point=step,seed=2,task=1,stage=pref,step=2"
    assert _cli(["run", str(path), "--out", str(killed), "--seeds", "1,2"], fault=fault).returncode == -9
    assert (killed / "seed-1" / "scores.json").exists() and not (killed / "scores.json").exists()
    assert _cli(["run", str(path), "--out", str(killed), "--seeds", "1,2", "--resume"]).returncode == 0
    scores = json.loads((clean / "scores.json").read_text())
    assert json.loads((killed / "scores.json").read_text()) == scores
    for method in ("seqft", "er"):
        entry = scores[method]["pref_acc"]
        assert entry["n_seeds"] == 2 and len(entry["bwt_ci"]) == 2 and len(entry["last_ci"]) == 2
        assert len(entry["ap_ci"]) == 2 and len(entry["matrix_ci"]) == 2 and "variance_components" in entry
        for seed in (1, 2):
            assert (clean / f"seed-{seed}" / method / "items.jsonl").exists()
    comparisons = json.loads((clean / "comparisons.json").read_text())
    assert [(r["method"], r["baseline"], r["metric"]) for r in comparisons["rows"]] == [
        ("er", "seqft", m) for m in ("bwt", "last", "ap")
    ]
    report = (clean / "report.md").read_text()
    assert "er" in report and "[" in report and "p (Holm)" in report or "Holm" in report


def test_one_seed_in_its_folder_marks_the_run_at_once_so_a_crash_before_the_end_resumes(tmp_path, monkeypatch):
    """``--seeds 3`` alone runs in ``seed-3/``; the top-level folder is a run from the start, so a run that dies
    inside the seed is resumed (not refused as a foreign non-empty folder) and ends with the uninterrupted scores."""
    from lifealign.engine import experiment
    from lifealign.engine.rundir import is_run_dir

    cfg = tiny_config(tmp_path, n_tasks=2, train={"max_steps": 2, "save_every": 1}, eval={"scorers": ["pref_acc"]})
    clean = run_experiment(cfg, tmp_path / "clean", seeds=[3], report=False)
    real_run_stream = experiment.StreamRunner.run_stream

    def crash(self):
        raise RuntimeError("killed inside seed 3")

    monkeypatch.setattr(experiment.StreamRunner, "run_stream", crash)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="inside seed 3"):
        run_experiment(cfg, out, seeds=[3], report=False)
    assert is_run_dir(out) and (out / "seed-3").is_dir() and not (out / "seed-3" / "scores.json").exists()
    monkeypatch.setattr(experiment.StreamRunner, "run_stream", real_run_stream)
    resumed = run_experiment(cfg, out, resume="auto", seeds=[3], report=False)
    assert json.dumps(resumed, sort_keys=True) == json.dumps(clean, sort_keys=True)  # NaN-safe equality
    assert json.loads((out / "seed-3" / "scores.json").read_text()) == json.loads(
        (tmp_path / "clean" / "seed-3" / "scores.json").read_text()
    )


def test_methods_run_alone_keep_their_own_folders_and_add_up_to_the_run_of_all(tmp_path):
    """``methods=["er"]`` then ``["seqft"]`` on one folder: each method in its own sub-folder (not the run folder, as
    a one-method config would be), the second run keeps the first's, and each method scores as in the run of both."""
    methods = [
        {"name": "seqft", "loss": {"name": "dpo"}},
        {"name": "er", "loss": {"name": "dpo"}, "plugins": [{"name": "replay", "fraction": 0.5}]},
    ]
    cfg = tiny_config(tmp_path, n_tasks=2, methods=methods, train={"max_steps": 2}, eval={"scorers": ["pref_acc"]})
    both = run_experiment(cfg, tmp_path / "both", report=False)
    out = tmp_path / "one-by-one"
    alone = run_experiment(cfg, out, methods=["er"], report=False)
    assert list(alone) == ["er"] and (out / "er" / "items.jsonl").exists() and not (out / "items.jsonl").exists()
    added = run_experiment(cfg, out, resume="auto", methods=["seqft"], report=False)
    assert (out / "seqft" / "items.jsonl").exists() and (out / "er" / "items.jsonl").exists()
    for name, got in (("seqft", added), ("er", alone)):
        assert json.dumps(got[name], sort_keys=True) == json.dumps(both[name], sort_keys=True)  # NaN-safe
    with pytest.raises(ValueError, match=r"\['gem'\] not in the config"):
        run_experiment(cfg, tmp_path / "unknown", methods=["gem"], report=False)
    from lifealign.cli.main import build_parser

    args = build_parser().parse_args(["run", "c.yaml", "--methods", "seqft, er", "--seeds", "1,2"])
    assert args.methods == ["seqft", "er"] and args.seeds == [1, 2]


def test_a_finished_stream_extended_by_a_task_scores_as_the_longer_stream_run_from_the_start(tmp_path):
    """Appending a fourth task to a finished three-task run and resuming learns it with every plugin's state
    (replay's buffer here) and keeps the finished rows: the same numbers as the four-task stream from the start."""
    method = {"name": "er", "loss": {"name": "dpo"}, "plugins": [{"name": "replay", "fraction": 0.5}]}
    sizes = {"train": {"max_steps": 2, "save_every": 100}, "eval": {"scorers": ["pref_acc"], "max_examples": 4}}
    four = tiny_config(tmp_path / "four", n_tasks=4, method=method, **sizes)
    three = tiny_config(tmp_path / "extended", n_tasks=3, method=method, **sizes)
    reference = run_experiment(four, report=False)["er"]
    run_experiment(three, report=False)
    extended_cfg = three.model_copy(update={"tasks": four.tasks})
    extended = run_experiment(extended_cfg, resume=True, report=False)["er"]
    for metric in ("pref_acc", "margin", "kl"):
        want, got = reference[metric], extended[metric]
        np.testing.assert_allclose(np.array(got["matrix"], float), np.array(want["matrix"], float), atol=1e-6)
        if "initial" in want:  # drift metrics have no untrained row
            np.testing.assert_allclose(got["initial"], want["initial"], atol=1e-6)
        for key in ("bwt", "last", "ap"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (metric, key)
    changed = three.model_copy(update={"tasks": four.tasks, "eval": three.eval.model_copy(update={"max_examples": 3})})
    with pytest.raises(ResumeError, match="eval.max_examples"):
        run_experiment(changed, resume=True, report=False)


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_at_once_and_the_first_completes(tmp_path):
    cfg = tiny_config(tmp_path, n_tasks=2, train={"max_steps": 100, "save_every": 1000})  # outlasts the second start
    path = _write_cfg(tmp_path, cfg)
    out = tmp_path / "shared"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LIFEALIGN_FAULT", None)
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: a full pipe would block the first run
    first = subprocess.Popen(
        [sys.executable, "-m", "lifealign", "run", str(path), "--out", str(out), "--no-report"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not (out / ".lifealign.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    second = _cli(["run", str(path), "--out", str(out), "--overwrite", "--no-report"])
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    assert second.returncode != 0 and "in use by another run" in second.stderr  # refused while the first runs
    try:
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()
    finally:
        first.kill()
        log.close()
    assert json.loads((out / "scores.json").read_text())["seqft"]["pref_acc"]["n_items"] == [8, 8]
    assert not (out / ".lifealign.lock").exists()
    again = _cli(["run", str(path), "--out", str(out), "--no-report"])
    assert again.returncode != 0 and "--resume" in again.stderr and "--overwrite" in again.stderr


def test_a_scorer_that_fails_on_every_item_is_an_error_once_its_items_are_saved(tmp_path, monkeypatch, caplog):
    import logging

    from lifealign.evaluation import scorers
    from lifealign.evaluation.scorers.base import ItemScores, Scorer, ScorerError, task_examples

    class HalfBroken(Scorer):
        """Fails on every item of the second task and on one item of the first."""

        name = "half_broken"

        def score_items(self, ctx, task):
            ids = [str(e["id"]) for e in task_examples(ctx, task)]
            values = [math.nan if task.name == "capitals" or k == 0 else 1.0 for k in range(len(ids))]
            return {self.name: ItemScores(ids, values, failures={"no_score": sum(math.isnan(v) for v in values)})}

    monkeypatch.setitem(scorers.SCORERS, "half_broken", HalfBroken)
    cfg = tiny_config(tmp_path, n_tasks=2, train={"max_steps": 1}, eval={"scorers": ["pref_acc", "half_broken"]})
    with caplog.at_level(logging.WARNING), pytest.raises(ScorerError, match="'half_broken' failed on all 8 items"):
        run_experiment(cfg, report=False)
    assert "1 of 8 items failed" in caplog.text  # a partial failure is a loud warning, the score is the rest's mean
    from lifealign.engine.items import read_items

    saved = {(r["metric"], r["task"], r["row"]) for r in read_items(tmp_path / "run" / "items.jsonl")}
    # the untrained model's evaluation already fails on capitals: every metric of it was written before the error
    assert ("half_broken", "capitals", None) in saved and ("pref_acc", "capitals", None) in saved


@pytest.mark.parametrize("negative_first", [True, False])
def test_a_negative_only_task_skips_its_sft_stage(tmp_path, negative_first):
    """With ``sft.enabled`` a negative-only task has no chosen responses: first in the stream it used to crash ("no
    trainable examples"), later it trained SFT on the replay buffer alone. Its SFT stage is skipped and recorded."""
    tasks = [
        {"name": "arithmetic", "train": "synthetic:arithmetic", "max_train": 8, "max_test": 4},
        {"name": "safety", "train": "synthetic:safety", "kind": "negative", "max_train": 8, "max_test": 4},
    ]
    tasks = tasks[::-1] if negative_first else tasks
    cfg = tiny_config(
        tmp_path,
        tasks=tasks,
        method={"name": "er", "loss": {"name": "dpo"}, "plugins": [{"name": "replay", "fraction": 0.5}]},
        sft={"enabled": True, "max_steps": 1},
        train={"max_steps": 1},
        unlearn={"selection": "all", "inner_max_steps": 1},
    )
    run_experiment(cfg, report=False)
    negative = 0 if negative_first else 1
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["stages"][f"t{negative}:sft"] == {
        "skipped": "negative-only task: no chosen responses to imitate",
        "steps": 0,
    }
    assert info["stages"][f"t{1 - negative}:sft"]["steps"] == 1  # the pairwise task's SFT stage still runs
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "step"]
    assert not [r for r in steps if r["task_index"] == negative and r["stage"] == "sft"]
    assert [r["stage"] for r in steps if r["task_index"] == negative] == ["unlearn"]
