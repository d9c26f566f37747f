"""The training loop's invariants: frozen base, step-0 DPO = ln 2, non-finite guard, data order, metrics names."""

import math

import pytest
import torch

from lifealign.engine.experiment import load_base_with_adapter, run_experiment
from lifealign.models.lora import lora_state
from lifealign.training.loop import NonFiniteLossError, micro_batch_indices, total_steps
from lifealign.training.metrics import read_metrics
from lifealign.training.plugin import Plugin
from tests.helpers import tiny_config


def test_total_steps_from_epochs_or_max_steps():
    assert total_steps(10, 1.0, None, micro_batch=4, grad_accum=1, world=1) == 3
    assert total_steps(10, 2.0, None, micro_batch=2, grad_accum=2, world=1) == 5
    assert total_steps(10, 1.0, 7, micro_batch=4, grad_accum=1, world=1) == 7


def test_micro_batches_cover_each_epoch_once_and_are_seeded():
    n = 10
    first_epoch = [i for s in range(5) for i in micro_batch_indices(n, 3, s, 0, 1, 2, 0, 1)]
    assert sorted(first_epoch) == list(range(n))
    assert micro_batch_indices(n, 3, 2, 0, 1, 2, 0, 1) == micro_batch_indices(n, 3, 2, 0, 1, 2, 0, 1)
    assert micro_batch_indices(n, 3, 0, 0, 1, 5, 0, 1) != micro_batch_indices(n, 4, 0, 0, 1, 5, 0, 1)
    # two ranks see disjoint halves of each global batch
    r0 = micro_batch_indices(n, 3, 0, 0, 1, 2, 0, 2)
    r1 = micro_batch_indices(n, 3, 0, 0, 1, 2, 1, 2)
    assert not set(r0) & set(r1)


def test_training_moves_lora_only_and_first_dpo_step_is_ln2(tmp_path):
    cfg = tiny_config(tmp_path, n_tasks=1)
    model, _ = load_base_with_adapter(cfg)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    run_experiment(cfg, report=False)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "step"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0 (F24)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    trl_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected")
    for key in (*trl_names, "logits/chosen", "logits/rejected", "epoch"):
        assert key in steps[-1]
    assert steps[-1]["epoch"] == pytest.approx(4 * 4 / 16)  # 4 steps of 4 pairs over 16 training pairs
    assert steps[-1]["loss"] < steps[0]["loss"]
    # the base is bit-identical after training: reload and compare the trained run's model weights
    trained, _ = load_base_with_adapter(cfg)
    from lifealign.models.lora import load_adapter

    adapted = load_adapter(trained.get_base_model(), tmp_path / "run" / "adapter")
    for name, p in adapted.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "base_model.model.", 1)
            if key in base_before:
                assert torch.equal(p, base_before[key]), name


