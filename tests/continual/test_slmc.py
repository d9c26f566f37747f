"""SLMC: energy truncation, history projection, the plugin on a tiny LoRA model, product mode, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lifealign.continual import bind_plugin
from lifealign.continual.slmc import (
    SLMCPlugin,
    consolidate_update,
    history_basis,
    project_onto_span,
    refactorise_lora,
    truncate_by_energy,
)
from lifealign.data.records import Task
from lifealign.models.lora import load_lora_state, lora_modules, lora_state
from lifealign.training.plugin import PluginContext


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def ctx_for(model, index: int, stage: str = "pref") -> PluginContext:
    return PluginContext(model=model, tokenizer=None, task=Task(f"t{index}", []), task_index=index, stage=stage)


def perturb(model, seed: int, scale: float = 0.1) -> None:
    """Simulate a stage of training: add Gaussian noise to every lora_A and lora_B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in lora_modules(model).values():
            a.add_(scale * torch.randn(a.shape, generator=g).to(a.dtype))
            b.add_(scale * torch.randn(b.shape, generator=g).to(b.dtype))


def oracle_truncate(m: np.ndarray, theta: float) -> np.ndarray:
    """Independent float64 numpy version of Eqs. 4–7."""
    u, s, vh = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    ratio = np.cumsum(s**2) / np.sum(s**2)
    k = min(int(np.searchsorted(ratio, theta, side="left")) + 1, len(s))
    return (u[:, :k] * s[:k]) @ vh[:k]


# ----- pure functions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("theta", "rank", "kept"), [(0.9, 2, 13 / 14), (0.5, 1, 9 / 14), (0.95, 3, 1.0), (0.0, 1, 9 / 14), (1.0, 3, 1.0)]
)
def test_truncation_keeps_the_smallest_rank_reaching_theta(theta, rank, kept):
    """σ = 3, 2, 1 → cumulative energy 9/14 ≈ 0.643, 13/14 ≈ 0.929, 1: θ = 0.9 needs rank 2, θ = 0.5 rank 1.

    The matrix is Q1 diag(3, 2, 1) Q2ᵀ (random orthogonal Q), so the result must be Q1 diag(σ_1..σ_k, 0…) Q2ᵀ.
    """
    q1, q2 = random_orthogonal(4, 1)[:, :3], random_orthogonal(3, 2)
    sigma = torch.tensor([3.0, 2.0, 1.0])
    m = q1 @ torch.diag(sigma) @ q2.T
    out, k, energy = truncate_by_energy(m, theta)
    assert k == rank
    assert energy == pytest.approx(kept, abs=1e-6)
    torch.testing.assert_close(out, q1[:, :rank] @ torch.diag(sigma[:rank]) @ q2[:, :rank].T, atol=1e-5, rtol=0)


def test_near_zero_update_is_returned_unchanged():
    """Σσ² = 6 · (1e-6)² = 6e-12 ≤ 1e-9: no truncation, even at θ = 0."""
    m = torch.full((3, 2), 1e-6)
    out, k, energy = truncate_by_energy(m, 0.0)
    assert torch.equal(out, m) and k == 2 and energy == 1.0


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(2, 8),
    cols=st.integers(2, 8),
    theta=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_truncation_matches_a_numpy_oracle(rows, cols, theta, seed):
    m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    s = np.linalg.svd(m.double().numpy(), compute_uv=False)
    ratio = np.cumsum(s**2) / np.sum(s**2)
    assume(np.min(np.abs(ratio - theta)) > 1e-4)  # float32 vs float64 may disagree at an exact tie
    out, k, energy = truncate_by_energy(m, theta)
    assert energy >= theta - 1e-6
    assert k == 1 or ratio[k - 2] < theta  # one rank fewer would not reach θ
    np.testing.assert_allclose(out.numpy(), oracle_truncate(m.numpy(), theta), atol=1e-4)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_in_history_part_is_scaled_by_lambda_and_orthogonal_part_kept(lam):
    """SM = 2 H + 3 O with H the (unit) history update and O ⊥ H (unit): RSM = 2λ H + 3 O (θ = 1 keeps SM).

    ``in_span_energy`` = ‖2H‖² / ‖SM‖² = 4 / 13.
    """
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g)
    h = h / h.norm()
    o = torch.randn(5, 4, generator=g)
    o = o - (o * h).sum() * h
    o = o / o.norm()
    rsm, info = consolidate_update(2 * h + 3 * o, [h.reshape(-1)], theta=1.0, lam=lam)
    torch.testing.assert_close(rsm, 2 * lam * h + 3 * o, atol=1e-5, rtol=0)
    assert info["history_rank"] == 1 and info["rank"] == 4 and info["max_rank"] == 4
    assert info["in_span_energy"] == pytest.approx(4 / 13, abs=1e-5)


