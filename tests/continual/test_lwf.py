"""LwF: the distillation KL by hand, the term on the tiny model against an independent computation, resume."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lifealign.config.schema import LossTerm
from lifealign.continual import bind_plugin
from lifealign.continual.lwf import LwFPlugin, distillation_kl
from lifealign.data.collate import collate_pairs
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.losses import bind_losses
from lifealign.models.lora import lora_parameters, lora_state
from lifealign.training.forward import batch_logps
from lifealign.training.plugin import PluginContext
from tests.helpers import perturb_lora_b, synthetic_tasks, tiny_config

PAIRS = [
    PreferencePair(prompt=f"Capital of {c}?", chosen=a, rejected=b, id=c)
    for c, a, b in [("France", "Paris", "Lyon"), ("Italy", "Rome", "Milan"), ("Peru", "Lima", "Cusco")]
]


# ----- the KL by hand --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("temperature", "kl", "grad0"),
    [
        # T = 1: p_old = (1/2, 1/2), q = softmax(ln 3, 0) = (3/4, 1/4);
        # KL = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3); d(T² KL)/dz = T (q − p_old) = (¼, −¼)
        (1.0, 0.5 * math.log(4 / 3), 0.25),
        # T = 2: q = softmax(ln 3 / 2, 0) = (√3, 1) / (1 + √3);
        # KL = ½ ln(½ (1 + √3) / √3) + ½ ln(½ (1 + √3)); d(T² KL)/dz = 2 (q − p_old) = 2 (√3 / (1 + √3) − ½)
        (
            2.0,
            0.5 * math.log((1 + 3**0.5) / (2 * 3**0.5)) + 0.5 * math.log((1 + 3**0.5) / 2),
            2 * (3**0.5 / (1 + 3**0.5) - 0.5),
        ),
    ],
)
def test_distillation_kl_and_its_gradient_by_hand(temperature, kl, grad0):
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    value = distillation_kl(student, teacher, temperature)
    assert value.shape == (1,) and value.item() == pytest.approx(kl, rel=1e-6)
    (temperature**2 * value.sum()).backward()
    # the gradient descent step lowers the logit the student over-weights: back towards the teacher
    assert student.grad[0].tolist() == pytest.approx([grad0, -grad0], rel=1e-5)


def test_kl_is_zero_for_equal_logits_positive_otherwise_and_matches_torch():
    gen = torch.Generator().manual_seed(0)
    z_old, z = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    assert torch.equal(distillation_kl(z_old.clone(), z_old, 2.0), torch.zeros(5))
    ours = distillation_kl(z, z_old, 2.0)
    torch_kl = F.kl_div(F.log_softmax(z / 2, -1), F.log_softmax(z_old / 2, -1), log_target=True, reduction="none")
    assert bool((ours > 0).all())
    torch.testing.assert_close(ours, torch_kl.sum(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "key"), [({"lam": -1}, "lam"), ({"temperature": 0}, "temperature"), ({"stages": ["rl"]}, "stages")]
)
def test_bad_kwargs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "lwf", **kwargs})


# ----- the plugin on the tiny model ------------------------------------------------------------------------------
def _ctx(model, tokenizer, cfg, index):
    return PluginContext(
        model=model,
        tokenizer=tokenizer,
        task=Task(name=f"t{index}", train=PAIRS, test=[]),
        task_index=index,
        stage="pref",
        loss=bind_losses([LossTerm(name="dpo")], "loss"),
        data=cfg.data,
    )


def _batch(tokenizer, cfg, sides=("chosen", "rejected")):
    return collate_pairs(tokenize_pairs(PAIRS, tokenizer, cfg.data).examples, tokenizer.pad_token_id, sides=sides)


def _full_logits(model, batch):
    """Independent: every position's logits, then the positions that predict a response token."""
    keep = torch.nn.functional.pad(batch["completion_mask"][:, 1:].bool(), (0, 1))
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]


