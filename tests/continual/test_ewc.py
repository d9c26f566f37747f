"""EWC: the penalty and the diagonal Fisher against hand-computed values, the plugin on the tiny model, resume."""

import json

import pytest
import torch
import torch.nn.functional as F

from lifealign.config.schema import LossTerm
from lifealign.continual import bind_plugin
from lifealign.continual.ewc import EWCPlugin, accumulate_fisher, diagonal_fisher, ewc_penalty
from lifealign.data.collate import collate_pairs
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.losses import bind_losses
from lifealign.models.lora import lora_parameters, lora_state
from lifealign.training.forward import batch_logps
from lifealign.training.plugin import PluginContext
from tests.helpers import perturb_lora_b, synthetic_tasks, tiny_config

PAIRS = [
    PreferencePair(prompt=f"{a}+{b}=", chosen=str(a + b), rejected=str(a + b + 1), id=f"p{a}{b}")
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)]
]


def _ctx(model, tokenizer, tmp_path, task_index=0, stage="pref"):
    cfg = tiny_config(tmp_path)
    loss = bind_losses([LossTerm(name="dpo", beta=0.1)], "loss")
    task = Task(name=f"t{task_index}", train=PAIRS, test=[])
    return PluginContext(
        model=model,
        tokenizer=tokenizer,
        task=task,
        task_index=task_index,
        stage=stage,
        loss=loss,
        data=cfg.data,
    )


# ----- pure functions --------------------------------------------------------------------------------------------
def test_penalty_is_half_lambda_fisher_weighted_squared_distance():
    params = {"w": torch.tensor([1.0, 2.0])}
    anchor = {"w": torch.tensor([0.5, 1.0])}
    fisher = {"w": torch.tensor([2.0, 4.0])}
    # (0.1 / 2) * (2 * 0.5² + 4 * 1²) = 0.05 * 4.5
    assert ewc_penalty(params, fisher, anchor, lam=0.1).item() == pytest.approx(0.225)


def test_penalty_rejects_a_fisher_for_missing_parameters():
    with pytest.raises(ValueError, match="lacks"):
        ewc_penalty({}, {"w": torch.ones(1)}, {"w": torch.ones(1)}, 1.0)


def test_fisher_is_the_mean_squared_gradient_on_a_two_parameter_toy():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    # loss_b = (w1 x + w2 y − t)²: batch 1 (1, 0, 0): r = 1, grad (2, 0); batch 2 (0, 1, 0): r = 2, grad (0, 4)
    batches = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]
    fisher = diagonal_fisher({"w": w}, batches, lambda b: (w[0] * b[0] + w[1] * b[1] - b[2]) ** 2)
    assert torch.allclose(fisher["w"], torch.tensor([(4.0 + 0.0) / 2, (0.0 + 16.0) / 2]))
    assert w.grad is None


@pytest.mark.parametrize(("mode", "expected"), [("sum", [4.0, 6.0]), ("mean", [2.0, 3.0]), ("replace", [3.0, 5.0])])
def test_fisher_accumulation_modes(mode, expected):
    old, new = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 5.0])}
    # running mean with one earlier task: (1·old + new) / 2
    assert accumulate_fisher(old, new, 1, mode)["w"].tolist() == expected
    assert accumulate_fisher(None, new, 0, mode)["w"].tolist() == [3.0, 5.0]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"lam": -1.0}, "lam"),
        ({"n_samples": 0}, "n_samples"),
        ({"accumulate": "max"}, "accumulate"),
        ({"stages": ["rl"]}, "stages"),
        ({"batch_size": 1.5}, "batch_size"),
    ],
)
def test_bad_kwargs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "ewc", **kwargs})


# ----- the plugin on the tiny model ------------------------------------------------------------------------------


def _dpo_losses_oracle(model, tokenizer, data, pairs, beta=0.1):
    """Per-pair DPO losses from scratch: summed response log-probs, base reference with the adapter disabled."""
    examples = tokenize_pairs(pairs, tokenizer, data).examples
    out = []
    for ex in examples:
        batch = collate_pairs([ex], tokenizer.pad_token_id)
        pol = batch_logps(model, batch)
        with torch.no_grad(), model.disable_adapter():
            ref = batch_logps(model, batch)
        margin = (pol["chosen_logps"] - ref["chosen_logps"]) - (pol["rejected_logps"] - ref["rejected_logps"])
        out.append(-F.logsigmoid(beta * margin).sum())
    return out