def test_empty_history_leaves_the_denoised_update():
    m = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    rsm, info = consolidate_update(m, [], theta=0.9, lam=0.0)
    torch.testing.assert_close(rsm, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6, rtol=0)
    assert info["history_rank"] == 0 and info["in_span_energy"] == 0.0


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 4),
    n=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    truncate=st.booleans(),
)
def test_projection_is_idempotent_and_leaves_a_residual_orthogonal_to_history(t, n, seed, truncate):
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(t, n, generator=g)
    v = torch.randn(n, generator=g)
    basis = history_basis(history, rank_truncate_basis=truncate)
    p = project_onto_span(v, basis)
    torch.testing.assert_close(project_onto_span(p, basis), p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(history @ (v - p), torch.zeros(t), atol=1e-4, rtol=0)


def test_untruncated_basis_keeps_arbitrary_directions_from_zero_history_rows():
    """History [e0, 0] in R³: rank-truncated basis = {e0}; the code's untruncated basis has a second, spurious row."""
    history = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    kept = history_basis(history, rank_truncate_basis=True)
    assert kept.shape == (1, 3)
    torch.testing.assert_close(kept.abs(), torch.tensor([[1.0, 0.0, 0.0]]))
    spurious = history_basis(history, rank_truncate_basis=False)
    assert spurious.shape == (2, 3)
    assert float(spurious[1, 0].abs()) < 1e-6  # orthogonal to e0, otherwise arbitrary


def test_refactorise_is_exact_up_to_the_adapter_rank():
    """Rank-2 target, r = 3: B A = target, A rows orthogonal with norm c = 0.5, B's third column is zero."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g)
    b, a, residual = refactorise_lora(target, 3, a_row_norm=0.5)
    assert b.shape == (6, 3) and a.shape == (3, 5)
    torch.testing.assert_close(b @ a, target, atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ a.T, 0.25 * torch.eye(3), atol=1e-5, rtol=0)
    assert float(b[:, 2].abs().max()) < 1e-5 and residual < 1e-10


def test_refactorise_above_rank_keeps_the_best_rank_r_part():
    """σ = 4, 3, 2, 1 and r = 2: B A = the top-2 part; residual = (4 + 1) / (16 + 9 + 4 + 1) = 1/6."""
    q1, q2 = random_orthogonal(5, 3)[:, :4], random_orthogonal(4, 4)
    target = q1 @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ q2.T
    b, a, residual = refactorise_lora(target, 2, a_row_norm=1.0)
    torch.testing.assert_close(b @ a, q1[:, :2] @ torch.diag(torch.tensor([4.0, 3.0])) @ q2[:, :2].T, atol=1e-5, rtol=0)
    assert residual == pytest.approx(1 / 6, abs=1e-6)


# ----- the plugin -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"theta": 1.5}, "theta"),
        ({"lam": -0.1}, "lam"),
        ({"lam": "half"}, "lam"),
        ({"stages": ["rl"]}, "stages"),
        ({"granularity": "both"}, "granularity"),
        ({"rank_truncate_basis": "yes"}, "rank_truncate_basis"),
    ],
)
def test_plugin_rejects_bad_kwargs_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "slmc", **kwargs})


def run_stage(plugin: SLMCPlugin, model, index: int, seed: int, stage: str = "pref") -> dict[str, torch.Tensor]:
    """before_stage → simulated training → after_stage; returns the trained (unconsolidated) LoRA state."""
    ctx = ctx_for(model, index, stage)
    plugin.before_stage(ctx)
    perturb(model, seed)
    trained = lora_state(model)
    plugin.after_stage(ctx)
    return trained


@pytest.mark.parametrize("granularity", ["factors", "product"])
def test_theta_one_lambda_one_is_the_identity(tiny_lora_model, granularity):
    model, _ = tiny_lora_model
    plugin = SLMCPlugin(theta=1.0, lam=1.0, granularity=granularity)
    for index in range(2):  # the second task also runs the (λ = 1, no-op) projection
        trained = run_stage(plugin, model, index, seed=index)
        now = lora_state(model)
        if granularity == "factors":
            for name in trained:
                torch.testing.assert_close(now[name], trained[name], atol=1e-6, rtol=0)
        else:
            for name, (a, b) in lora_modules(model).items():
                a_key = next(k for k in trained if k.startswith(name) and ".lora_A." in k)
                b_key = a_key.replace(".lora_A.", ".lora_B.")
                torch.testing.assert_close(b @ a, trained[b_key] @ trained[a_key], atol=1e-5, rtol=0)
    if granularity == "product":  # B_trained A_trained has rank ≤ r, so the split back into (B, A) is exact
        assert all(m["refactor_residual"] < 1e-8 for m in plugin.reports[-1]["matrices"].values())


def test_first_task_writes_w0_plus_the_denoised_update(tiny_lora_model):
    """No history yet: W = W0 + truncSVD_θ(W_trained − W0) per lora_A / lora_B (numpy float64 oracle)."""
    model, _ = tiny_lora_model
    perturb(model, seed=10)  # a non-trivial start point W0
    w0 = lora_state(model)
    plugin = SLMCPlugin(theta=0.5, lam=0.5)
    trained = run_stage(plugin, model, 0, seed=11)
    now = lora_state(model)
    for name in trained:
        sm = (trained[name] - w0[name]).numpy()
        expected = w0[name].numpy() + oracle_truncate(sm, 0.5)
        np.testing.assert_allclose(now[name].numpy(), expected, atol=1e-5)
    ranks = [m["rank"] for m in plugin.reports[0]["matrices"].values()]
    assert all(1 <= r < 8 for r in ranks)  # θ = 0.5 on a random 8-column update never needs every direction


def test_lambda_zero_makes_the_next_update_orthogonal_to_the_history(tiny_lora_model):
    model, _ = tiny_lora_model
    plugin = SLMCPlugin(theta=1.0, lam=0.0)
    w_start = lora_state(model)
    run_stage(plugin, model, 0, seed=1)
    w_mid = lora_state(model)
    run_stage(plugin, model, 1, seed=2)
    w_end = lora_state(model)
    for name in w_start:
        first, second = (w_mid[name] - w_start[name]).reshape(-1), (w_end[name] - w_mid[name]).reshape(-1)
        assert abs(float(first @ second)) < 1e-5 * float(first.norm() * second.norm())
        assert float(second.norm()) > 0
    assert all(m["history_rank"] == 1 for m in plugin.reports[1]["matrices"].values())


def test_unconfigured_stage_is_untouched_and_configured_stages_share_one_history(tiny_lora_model):
    model, _ = tiny_lora_model
    pref_only = SLMCPlugin(theta=0.1)
    trained = run_stage(pref_only, model, 0, seed=3, stage="sft")
    assert all(torch.equal(lora_state(model)[k], v) for k, v in trained.items())
    assert pref_only.reports == [] and pref_only.history == {}

    both = SLMCPlugin(stages=["sft", "pref"])
    run_stage(both, model, 0, seed=4, stage="sft")
    run_stage(both, model, 0, seed=5, stage="pref")
    assert [r["stage"] for r in both.reports] == ["sft", "pref"]
    assert {len(rows) for rows in both.history.values()} == {2}
    assert all(m["history_rank"] == 1 for m in both.reports[1]["matrices"].values())


def test_report_counts_history_bytes(tiny_lora_model):
    """Tiny model, r = 8, 2 layers: q_proj A 8×64 + B 64×8, v_proj A 8×64 + B 32×8 → 1792 floats per layer,
    3584 float32 = 14336 bytes per consolidation; 8 matrices per report."""
    model, _ = tiny_lora_model
    plugin = SLMCPlugin()
    run_stage(plugin, model, 0, seed=1)
    assert plugin.report()["history_bytes"] == 14336
    run_stage(plugin, model, 1, seed=2)
    report = plugin.report()
    assert report["history_bytes"] == 2 * 14336 and report["consolidations"] == 2 and report["history_length"] == 2
    assert len(report["reports"][1]["matrices"]) == 8
    assert report["reports"][1]["task_index"] == 1 and report["reports"][1]["stage"] == "pref"
    assert 0.9 <= report["reports"][1]["mean_kept_energy"] <= 1.0


def test_product_mode_denoises_the_effective_update(tiny_lora_model):
    """Product mode, first task from peft's B0 = 0: B A = truncSVD_θ(B_trained A_trained) (rank ≤ r, exact split)."""
    model, _ = tiny_lora_model
    plugin = SLMCPlugin(theta=0.5, granularity="product")
    trained = run_stage(plugin, model, 0, seed=6)
    for name, (a, b) in lora_modules(model).items():
        a_key = next(k for k in trained if k.startswith(name) and ".lora_A." in k)
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        expected = oracle_truncate((trained[b_key] @ trained[a_key]).numpy(), 0.5)
        np.testing.assert_allclose((b @ a).detach().numpy(), expected, atol=1e-5)
        assert float(a.detach().norm(dim=1).min()) > 0  # no dead A rows: every slot can still learn
    assert len(plugin.history) == 4 and all(rows[0].numel() in (64 * 64, 32 * 64) for rows in plugin.history.values())


def test_bf16_adapter_keeps_its_dtype(tiny_lora_model):
    model, _ = tiny_lora_model
    for a, b in lora_modules(model).values():
        a.data, b.data = a.data.bfloat16(), b.data.bfloat16()
    plugin = SLMCPlugin(theta=1.0, lam=1.0)
    trained = run_stage(plugin, model, 0, seed=7)
    for name, value in lora_state(model).items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, trained[name], atol=1e-6, rtol=1e-2)  # atol: entries at ~0 differ by ulps


