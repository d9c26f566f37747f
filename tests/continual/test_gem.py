"""GEM / A-GEM: the projections against hand values and a brute-force oracle, the plugins on the tiny model."""

import itertools
import json

import pytest
import torch

from lifealign.config.schema import LossTerm
from lifealign.continual import bind_plugin
from lifealign.continual.gem import (
    AGEMPlugin,
    GEMPlugin,
    assign_flat_grad,
    flat_grad,
    project_agem,
    project_gem,
    solve_gem_dual,
)
from lifealign.data.records import PreferencePair, Task
from lifealign.losses import bind_losses
from tests.helpers import perturb_lora_b, synthetic_tasks, tiny_config

PAIRS = [
    PreferencePair(prompt=f"{a}*{b}=", chosen=str(a * b), rejected=str(a * b + 2), id=f"m{a}{b}")
    for a, b in [(2, 3), (4, 2), (3, 3), (5, 2)]
]


def _ctx(model, tokenizer, tmp_path, task_index=0, stage="pref"):
    from lifealign.training.plugin import PluginContext

    loss = bind_losses([LossTerm(name="dpo", beta=0.1)], "loss")
    return PluginContext(
        model=model,
        tokenizer=tokenizer,
        task=Task(name=f"t{task_index}", train=PAIRS, test=[]),
        task_index=task_index,
        stage=stage,
        loss=loss,
        data=tiny_config(tmp_path).data,
    )


