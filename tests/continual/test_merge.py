"""Continual LoRA merging: TIES' trimming and sign election by hand, DARE with a fixed seed, task arithmetic, the
plugin on the tiny model (what it merges, what it writes back and reports), resume."""

import json

import pytest
import torch

from lifealign.continual import bind_plugin
from lifealign.continual.merge import MergePlugin, merge_pair, sign_conflict
from lifealign.continual.slmc import refactorise_lora
from lifealign.data.records import Task
from lifealign.models.lora import lora_modules, lora_state
from lifealign.training.plugin import PluginContext
from tests.helpers import synthetic_tasks, tiny_config

# the running merged update M and the new task's update τ (2 x 3)
M = torch.tensor([[3.0, -1.2, 0.5], [-2.0, 0.2, 1.0]])
TAU = torch.tensor([[-4.0, 2.0, 1.5], [-2.5, 0.1, -3.0]])


# ----- the operators by hand -------------------------------------------------------------------------------------
def test_ties_on_both_trims_elects_the_sign_and_takes_the_disjoint_mean_by_hand():
    """peft's ``ties`` verbatim (``sparsify="both"``), density 0.5 keeps int(0.5 · 6) = 3 entries of each:
    M' = [[3, −1.2, 0], [−2, 0, 0]] (|3|, |−2|, |−1.2|), τ' = [[−4, 0, 0], [−2.5, 0, −3]] (|−4|, |−3|, |−2.5|).
    Sign election on the trimmed sum [[−1, −1.2, 0], [−4.5, 0, −3]]: [[−, −, +], [−, +, −]] (0 counts as +).
    Agreeing entries: M' at (0,1), (1,0); τ' at (0,0), (1,0), (1,2) — M's 3 at (0,0) loses the election.
    Weights (1, 0.5), disjoint mean: (0,0) −2/1, (0,1) −1.2/1, (1,0) (−2 − 1.25)/2 = −1.625, (1,2) −1.5/1, rest 0."""
    out = merge_pair(M, TAU, "ties", (1.0, 0.5), density=0.5, sparsify="both")
    expected = torch.tensor([[-2.0, -1.2, 0.0], [-1.625, 0.0, -1.5]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_ties_on_the_new_update_keeps_the_running_merge_untrimmed_by_hand():
    """``sparsify="new"``: only τ is trimmed (τ' as above); the sum with the whole M,
    [[−1, −1.2, 0.5], [−4.5, 0.2, −2]], elects [[−, −, +], [−, +, −]]. M agrees everywhere but (0,0) (3 vs −) and
    (1,2) (1 vs −); τ' at (0,0), (1,0), (1,2). Weights (1, 0.5): (0,0) −2, (0,1) −1.2, (0,2) 0.5,
    (1,0) (−2 − 1.25)/2 = −1.625, (1,1) 0.2, (1,2) −1.5."""
    out = merge_pair(M, TAU, "ties", (1.0, 0.5), density=0.5)
    expected = torch.tensor([[-2.0, -1.2, 0.5], [-1.625, 0.2, -1.5]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_ties_frequency_election_counts_signs_instead_of_summing_them():
    """(0,0): signs + (M' = 3) and − (τ' = −4) count 1 − 1 = 0, elected + (ties go to +): M's 3 is kept, τ's −4 is
    dropped; the other entries elect as with "total"."""
    out = merge_pair(M, TAU, "ties", (1.0, 0.5), density=0.5, majority_sign_method="frequency", sparsify="both")
    torch.testing.assert_close(out, torch.tensor([[3.0, -1.2, 0.0], [-1.625, 0.0, -1.5]]), atol=1e-6, rtol=0)


def test_task_arithmetic_is_the_weighted_sum_and_ignores_density():
    for sparsify in ("new", "both"):
        out = merge_pair(M, TAU, "task_arithmetic", (1.0, 0.5), density=0.1, sparsify=sparsify)
        torch.testing.assert_close(out, M + 0.5 * TAU)


def test_dare_with_a_fixed_seed_by_hand_and_the_random_state_untouched():
    """peft draws one Bernoulli(density) mask per pruned tensor from the CPU generator, M's first: rebuilt here from
    the same seed. ``both``: DARE-linear = w_0 M·m_0 / d + w_1 τ·m_1 / d; ``new``: w_0 M + w_1 τ·m_0 / d."""
    d, seed = 0.5, 1234
    gen = torch.Generator().manual_seed(seed)
    m0 = torch.bernoulli(torch.full_like(M, d), generator=gen)
    m1 = torch.bernoulli(torch.full_like(TAU, d), generator=gen)
    before = torch.random.get_rng_state()
    out = merge_pair(M, TAU, "dare_linear", (1.0, 0.5), density=d, seed=seed, sparsify="both")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream goes on as if not called
    torch.testing.assert_close(out, M * m0 / d + 0.5 * TAU * m1 / d, atol=1e-6, rtol=0)
    assert torch.equal(out, merge_pair(M, TAU, "dare_linear", (1.0, 0.5), d, seed=seed, sparsify="both"))
    assert not torch.equal(out, merge_pair(M, TAU, "dare_linear", (1.0, 0.5), d, seed=seed + 1, sparsify="both"))
    new = merge_pair(M, TAU, "dare_linear", (1.0, 0.5), density=d, seed=seed)
    torch.testing.assert_close(new, M + 0.5 * TAU * m0 / d, atol=1e-6, rtol=0)
    # DARE-TIES: the same masks, then TIES' election and disjoint mean on the rescaled tensors
    for sparsify, kept in (("both", torch.stack([M * m0 / d, TAU * m1 / d])), ("new", torch.stack([M, TAU * m0 / d]))):
        elected = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
        agree = kept.sign() == elected
        weighted = kept * torch.tensor([1.0, 0.5]).view(2, 1, 1)
        expected = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
        out = merge_pair(M, TAU, "dare_ties", (1.0, 0.5), d, seed=seed, sparsify=sparsify)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_sign_conflict_counts_opposite_signs_where_both_are_non_zero():
    assert sign_conflict(M, TAU) == (3, 6)  # (0,0), (0,1) and (1,2) disagree
    assert sign_conflict(torch.zeros(2, 3), TAU) == (0, 0)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"method": "fisher"}, "method"),
        ({"density": 0}, "density"),
        ({"density": 1.5}, "density"),
        ({"weights": [1.0]}, "weights"),
        ({"majority_sign_method": "vote"}, "majority_sign_method"),
        ({"sparsify": "old"}, "sparsify"),
    ],
)
def test_bad_kwargs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "merge", **kwargs})


