"""CPPO: sample weights on a hand batch, the exact extra term against an independent computation, the snapshot."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from lifealign.config.schema import LossTerm
from lifealign.continual import bind_plugin
from lifealign.continual.cppo import CPPOPlugin, cppo_weights, knowledge_retention
from lifealign.data.collate import collate_pairs
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.losses import bind_losses
from lifealign.models.lora import load_lora_state, lora_modules, lora_state
from lifealign.training.forward import batch_logps, loss_inputs
from lifealign.training.plugin import PluginContext
from tests.helpers import synthetic_tasks, tiny_config

PAIRS = [
    PreferencePair(prompt=f"Capital of {c}?", chosen=a, rejected=b, id=c)
    for c, a, b in [
        ("France", "Paris", "Lyon"),
        ("Italy", "Rome", "Milan"),
        ("Spain", "Madrid", "Porto"),
        ("Peru", "Lima", "Cusco"),
        ("Japan", "Tokyo", "Osaka"),
        ("Chile", "Santiago", "Arica"),
    ]
]


def test_weights_of_a_hand_batch_follow_the_four_classes():
    # mean 0; unbiased std sqrt(16 / 7) = 1.512 for both; thresholds ±1.512
    margins = torch.tensor([2.0, 2.0, -2.0, -2.0, 0.0, 0.0, 0.0, 0.0])
    chosen = torch.tensor([2.0, -2.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0])
    alpha, beta = cppo_weights(margins, chosen)
    # high-performance, high-variance, overfitting, noisy, then four normal examples
    assert alpha.tolist() == [2.0, 2.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert beta.tolist() == [2.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_wider_threshold_makes_every_example_normal_and_bounds_are_configurable():
    margins = torch.tensor([2.0, 2.0, -2.0, -2.0, 0.0, 0.0, 0.0, 0.0])
    chosen = torch.tensor([2.0, -2.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0])
    alpha, beta = cppo_weights(margins, chosen, std_mult=1.5)  # thresholds ±2.268: nobody is outside
    assert alpha.tolist() == [1.0] * 8 and beta.tolist() == [1.0] * 8
    alpha, beta = cppo_weights(margins, chosen, alpha_bounds=(0.1, 3.0), beta_bounds=(0.2, 4.0))
    assert alpha[:4].tolist() == pytest.approx([3.0, 3.0, 3.0, 0.1])
    assert beta[:4].tolist() == pytest.approx([4.0, 0.2, 0.2, 0.2])


def test_degenerate_batches_get_unit_weights():
    assert cppo_weights(torch.tensor([1.0]), torch.tensor([-3.0]))[0].tolist() == [1.0]
    alpha, beta = cppo_weights(torch.full((4,), 0.3), torch.full((4,), -2.0))  # zero std, clamped
    assert alpha.tolist() == [1.0] * 4 and beta.tolist() == [1.0] * 4


def test_knowledge_retention_by_hand():
    policy = {"chosen_logps": torch.tensor([-1.0, -2.0]), "rejected_logps": torch.tensor([-3.0, -1.0])}
    old = {"chosen_logps": torch.tensor([-2.0, -2.0]), "rejected_logps": torch.tensor([-1.0, -4.0])}
    assert knowledge_retention(policy, old, ("chosen", "rejected")).tolist() == [1.0 + 4.0, 0.0 + 9.0]
    assert knowledge_retention(policy, old, ("chosen",)).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"snapshot": "step"}, "snapshot"), ({"kr_coef": -1}, "kr_coef"), ({"alpha_bounds": [2.0, 0.5]}, "alpha_bounds")],
)
def test_bad_kwargs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "cppo", **kwargs})


# ----- the plugin on the tiny model ------------------------------------------------------------------------------
def _perturb(model, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _a, b in lora_modules(model).values():
            b.add_(scale * torch.randn(b.shape, generator=gen))


def test_extra_term_makes_the_total_the_authors_weighted_loss(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    cfg = tiny_config(tmp_path)
    loss = bind_losses([LossTerm(name="dpo", beta=0.1)], "loss")
    ctx = PluginContext(
        model=model,
        tokenizer=tokenizer,
        task=Task(name="t", train=PAIRS, test=[]),
        task_index=1,
        loss=loss,
        data=cfg.data,
    )
    _perturb(model, seed=1)
    plugin = CPPOPlugin(kr_coef=0.1, std_mult=0.5)
    plugin.before_task(ctx)  # π_old = this adapter
    old_model = copy.deepcopy(model)
    _perturb(model, seed=2)  # training moved the policy
    examples = tokenize_pairs(PAIRS, tokenizer, cfg.data).examples
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        ref = batch_logps(model, batch)
    ref_block = torch.stack([ref["chosen_logps"], ref["rejected_logps"]], dim=1)
    policy = batch_logps(model, batch)
    inputs = loss_inputs(policy, ref_block, ("chosen", "rejected"))
    total, _, _ = loss(inputs)
    live = {k: v.clone() for k, v in lora_state(model).items()}
    extra = plugin.extra_loss(ctx, batch, {"policy": policy, "inputs": inputs, "loss": total})

    # independent: DPO by hand, π_old from a deep copy holding the snapshot, weights from the tested table
    margin = 0.1 * ((policy["chosen_logps"] - ref["chosen_logps"]) - (policy["rejected_logps"] - ref["rejected_logps"]))
    dpo = -F.logsigmoid(margin)
    alpha, beta = cppo_weights(margin, policy["chosen_logps"], std_mult=0.5)
    assert (alpha != 1).any()  # the batch has re-weighted examples
    with torch.no_grad():
        old = batch_logps(old_model, batch)
    kr = (policy["chosen_logps"] - old["chosen_logps"]) ** 2 + (policy["rejected_logps"] - old["rejected_logps"]) ** 2
    expected = (alpha * dpo + 0.1 * beta * kr).mean()
    assert (total + extra).item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(kr.min()) > 0
    (total + extra).backward()  # old log-probs did not modify the live weights in place
    assert all(torch.equal(v, live[k]) for k, v in lora_state(model).items())
    ctx.stage = "sft"
    assert plugin.extra_loss(ctx, batch, {"policy": policy, "inputs": inputs, "loss": total}) is None


@pytest.mark.parametrize(("snapshot", "expected_task"), [("task", 1), ("once", 0)])
def test_snapshot_is_refreshed_per_task_or_taken_once(tiny_lora_model, tmp_path, snapshot, expected_task):
    model, tokenizer = tiny_lora_model
    plugin = CPPOPlugin(snapshot=snapshot)
    first = lora_state(model)
    for i in range(2):
        _perturb(model, seed=i + 5)
        state_at_start = lora_state(model)
        plugin.before_task(
            PluginContext(
                model=model,
                tokenizer=tokenizer,
                task=Task(name="t", train=[], test=[]),
                task_index=i,
            )
        )
        if i == 0:
            first = state_at_start
    want = state_at_start if snapshot == "task" else first
    assert plugin.snapshot_task == expected_task
    assert all(torch.equal(plugin.old_state[k], want[k]) for k in want)


def test_state_round_trip_restores_the_snapshot(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    _perturb(model, seed=3)
    plugin = CPPOPlugin()
    plugin.before_task(
        PluginContext(
            model=model,
            tokenizer=tokenizer,
            task=Task(name="t", train=[], test=[]),
            task_index=0,
        )
    )
    state = plugin.state_dict()
    json.dumps(state["meta"])
    restored = CPPOPlugin()
    restored.load_state_dict(state)
    assert restored.snapshot_task == 0 and all(
        torch.equal(restored.old_state[k], v) for k, v in plugin.old_state.items()
    )
    load_lora_state(model, restored.old_state)  # the snapshot is a loadable adapter state
    with pytest.raises(ValueError, match="snapshot"):
        CPPOPlugin(snapshot="once").load_state_dict(state)


@pytest.mark.slow
def test_end_to_end_reweights_and_retains_on_the_second_task(tmp_path):
    from lifealign.engine.experiment import run_experiment
    from lifealign.training.checkpoint import Checkpointer
    from lifealign.training.metrics import read_metrics

    tasks = synthetic_tasks(2, max_train=8, max_test=4)
    cfg = tiny_config(
        tmp_path,
        tasks=tasks,
        train={"max_steps": 2, "save_every": 100, "batch_size": 8},
        method={"name": "cppo", "loss": {"name": "dpo"}, "plugins": [{"name": "cppo", "kr_coef": 10.0}]},
        eval={"scorers": ["pref_acc"], "max_examples": 4},
    )
    run_experiment(cfg, report=False)
    run_dir = tmp_path / "run"
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "step"]
    # first step: policy = reference = π_old, so every margin is 0 (α = 1) and KR = 0; later the policy moves
    assert steps[0]["loss/cppo"] == 0.0
    assert steps[-1]["task_index"] == 1 and steps[-1]["loss/cppo"] != 0.0
    ckpt = Checkpointer(run_dir / "checkpoints").latest()
    restored = CPPOPlugin(kr_coef=10.0)
    tensors = ckpt.tensors("plugins")
    restored.load_state_dict(
        {
            "tensors": {k[2:]: v for k, v in tensors.items() if k.startswith("0.")},
            "meta": ckpt.state["parts"]["plugins"][0],
        }
    )
    assert restored.snapshot_task == 1 and restored.old_state