def brute_force_projection(g: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The closest x to g with memory @ x ≥ 0: the best feasible projection onto every face {G_S x = 0}."""
    g, memory = g.double(), memory.double()
    best, best_dist = None, float("inf")
    for r in range(memory.shape[0] + 1):
        for subset in itertools.combinations(range(memory.shape[0]), r):
            if subset:
                a = memory[list(subset)]
                x = g - a.T @ torch.linalg.lstsq(a @ a.T, a @ g.unsqueeze(1)).solution.squeeze(1)
            else:
                x = g.clone()
            if bool((memory @ x >= -1e-9).all()):
                dist = float((x - g).norm())
                if dist < best_dist:
                    best, best_dist = x, dist
    assert best is not None
    return best


# ----- pure functions --------------------------------------------------------------------------------------------
def test_projection_onto_one_half_plane_by_hand():
    g, memory = torch.tensor([1.0, -1.0]), torch.tensor([[0.0, 1.0]])
    new, projected = project_gem(g, memory, margin=0.0)
    assert projected and torch.allclose(new, torch.tensor([1.0, 0.0]), atol=1e-9)


def test_no_conflict_leaves_the_gradient_unchanged():
    g = torch.tensor([1.0, 2.0, 0.5])
    new, projected = project_gem(g, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]]), margin=0.1)
    assert not projected and new is g


@pytest.mark.parametrize(("dim", "k", "seed"), [(2, 1, 0), (2, 2, 1), (3, 2, 2), (3, 3, 3), (3, 2, 4), (3, 3, 5)])
def test_projection_is_the_closest_feasible_gradient(dim, k, seed):
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    g = -memory.sum(0) + 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)  # conflicts with the memory
    assert bool((memory @ g < 0).any())
    new, projected = project_gem(g, memory, margin=0.0)
    assert projected
    assert bool((memory @ new >= -1e-9).all())
    assert torch.allclose(new, brute_force_projection(g, memory), atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_keeps_constraints_and_adds_at_least_margin_of_each_memory_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    g = -memory[0] + 0.1 * torch.randn(3, generator=gen, dtype=torch.float64)
    new, _ = project_gem(g, memory, margin=0.5)
    assert bool((memory @ new >= -1e-9).all())
    v = torch.linalg.lstsq(memory.T, (new - g).unsqueeze(1)).solution.squeeze(1)  # new − g = Gᵀ v
    assert torch.allclose(memory.T @ v, new - g, atol=1e-9)
    assert bool((v >= 0.5 - 1e-9).all())
    assert float((new - g).norm()) >= float((brute_force_projection(g, memory) - g).norm()) - 1e-9


def test_dual_solver_by_hand():
    # ½·4v² − 2v: minimum at v = 0.5; with the bound v ≥ 1 it sits on the bound
    assert solve_gem_dual(torch.tensor([[4.0]]), torch.tensor([-2.0]), 0.0).item() == pytest.approx(0.5)
    assert solve_gem_dual(torch.tensor([[4.0]]), torch.tensor([-2.0]), 1.0).item() == pytest.approx(1.0)
    # a zero memory gradient (P_kk = 0) stays at the bound
    assert solve_gem_dual(torch.zeros(1, 1), torch.zeros(1), 0.2).item() == pytest.approx(0.2)


def test_agem_closed_form_by_hand():
    new, projected = project_agem(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0]))
    assert projected and torch.allclose(new, torch.tensor([1.0, 0.0]))
    g = torch.tensor([1.0, 1.0])
    assert project_agem(g, torch.tensor([0.0, 2.0])) == (g, False)
    assert project_agem(g, torch.zeros(2)) == (g, False)


def test_flat_gradient_round_trip_fills_missing_gradients():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.ones(2, 2)
    vec = flat_grad([a, b])
    assert vec.tolist() == [1.0] * 4 + [0.0] * 3
    assign_flat_grad([a, b], torch.arange(7.0))
    assert a.grad.tolist() == [[0.0, 1.0], [2.0, 3.0]] and b.grad.tolist() == [4.0, 5.0, 6.0]


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (GEMPlugin, {"margin": -0.1}, "margin"),
        (GEMPlugin, {"memory_per_task": 0}, "memory_per_task"),
        (AGEMPlugin, {"sample_size": 0}, "sample_size"),
    ],
)
def test_bad_kwargs_name_the_key(cls, kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": cls.name, **kwargs})


# ----- the plugins on the tiny model -----------------------------------------------------------------------------


def _memory_gradient(plugin, ctx):
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    g = plugin._memory_gradient(ctx, params, plugin._prepared_task(ctx, 0))
    for p in params:
        p.grad = None
    return params, g


@pytest.mark.parametrize("cls", [GEMPlugin, AGEMPlugin])
def test_opposite_gradient_is_projected_to_zero_and_restored_otherwise(tiny_lora_model, tmp_path, cls):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    ctx = _ctx(model, tokenizer, tmp_path)
    plugin = cls(memory_per_task=3, memory_batch_size=2) if cls is AGEMPlugin else cls(memory_per_task=3, margin=0.1)
    if cls is AGEMPlugin:
        plugin.sample_size = 3  # the whole memory, so g_ref is the task's memory gradient
    plugin.after_task(ctx)
    ctx1 = _ctx(model, tokenizer, tmp_path, task_index=1)
    params, g_mem = _memory_gradient(plugin, ctx1)
    assert float(g_mem.norm()) > 0
    assign_flat_grad(params, -g_mem)  # a step that directly undoes task 0
    plugin.after_backward(ctx1)
    # margin 0.1 ≤ the exact dual solution 1, so GEM also lands on g − g = 0
    assert float(flat_grad(params).norm()) < 1e-5 * float(g_mem.norm())
    assert plugin.last["projected"] and min(plugin.last["dots_after"]) >= -1e-6 * float(g_mem.norm()) ** 2
    assign_flat_grad(params, 2 * g_mem)  # an aligned step is left as it is
    plugin.after_backward(ctx1)
    assert torch.allclose(flat_grad(params), 2 * g_mem) and not plugin.last["projected"]
    assert plugin.projected == 1 and plugin.steps == 2


def test_gem_memory_gradient_is_the_mean_loss_gradient_whatever_the_batch_size(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)
    ctx = _ctx(model, tokenizer, tmp_path)
    one, four = GEMPlugin(memory_per_task=4, memory_batch_size=1), GEMPlugin(memory_per_task=4, memory_batch_size=4)
    one.after_task(ctx)
    four.after_task(ctx)
    g1, g4 = _memory_gradient(one, ctx)[1], _memory_gradient(four, ctx)[1]
    assert float((g1 - g4).abs().max()) <= 1e-4 * float(g1.abs().max())


def test_unconfigured_stage_and_empty_memory_are_untouched(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    ctx = _ctx(model, tokenizer, tmp_path, stage="sft")
    plugin = GEMPlugin(stages=["pref"])
    plugin.after_backward(ctx)  # empty memory: nothing to do
    plugin.after_task(ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    assign_flat_grad(params, torch.ones(sum(p.numel() for p in params)))
    plugin.after_backward(ctx)
    assert bool((flat_grad(params) == 1).all()) and plugin.last == {}


def test_state_round_trip_restores_memory_and_step_count(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    ctx = _ctx(model, tokenizer, tmp_path)
    plugin = AGEMPlugin(memory_per_task=2)
    plugin.after_task(ctx)
    plugin.steps = 7
    state = plugin.state_dict()
    json.dumps(state["meta"])
    restored = AGEMPlugin(memory_per_task=2)
    restored.load_state_dict(state)
    assert restored.memory == plugin.memory and restored.steps == 7
    state["meta"]["memory"]["0"][0]["chosen"] = "tampered"
    with pytest.raises(ValueError, match="hash"):
        AGEMPlugin().load_state_dict(state)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gem", "agem"])
def test_end_to_end_projects_on_the_second_task_and_resumes(tmp_path, name):
    from lifealign.engine.experiment import run_experiment
    from lifealign.training.checkpoint import Checkpointer

    tasks = synthetic_tasks(2, max_train=6, max_test=4)
    cfg = tiny_config(
        tmp_path,
        tasks=tasks,
        train={"max_steps": 2, "save_every": 100},
        method={"name": name, "loss": {"name": "dpo"}, "plugins": [{"name": name, "memory_per_task": 4}]},
        eval={"scorers": ["pref_acc"], "max_examples": 4},
    )
    run_experiment(cfg, report=False)
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "run_info.json").read_text())["memory"][name]
    assert info["tasks"] == {"0": 4, "1": 4} and info["steps"] == 4
    ckpt = Checkpointer(run_dir / "checkpoints").latest()
    restored = (GEMPlugin if name == "gem" else AGEMPlugin)(memory_per_task=4)
    restored.load_state_dict({"tensors": {}, "meta": ckpt.state["parts"]["plugins"][0]})
    keys = ("tasks", "steps", "projected_steps")
    assert {k: restored.report()[k] for k in keys} == {k: info[k] for k in keys}
    assert len(info["last"]["dots_after"]) == 1  # the last step of task 1 saw task 0's memory
    assert min(info["last"]["dots_after"]) >= -1e-6 * max(1.0, abs(min(info["last"]["dots_before"])))