# ----- the plugin on the tiny model ------------------------------------------------------------------------------
def _ctx(model, index):
    return PluginContext(model=model, tokenizer=None, task=Task(f"t{index}", []), task_index=index, n_tasks=3)


def _train_like(model, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in lora_modules(model).values():
            a.add_(scale * torch.randn(a.shape, generator=gen))
            b.add_(scale * torch.randn(b.shape, generator=gen))


def _products(model):
    return {k: (b @ a).detach().clone() for k, (a, b) in lora_modules(model).items()}


def test_task_arithmetic_from_peft_init_scales_the_first_update_exactly(tiny_lora_model):
    """Task 0 starts at B = 0, so M_0 = 0.5 τ_0 = 0.5 B A has rank ≤ r: the rank-r write-back is exact, and the
    adapter keeps 0.25 of the update's energy."""
    model, _ = tiny_lora_model
    plugin = MergePlugin(method="task_arithmetic", weights=(1.0, 0.5))
    plugin.before_task(_ctx(model, 0))
    _train_like(model, seed=1)
    trained = _products(model)
    plugin.after_task(_ctx(model, 0))
    for name, product in _products(model).items():
        torch.testing.assert_close(product, 0.5 * trained[name], atol=1e-5, rtol=1e-5)
    report = plugin.report()["reports"][0]
    assert report["refactor_residual"] < 1e-10 and report["retained_update"] == pytest.approx(0.25, rel=1e-4)
    assert report["sign_conflict"] == 0.0  # nothing merged before: no overlap
    assert report["update_norm"] == pytest.approx(sum(float(p.pow(2).sum()) for p in trained.values()) ** 0.5)


def test_ties_on_the_second_task_writes_the_rank_r_part_of_the_merged_products(tiny_lora_model):
    model, _ = tiny_lora_model
    plugin = MergePlugin(method="ties", density=0.2)
    for index in range(2):
        plugin.before_task(_ctx(model, index))
        start = _products(model)
        _train_like(model, seed=index + 1)
        trained = lora_state(model)
        now = _products(model)
        plugin.after_task(_ctx(model, index))
    after = _products(model)
    for name in lora_modules(model):  # independent: the pure merge, then the SLMC split
        a_key = next(k for k in trained if k.startswith(name) and ".lora_A." in k)
        merged = merge_pair(start[name], now[name] - start[name], "ties", (1.0, 1.0), 0.2, sparsify="new")
        want_b, want_a, residual = refactorise_lora(merged, 8, float(trained[a_key].norm(dim=1).mean()))
        torch.testing.assert_close(after[name], want_b @ want_a, atol=1e-5, rtol=1e-4)
        assert plugin.reports[1]["modules"][name]["refactor_residual"] == pytest.approx(residual, rel=1e-4)
    report = plugin.reports[1]
    assert 0 < report["refactor_residual"] < 1  # trimmed products are not rank 8: some energy is lost
    assert 0 < report["sign_conflict"] < 1 and plugin.merged_tasks == [0, 1]
    json.dumps(plugin.report())


def test_after_task_needs_its_snapshot_and_merges_once(tiny_lora_model):
    model, _ = tiny_lora_model
    plugin = MergePlugin()
    with pytest.raises(RuntimeError, match="without its before_task snapshot"):
        plugin.after_task(_ctx(model, 0))
    plugin.before_task(_ctx(model, 0))
    _train_like(model, seed=3)
    plugin.after_task(_ctx(model, 0))
    state = lora_state(model)
    plugin.after_task(_ctx(model, 0))  # a repeated call changes nothing
    assert all(torch.equal(v, state[k]) for k, v in lora_state(model).items()) and len(plugin.reports) == 1


def test_state_round_trip_inside_a_task_merges_the_same(tiny_lora_model):
    model, _ = tiny_lora_model
    plugin = MergePlugin(method="dare_ties", density=0.5, seed=7)
    plugin.before_task(_ctx(model, 0))
    _train_like(model, seed=4)
    plugin.after_task(_ctx(model, 0))
    plugin.before_task(_ctx(model, 1))
    _train_like(model, seed=5)
    state, mid = plugin.state_dict(), lora_state(model)
    json.dumps(state["meta"])
    plugin.after_task(_ctx(model, 1))
    expected = lora_state(model)

    from lifealign.models.lora import load_lora_state

    load_lora_state(model, mid)
    resumed = MergePlugin(method="dare_ties", density=0.5, seed=7)
    resumed.load_state_dict(state)
    assert resumed.start_task == 1 and resumed.merged_tasks == [0]
    resumed.after_task(_ctx(model, 1))
    assert all(torch.equal(v, expected[k]) for k, v in lora_state(model).items())
    assert resumed.reports == plugin.reports
    with pytest.raises(ValueError, match="merge method"):
        MergePlugin(method="ties").load_state_dict(state)


# ----- end to end ------------------------------------------------------------------------------------------------
def _cfg(out, tasks):
    return tiny_config(
        out,
        tasks=tasks,
        train={"max_steps": 4, "save_every": 2},
        method={"name": "merge", "loss": {"name": "dpo"}, "plugins": [{"name": "merge", "method": "dare_ties"}]},
        eval={"scorers": ["pref_acc"], "max_examples": 4},
    )


@pytest.mark.slow
def test_end_to_end_interrupted_mid_stage_and_after_a_merge_resumes_to_the_same_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import lifealign.engine.run as run_module
    import lifealign.training.loop as loop_module
    from lifealign.engine.experiment import run_experiment

    tasks = synthetic_tasks(2, max_train=8, max_test=4)
    reference = run_experiment(_cfg(tmp_path / "a", tasks), report=False)
    first = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))

    class Interrupt(RuntimeError):
        pass

    def in_stage(point, **where):  # task 1, after its step-2 checkpoint: the start snapshot is in the plugin state
        if point == "step" and (where["task"], where["stage"], where["step"]) == (1, "pref", 3):
            raise Interrupt
        return False

    def after_merge(point, **where):  # t0:after committed, t0:eval not run
        if point == "after_save" and where.get("phase") == "t0:after":
            raise Interrupt
        return False

    for name, module, fault in (("b", loop_module, in_stage), ("c", run_module, after_merge)):
        monkeypatch.setattr(module, "maybe_fault", fault)
        with pytest.raises(Interrupt):
            run_experiment(_cfg(tmp_path / name, tasks), report=False)
        monkeypatch.undo()
        resumed = run_experiment(_cfg(tmp_path / name, tasks), resume=True, report=False)
        assert json.dumps(resumed, sort_keys=True) == json.dumps(reference, sort_keys=True)
        saved = load_file(str(tmp_path / name / "run" / "adapter" / "adapter_model.safetensors"))
        assert saved.keys() == first.keys() and all(torch.equal(saved[k], first[k]) for k in saved)
    info = json.loads((tmp_path / "b" / "run" / "run_info.json").read_text())["memory"]["merge"]
    assert info["merged_tasks"] == [0, 1] and [r["task_index"] for r in info["reports"]] == [0, 1]
    assert all(0 <= r["refactor_residual"] < 1 and r["update_norm"] > 0 for r in info["reports"])