def test_after_stage_without_before_stage_is_an_error(tiny_lora_model):
    model, _ = tiny_lora_model
    with pytest.raises(RuntimeError, match="without its before_stage snapshot"):
        SLMCPlugin().after_stage(ctx_for(model, 0))


def test_state_round_trip_mid_stage_resumes_exactly(tiny_lora_model, tmp_path):
    """Checkpoint inside task 1's stage (history + W0), restore into a fresh plugin, and finish the stage: the
    consolidated adapter, the history and the reports equal the uninterrupted run's. ``before_stage`` is called
    again on resume (as ``train_task`` does) and must keep the restored W0."""
    model, _ = tiny_lora_model
    original = SLMCPlugin(theta=0.8, lam=0.3)
    run_stage(original, model, 0, seed=1)
    ctx = ctx_for(model, 1)
    original.before_stage(ctx)
    perturb(model, seed=2)
    mid = lora_state(model)
    state = original.state_dict()
    save_file(state["tensors"], tmp_path / "plugin.safetensors")
    (tmp_path / "plugin.json").write_text(json.dumps(state["meta"]))
    original.after_stage(ctx)
    expected = lora_state(model)

    load_lora_state(model, mid)
    resumed = SLMCPlugin(theta=0.8, lam=0.3)
    resumed.load_state_dict(
        {
            "tensors": load_file(tmp_path / "plugin.safetensors"),
            "meta": json.loads((tmp_path / "plugin.json").read_text()),
        }
    )
    resumed.before_stage(ctx)
    resumed.after_stage(ctx)
    for name, value in lora_state(model).items():
        assert torch.equal(value, expected[name]), name
    assert resumed.reports == original.reports
    assert all(torch.equal(torch.stack(resumed.history[k]), torch.stack(v)) for k, v in original.history.items())
    assert not any(k.startswith("w0/") for k in resumed.state_dict()["tensors"])  # W0 is gone after the stage
    with pytest.raises(ValueError, match="granularity"):
        SLMCPlugin(granularity="product").load_state_dict(original.state_dict())