def test_nan_loss_at_one_step_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFEALIGN_FAULT", "nan:point=loss,task=0,stage=pref,step=1")
    cfg = tiny_config(tmp_path, n_tasks=1)
    run_experiment(cfg, report=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("stage") == "pref"]
    skipped = [r for r in records if r["event"] == "nonfinite_skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] == 2
    assert skipped[0]["loss"] is None and "loss" in skipped[0]["nonfinite"]
    assert records[-1]["nonfinite_skipped"] == 1


def test_nan_loss_on_every_step_aborts_and_never_saves_nan(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFEALIGN_FAULT", "nan:point=loss,task=0,stage=pref")
    cfg = tiny_config(tmp_path, n_tasks=1)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps at task 'arithmetic'.*stage pref, step 3"):
        run_experiment(cfg, report=False)
    from lifealign.training.checkpoint import Checkpointer

    latest = Checkpointer(tmp_path / "run" / "checkpoints").latest()
    assert latest is not None
    for t in latest.tensors("adapter").values():
        assert torch.isfinite(t).all()


def test_previous_reference_makes_each_task_start_at_ln2(tmp_path):
    """With ``reference: previous`` the reference is the policy at task start, so task 2's first DPO loss is ln 2."""
    cfg = tiny_config(tmp_path, n_tasks=2, method={"name": "seqft", "loss": {"name": "dpo"}, "reference": "previous"})
    run_experiment(cfg, report=False)
    first = {}
    for r in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        if r["event"] == "step":
            first.setdefault(r["task"], r["loss"])
    assert first["capitals"] == pytest.approx(math.log(2), abs=1e-6)
    import json

    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["references"] == {"arithmetic": "base", "capitals": "previous"}


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    """batch 4 × accum 1 and batch 2 × accum 2 see the same examples per step and give the same adapter."""
    a = tiny_config(tmp_path / "a", n_tasks=1, train={"batch_size": 4, "grad_accum": 1, "max_grad_norm": None})
    b = tiny_config(tmp_path / "b", n_tasks=1, train={"batch_size": 2, "grad_accum": 2, "max_grad_norm": None})
    # same data order requires the same global window: micro-batch windows of 2+2 equal one window of 4
    assert [i for acc in range(2) for i in micro_batch_indices(16, 0, 1, acc, 2, 2, 0, 1)] == micro_batch_indices(
        16, 0, 1, 0, 1, 4, 0, 1
    )
    run_experiment(a, report=False)
    run_experiment(b, report=False)
    from safetensors.torch import load_file

    sa = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    sb = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5), k


def test_lora_state_changes_after_training(tmp_path):
    cfg = tiny_config(tmp_path, n_tasks=1)
    model, _ = load_base_with_adapter(cfg)
    init = lora_state(model)
    run_experiment(cfg, report=False)
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b_keys = [k for k in trained if "lora_B" in k]
    assert b_keys and all(trained[k].abs().sum() > 0 for k in b_keys)
    assert all(v.abs().sum() == 0 for k, v in init.items() if "lora_B" in k)


class _NanGradOnce(Plugin):
    """A plugin that poisons one LoRA gradient with NaN on the second optimizer step (finite loss, F18)."""

    name = "nangrad"

    def __init__(self):
        self.calls = 0

    def after_backward(self, ctx):
        self.calls += 1
        if self.calls == 2:
            p = next(p for p in ctx.model.parameters() if p.requires_grad and p.grad is not None)
            p.grad.view(-1)[0] = float("nan")


def test_nan_gradient_with_finite_loss_is_skipped(tmp_path, monkeypatch):
    from lifealign.continual import METHODS

    monkeypatch.setitem(METHODS, "nangrad", _NanGradOnce)
    cfg = tiny_config(
        tmp_path, n_tasks=1, method={"name": "m", "loss": {"name": "dpo"}, "plugins": [{"name": "nangrad"}]}
    )
    run_experiment(cfg, report=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("stage") == "pref"]
    skipped = [r for r in records if r["event"] == "nonfinite_skipped"]
    assert [r["step"] for r in skipped] == [2]
    assert skipped[0]["loss"] is not None and skipped[0]["grad_norm"] is None


def test_previous_reference_without_cache_matches_cached(tmp_path):
    """``reference: previous`` recomputed per batch (adapter swap) equals the cached reference run."""
    method = {"name": "seqft", "loss": {"name": "dpo"}, "reference": "previous"}
    cached = tiny_config(tmp_path / "a", n_tasks=2, method=method, train={"max_steps": 2})
    live = tiny_config(tmp_path / "b", n_tasks=2, method=method, train={"max_steps": 2, "cache_reference": False})
    s1 = run_experiment(cached, report=False)
    s2 = run_experiment(live, report=False)
    for row1, row2 in zip(s1["seqft"]["margin"]["matrix"], s2["seqft"]["margin"]["matrix"]):
        for a, b in zip(row1, row2):
            assert (a != a and b != b) or abs(a - b) < 1e-5


class _StopAtStep(Plugin):
    """Asks to stop at the first micro-batch of optimizer step ``at`` (0-based); records that ``after_stage`` ran."""

    name = "stop_at"

    def __init__(self, at: int | None):
        self.at, self.seen_steps, self.stage_ended, self.snapshot = at, 0, False, None

    def stop_request(self, ctx, batch, outputs):
        if self.at is not None and self.seen_steps == self.at:
            return {"event": "test_stop", "at": self.at}
        return None

    def after_backward(self, ctx):
        if self.seen_steps == 2:  # before the third update: the weights after two steps
            self.snapshot = lora_state(ctx.model)
        self.seen_steps += 1

    def after_stage(self, ctx):
        self.stage_ended = True


def _run_stage(tmp_path, plugin, max_steps=4):
    from lifealign.data.sources import load_stream
    from lifealign.data.tokenize import tokenize_pairs
    from lifealign.engine.experiment import make_accelerator
    from lifealign.losses import bind_losses
    from lifealign.training.loop import StageContext, StagePlan, train_task
    from lifealign.training.plugin import PluginContext

    cfg = tiny_config(tmp_path, n_tasks=1)
    torch.manual_seed(0)
    model, tokenizer = load_base_with_adapter(cfg)
    task = load_stream(cfg.tasks, cfg.data, seed=0)[0]
    examples = tokenize_pairs(task.train, tokenizer, cfg.data).examples
    loss = bind_losses(cfg.method.loss)
    records = []
    stage = StageContext(
        model=model,
        tokenizer=tokenizer,
        accelerator=make_accelerator(cfg),
        train=cfg.train,
        data=cfg.data,
        loss=loss,
        plugins=[plugin],
        metrics=records.append,
        commit=lambda loop: None,
        method_name="m",
    )
    ctx = PluginContext(model=model, tokenizer=tokenizer, task=task, task_index=0)
    plan = StagePlan(0, task, "pref", loss, lr=1e-2, epochs=1.0, max_steps=max_steps)
    return train_task(model, examples, plan, stage, ctx), lora_state(model), records


def test_a_stop_request_ends_the_stage_before_that_steps_update(tmp_path):
    full = _StopAtStep(at=None)
    _, _, _ = _run_stage(tmp_path / "full", full)
    stopper = _StopAtStep(at=2)
    result, weights, records = _run_stage(tmp_path / "stop", stopper)
    assert result.stopped == {"event": "test_stop", "at": 2} and result.steps == 2
    assert stopper.stage_ended  # after_stage still runs
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2]
    for name, value in weights.items():  # exactly the weights after two steps: nothing of step 3 was applied
        assert torch.equal(value, full.snapshot[name]), name


class _AskOnRank(Plugin):
    name = "ask_on_rank"

    def __init__(self, rank: int, asking_rank: int):
        self.rank, self.asking_rank = rank, asking_rank

    def stop_request(self, ctx, batch, outputs):
        return {"event": "stop", "from": self.rank} if self.rank == self.asking_rank else None


def _stop_worker(rank: int, world: int, port: int, results) -> None:
    import types

    import torch.distributed as dist

    from lifealign.training.loop import _stop_event

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        acc = types.SimpleNamespace(num_processes=world)
        quiet = _stop_event(acc, [_AskOnRank(rank, asking_rank=-1)], None, {}, {})
        asked = _stop_event(acc, [_AskOnRank(rank, asking_rank=1)], None, {}, {})
        results[rank] = (quiet, asked)
    finally:
        dist.destroy_process_group()


def test_a_stop_asked_on_one_rank_stops_every_rank():
    """Otherwise the other rank would enter a backward whose gradient all-reduce never completes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_stop_worker, args=(2, port, results), nprocs=2, join=True)
        out = dict(results)
    assert out[0] == out[1] == (None, {"event": "stop", "from": 1})