def test_fisher_matches_per_example_squared_gradients(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    ctx = _ctx(model, tokenizer, tmp_path)
    plugin = EWCPlugin(n_samples=len(PAIRS), batch_size=1)
    fisher = plugin.task_fisher(ctx, PAIRS)
    params = lora_parameters(model)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    losses = _dpo_losses_oracle(model, tokenizer, ctx.data, PAIRS)
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, _), g in zip(params.items(), grads):
            if g is not None:
                expected[k] += g.pow(2) / len(losses)
    assert set(fisher) == set(params)
    for k in params:
        assert torch.allclose(fisher[k], expected[k], rtol=1e-4, atol=1e-12), k
    assert sum(float(v.sum()) for v in fisher.values()) > 0


def test_penalty_after_a_task_is_zero_at_the_anchor_and_quadratic_away_from_it(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    ctx = _ctx(model, tokenizer, tmp_path)
    plugin = EWCPlugin(lam=2.0, n_samples=4)
    assert plugin.extra_loss(ctx, {}, {}) is None  # no Fisher during the first task
    plugin.after_task(ctx)
    assert plugin.extra_loss(ctx, {}, {}).item() == 0.0
    name, f = max(plugin.fisher.items(), key=lambda kv: float(kv[1].max()))
    i = int(f.reshape(-1).argmax())
    param = lora_parameters(model)[name]
    with torch.no_grad():
        param.view(-1)[i] += 0.3
    penalty = plugin.extra_loss(ctx, {}, {})
    assert penalty.item() == pytest.approx(0.5 * 2.0 * float(f.reshape(-1)[i]) * 0.09, rel=1e-5)
    penalty.backward()
    assert param.grad.view(-1)[i].item() == pytest.approx(2.0 * float(f.reshape(-1)[i]) * 0.3, rel=1e-5)
    ctx.stage = "sft"
    assert EWCPlugin(stages=["pref"]).extra_loss(ctx, {}, {}) is None


def test_second_task_sums_fishers_and_moves_the_anchor(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    plugin = EWCPlugin(n_samples=3, accumulate="sum")
    plugin.after_task(_ctx(model, tokenizer, tmp_path, task_index=0))
    first = {k: v.clone() for k, v in plugin.fisher.items()}
    perturb_lora_b(model, seed=2)
    ctx1 = _ctx(model, tokenizer, tmp_path, task_index=1)
    plugin.after_task(ctx1)
    second = plugin.task_fisher(ctx1, plugin_records(plugin, ctx1))
    for k in first:
        assert torch.allclose(plugin.fisher[k], first[k] + second[k], rtol=1e-5, atol=1e-12)
        assert torch.equal(plugin.anchor[k], lora_state(model)[k].float())
    plugin.after_task(ctx1)  # a repeated after_task (resumed phase) is not counted twice
    assert plugin.tasks == [0, 1] and plugin.n_fishers == 2


def _sft_losses_oracle(model, tokenizer, data, pairs):
    """Per-example SFT losses from scratch: the mean over response tokens of -log p(token | prefix), from logits."""
    out = []
    for ex in tokenize_pairs(pairs, tokenizer, data, sides=("chosen",)).examples:
        ids = torch.tensor([ex["prompt_ids"] + ex["chosen_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        start = len(ex["prompt_ids"])
        token_logps = [logp[t - 1, ids[0, t]] for t in range(start, ids.shape[1])]
        out.append(-torch.stack(token_logps).mean())
    return out


def test_after_the_sft_stage_the_fisher_is_the_sft_losss_and_the_anchor_the_post_sft_weights(tiny_lora_model, tmp_path):
    """As the authors' BaseTrainerCL (register_ewc_params after SFT): F = mean per-example squared gradient of the
    SFT loss on the task's SFT records, θ* = the post-SFT weights; the task's own preference stage is then
    penalised. ``after_task`` registers again with the method's loss (sum: F_sft + F_dpo) and moves θ*."""
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    ctx = _ctx(model, tokenizer, tmp_path, stage="sft")
    plugin = EWCPlugin(n_samples=len(PAIRS), batch_size=1)
    plugin.after_stage(ctx)
    assert plugin.registered == ["0:sft"] and plugin.tasks == [] and plugin.n_fishers == 1
    params = lora_parameters(model)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    losses = _sft_losses_oracle(model, tokenizer, ctx.data, PAIRS)
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, _), g in zip(params.items(), grads):
            if g is not None:
                expected[k] += g.pow(2) / len(losses)
    for k in params:
        assert torch.allclose(plugin.fisher[k], expected[k], rtol=1e-4, atol=1e-12), k
        assert torch.equal(plugin.anchor[k], params[k].detach().float())
    sft_fisher = {k: v.clone() for k, v in plugin.fisher.items()}
    ctx.stage = "pref"
    assert plugin.extra_loss(ctx, {}, {}).item() == 0.0  # the preference stage of task 0 is penalised from here
    perturb_lora_b(model, seed=4)
    assert plugin.extra_loss(ctx, {}, {}).item() > 0.0
    plugin.after_task(ctx)
    dpo_fisher = plugin.task_fisher(ctx, plugin_records(plugin, ctx))
    assert plugin.registered == ["0:sft", "0:task"] and plugin.tasks == [0] and plugin.n_fishers == 2
    for k in params:
        assert torch.allclose(plugin.fisher[k], sft_fisher[k] + dpo_fisher[k], rtol=1e-5, atol=1e-12)
        assert torch.equal(plugin.anchor[k], params[k].detach().float())
    plugin.after_stage(_ctx(model, tokenizer, tmp_path, stage="sft"))  # a repeated phase is not counted twice
    assert plugin.n_fishers == 2


def test_without_consolidate_sft_only_the_end_of_task_registers(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    plugin = EWCPlugin(n_samples=3, consolidate_sft=False)
    plugin.after_stage(_ctx(model, tokenizer, tmp_path, stage="sft"))
    assert plugin.fisher is None and plugin.registered == []
    ctx = _ctx(model, tokenizer, tmp_path, stage="sft")
    assert plugin.extra_loss(ctx, {}, {}) is None
    on = EWCPlugin(n_samples=3)
    for stage in ("pref", "unlearn"):  # only the SFT stage registers in after_stage
        on.after_stage(_ctx(model, tokenizer, tmp_path, stage=stage))
    assert on.fisher is None and on.registered == []
    plugin.after_task(ctx)
    assert plugin.registered == ["0:task"] and plugin.n_fishers == 1


def plugin_records(plugin, ctx):
    from lifealign.training.stored import sample_records

    return sample_records(ctx.task.train, plugin.n_samples, f"{plugin.seed}:{ctx.task_index}")


def test_state_round_trip_restores_the_same_penalty(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    ctx = _ctx(model, tokenizer, tmp_path)
    plugin = EWCPlugin(lam=5.0, n_samples=3, accumulate="mean")
    plugin.after_task(ctx)
    perturb_lora_b(model, seed=3)
    state = plugin.state_dict()
    json.dumps(state["meta"])
    restored = EWCPlugin(lam=5.0, n_samples=3, accumulate="mean")
    restored.load_state_dict(state)
    assert restored.extra_loss(ctx, {}, {}).item() == plugin.extra_loss(ctx, {}, {}).item() > 0
    assert restored.tasks == [0] and restored.n_fishers == 1 and restored.registered == ["0:task"]
    old_meta = {k: v for k, v in state["meta"].items() if k != "registered"}  # a checkpoint from before "registered"
    older = EWCPlugin(lam=5.0, n_samples=3, accumulate="mean")
    older.load_state_dict({"tensors": state["tensors"], "meta": old_meta})
    assert older.registered == ["0:task"]
    with pytest.raises(ValueError, match="accumulate"):
        EWCPlugin(accumulate="sum").load_state_dict(state)


@pytest.mark.slow
def test_end_to_end_penalty_grows_on_the_second_task_and_state_resumes(tmp_path):
    from lifealign.engine.experiment import run_experiment
    from lifealign.training.checkpoint import Checkpointer
    from lifealign.training.metrics import read_metrics

    tasks = synthetic_tasks(2, max_train=6, max_test=4)
    cfg = tiny_config(
        tmp_path,
        tasks=tasks,
        train={"max_steps": 2, "save_every": 100},
        method={"name": "ewc", "loss": {"name": "dpo"}, "plugins": [{"name": "ewc", "lam": 1.0e6, "n_samples": 4}]},
        eval={"scorers": ["pref_acc"], "max_examples": 4},
    )
    run_experiment(cfg, report=False)
    run_dir = tmp_path / "run"
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "step"]
    assert all("loss/ewc" not in r for r in steps if r["task_index"] == 0)
    second = [r["loss/ewc"] for r in steps if r["task_index"] == 1]
    assert second[0] == 0.0 and second[1] > 0.0  # θ = θ* at the first step, then the weights move
    ckpt = Checkpointer(run_dir / "checkpoints").latest()
    restored = EWCPlugin(lam=1.0e6, n_samples=4)
    plugin_tensors = ckpt.tensors("plugins")
    restored.load_state_dict(
        {
            "tensors": {k[2:]: v for k, v in plugin_tensors.items() if k.startswith("0.")},
            "meta": ckpt.state["parts"]["plugins"][0],
        }
    )
    info = json.loads((run_dir / "run_info.json").read_text())["memory"]["ewc"]
    assert restored.tasks == [0, 1]
    assert restored.report()["fisher"]["sum"] == pytest.approx(info["fisher"]["sum"], rel=1e-6)