def _factors(model) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": A, "<module>.lora_B": B}``, the keys of the plugin's history."""
    out = {}
    for module, (a, b) in lora_modules(model).items():
        out[f"{module}.lora_A"], out[f"{module}.lora_B"] = a.detach().clone(), b.detach().clone()
    return out


def test_sft_and_preference_stages_share_one_history_in_stage_order(tiny_lora_model):
    """``stages: [sft, pref]`` over two tasks: every matrix's history is [SFT_0, RL_0, SFT_1, RL_1] (METHODS.md §1.3).

    Oracle (float64 numpy, θ = 1 so nothing is truncated, λ = 0.5): the j-th entry is ``d_j − 0.5 P_j d_j`` with
    ``d_j`` the raw update of the j-th stage and ``P_j`` the orthogonal projection onto the span of entries 0..j−1
    (least squares), so RL_0 is damped along SFT_0 of the same task, SFT_1 along both, RL_1 along all three.
    """
    model, _ = tiny_lora_model
    plugin = SLMCPlugin(theta=1.0, lam=0.5, stages=["sft", "pref"])
    expected: dict[str, list[np.ndarray]] = {}
    for index, stage, seed in ((0, "sft", 11), (0, "pref", 12), (1, "sft", 13), (1, "pref", 14)):
        before = _factors(model)
        run_stage(plugin, model, index, seed=seed, stage=stage)
        trained = {k: v + 0 for k, v in before.items()}
        g = torch.Generator().manual_seed(seed)  # the update ``perturb`` drew: A then B per module, in order
        for module, (a, b) in lora_modules(model).items():
            trained[f"{module}.lora_A"] = before[f"{module}.lora_A"] + 0.1 * torch.randn(a.shape, generator=g)
            trained[f"{module}.lora_B"] = before[f"{module}.lora_B"] + 0.1 * torch.randn(b.shape, generator=g)
        for key in before:
            d = (trained[key] - before[key]).double().reshape(-1).numpy()
            rows = expected.setdefault(key, [])
            if rows:
                h = np.stack(rows, axis=1)
                p = h @ np.linalg.lstsq(h, d, rcond=None)[0]
                d = d - 0.5 * p
            rows.append(d)
    assert [(r["task_index"], r["stage"]) for r in plugin.reports] == [(0, "sft"), (0, "pref"), (1, "sft"), (1, "pref")]
    assert set(plugin.history) == set(expected)
    for key, rows in expected.items():
        assert len(plugin.history[key]) == 4
        for got, want in zip(plugin.history[key], rows):
            np.testing.assert_allclose(got.double().numpy(), want, atol=2e-5, rtol=0)
    first = next(iter(expected))
    assert [r["matrices"][first]["history_rank"] for r in plugin.reports] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("config", "stages", "sft"),
    [("paper-six-tasks.yaml", ("sft", "pref"), True), ("real-lifealign.yaml", ("pref",), False)],
)
def test_shipped_lifealign_configs_state_which_stages_slmc_consolidates(config, stages, sft):
    """The authors'-settings config runs the SFT stage and consolidates after it too (their code); the CPU config has
    no SFT stage and consolidates the preference stage only (the paper)."""
    from pathlib import Path

    from lifealign.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "lifealign" / config)
    (spec,) = [p for p in cfg.method.plugins if p.name == "slmc"]
    plugin = bind_plugin({"name": spec.name, **spec.kwargs}).build()
    assert plugin.stages == stages and cfg.sft.enabled is sft