def test_term_is_zero_at_the_snapshot_then_the_tokenwise_kl_against_an_independent_teacher(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    cfg = tiny_config(tmp_path)
    batch = _batch(tokenizer, cfg)
    plugin = LwFPlugin(lam=0.5, temperature=2.0)
    perturb_lora_b(model, seed=1)
    ctx = _ctx(model, tokenizer, cfg, index=1)
    plugin.before_task(ctx)  # π_old = this adapter
    plugin.before_stage(ctx)
    policy = batch_logps(model, batch)  # the loop's forward (grad on): the hook keeps its response logits
    zero = plugin.extra_loss(ctx, batch, {"policy": policy})
    assert zero.item() == 0.0  # exactly: the policy is the teacher

    old_model = copy.deepcopy(model)
    perturb_lora_b(model, seed=2)  # training moved the policy
    live = lora_state(model)
    policy = batch_logps(model, batch)
    term = plugin.extra_loss(ctx, batch, {"policy": policy})
    with torch.no_grad():
        teacher = _full_logits(old_model, batch)
    student = _full_logits(model, batch)
    kl = F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="none")
    expected = 0.5 * 4.0 * kl.sum(-1).mean()
    assert term.item() == pytest.approx(expected.item(), rel=1e-4) and term.item() > 0
    term.backward()
    assert all(torch.equal(v, live[k]) for k, v in lora_state(model).items())  # the teacher forward left them alone
    grads = [p.grad for p in lora_parameters(model).values()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0

    # a small step against the gradient brings the policy closer to the teacher
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p -= 1e-2 * p.grad
    after = plugin.extra_loss(ctx, batch, {"policy": batch_logps(model, batch)})
    assert after.item() < term.item()
    plugin.after_stage(ctx)
    assert plugin.report()["kl"]["t1:pref"]["micro_batches"] == 3


def test_no_term_in_the_first_task_in_an_unconfigured_stage_or_without_a_hook(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    cfg = tiny_config(tmp_path)
    batch = _batch(tokenizer, cfg)
    plugin = LwFPlugin(stages=("pref",))
    first = _ctx(model, tokenizer, cfg, index=0)
    plugin.before_task(first)
    plugin.before_stage(first)
    assert plugin.old_state is None and plugin.extra_loss(first, batch, {"policy": batch_logps(model, batch)}) is None
    second = _ctx(model, tokenizer, cfg, index=1)
    plugin.before_task(second)
    second.stage = "sft"
    plugin.before_stage(second)
    sft_batch = _batch(tokenizer, cfg, sides=("chosen",))
    assert plugin.extra_loss(second, sft_batch, {"policy": batch_logps(model, sft_batch)}) is None
    plugin.close()


def test_sft_batches_distil_the_chosen_rows_and_a_missing_forward_is_an_error(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    cfg = tiny_config(tmp_path)
    plugin = LwFPlugin()
    ctx = _ctx(model, tokenizer, cfg, index=1)
    plugin.before_task(ctx)
    ctx.stage = "sft"
    plugin.before_stage(ctx)
    perturb_lora_b(model, seed=3)
    batch = _batch(tokenizer, cfg, sides=("chosen",))
    assert plugin.extra_loss(ctx, batch, {"policy": batch_logps(model, batch)}).item() > 0
    with pytest.raises(RuntimeError, match="expected the policy forward's logits"):
        plugin.extra_loss(ctx, batch, {})  # no forward since the last term
    plugin.close()


def test_state_round_trip_restores_the_teacher(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model, seed=4)
    plugin = LwFPlugin()
    plugin.before_task(_ctx(model, tokenizer, tiny_config(tmp_path), index=2))
    plugin.stats = {"t2:pref": {"kl_mean": 0.5, "micro_batches": 2, "tokens": 10}}
    state = plugin.state_dict()
    json.dumps(state["meta"])
    restored = LwFPlugin()
    restored.load_state_dict(state)
    assert restored.snapshot_task == 2 and restored.report() == plugin.report()
    assert all(torch.equal(restored.old_state[k], v) for k, v in plugin.old_state.items())


# ----- end to end ------------------------------------------------------------------------------------------------
def _cfg(out, tasks):
    return tiny_config(
        out,
        tasks=tasks,
        train={"max_steps": 4, "save_every": 2},
        method={"name": "lwf", "loss": {"name": "dpo"}, "plugins": [{"name": "lwf", "lam": 1.0}]},
        eval={"scorers": ["pref_acc"], "max_examples": 4},
    )


@pytest.mark.slow
def test_end_to_end_distils_from_the_second_task_and_resumes_mid_stage_to_the_same_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import lifealign.training.loop as loop_module
    from lifealign.engine.experiment import run_experiment
    from lifealign.training.metrics import read_metrics

    tasks = synthetic_tasks(2, max_train=8, max_test=4)
    reference = run_experiment(_cfg(tmp_path / "a", tasks), report=False)
    steps = [r for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if r["event"] == "step"]
    assert all("loss/lwf" not in r for r in steps if r["task_index"] == 0)
    second = [r["loss/lwf"] for r in steps if r["task_index"] == 1]
    assert second[0] == 0.0 and second[-1] > 0.0  # step 1 of task 1: the policy is the teacher

    class Interrupt(RuntimeError):
        pass

    def fault(point, **where):  # after the step-2 checkpoint of task 1, mid-stage
        if point == "step" and (where["task"], where["stage"], where["step"]) == (1, "pref", 3):
            raise Interrupt
        return False

    monkeypatch.setattr(loop_module, "maybe_fault", fault)
    with pytest.raises(Interrupt):
        run_experiment(_cfg(tmp_path / "b", tasks), report=False)
    monkeypatch.undo()
    resumed = run_experiment(_cfg(tmp_path / "b", tasks), resume=True, report=False)  # fresh model and plugin
    assert json.dumps(resumed, sort_keys=True) == json.dumps(reference, sort_keys=True)
    saved = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    first = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == first.keys() and all(torch.equal(saved[k], first[k]) for k in saved)
    again = [r for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if r["event"] == "step"]
    assert [r["loss/lwf"] for r in again if r["task_index"] == 1][-1] == second[-1]
    info = json.loads((tmp_path / "b" / "run" / "run_info.json").read_text())["memory"]["lwf"]
    assert info["snapshot_task"] == 1 and info["kl"]["t1:pref"]["micro_batches"] > 0
