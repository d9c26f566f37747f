"""Packed impact scores: ragged candidates share rows (own positions, own attention) and every score still equals the
one-backward-per-example oracle; the packing itself, the packed log-probs and the padded fallback."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from lifealign.config.schema import DataSection
from lifealign.config.unlearn import UnlearnSection
from lifealign.data.collate import collate_pairs
from lifealign.data.packing import pack_rows
from lifealign.data.records import PreferencePair
from lifealign.data.synthetic import make_synthetic_task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.models.lora import reference_context
from lifealign.training.forward import batch_logps, compute_reference_logps
from lifealign.unlearning.influence import fast_scores, naive_scores, preference_gradient
from lifealign.unlearning.objectives import forget_loss
from lifealign.unlearning.packed import (
    SEGMENT_ATTENTION,
    pack_examples,
    packed_logps,
    packing_unsupported,
)

PAIR = ("chosen", "rejected")
FORGET = ("rejected",)
SAFE_RLHF = Path(__file__).resolve().parents[3] / "shared" / "data" / "preference-tasks" / "safe-rlhf" / "train.json"


def _rel_diff(fast: torch.Tensor, naive: torch.Tensor) -> float:
    return float((fast - naive).abs().max() / naive.abs().max())


def _indexed(examples: list[dict]) -> list[dict]:
    return [dict(ex, index=i) for i, ex in enumerate(examples)]


@pytest.fixture
def ragged(lora_factory, tokenize):
    """Tiny LoRA model, 6 preference pairs, and forget candidates of 4 to 96 tokens: a one-token response, a
    truncated prompt, short and long ones (in one pack for any budget >= 100 tokens)."""
    model, tok = lora_factory()
    task = make_synthetic_task("safety", n_train=10, n_test=1)
    pa = _indexed(tokenize(task.train[:6], tok))
    base = tokenize(task.train[6:] + make_synthetic_task("arithmetic", n_train=3, n_test=1).train, tok, FORGET)
    long_prompt = PreferencePair("why? " * 40, "No.", "Sure, here is exactly how: " * 6, id="long")
    truncated = tokenize([long_prompt], tok, FORGET)
    assert (
        len(truncated[0]["prompt_ids"]) == 48 and len(truncated[0]["prompt_ids"] + truncated[0]["rejected_ids"]) == 96
    )
    one_token = dict(base[0], rejected_ids=base[0]["rejected_ids"][:1])
    tiny = {"id": "tiny", "prompt_ids": base[1]["prompt_ids"][-3:], "rejected_ids": base[1]["rejected_ids"][:1]}
    cands = _indexed([one_token, *base[:3], truncated[0], tiny, *base[3:]])
    ref = lambda: reference_context(model)  # noqa: E731
    pref_ref = compute_reference_logps(model, pa, tok.pad_token_id, PAIR, ref)
    cand_ref = compute_reference_logps(model, cands, tok.pad_token_id, FORGET, ref)
    _, grad_j = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3)
    return model, tok, cands, cand_ref, grad_j


def test_pack_rows_places_every_index_once_within_the_budget():
    """The one packer of batch rows (``data.packing``), as U2A's scorer uses it."""
    lengths = [5, 1, 9, 3, 20, 7, 2, 8]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [4] in rows  # longer than the budget: a row alone
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows if row != [4])
    assert len(rows) == 6  # 55 tokens: 5 full-ish rows of <= 10 plus the 20
    assert all(row == sorted(row) for row in rows)
    assert pack_rows([], 4) == []
    assert pack_rows([3, 3, 3, 3], 6) == [[0, 2], [1, 3]]  # balanced: least-filled row first


def test_pack_examples_positions_labels_and_scored_positions():
    """Segments [7 | 8 9] and [4 5 | 6]: positions restart; position p predicts token p + 1 of its own segment."""
    row = pack_examples([{"prompt_ids": [7], "rejected_ids": [8, 9]}, {"prompt_ids": [4, 5], "rejected_ids": [6]}])
    assert row.input_ids.tolist() == [[7, 8, 9, 4, 5, 6]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert row.segment.tolist() == [0, 0, 0, 1, 1, 1]
    assert row.scored.tolist() == [0, 1, 4]  # never the last token of a segment predicting the next segment
    assert row.labels.tolist() == [8, 9, 6]
    assert row.n_tokens.tolist() == [2, 1]
    assert row.lengths == [3, 3]


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_packed_logps_equal_each_candidate_alone(ragged, attention):
    """The packed row's per-segment log-probs and token counts equal ``batch_logps`` of each candidate alone; the
    model's attention implementation is restored after."""
    model, tok, cands, _, _ = ragged
    row = pack_examples(cands)
    logps, n_tokens = packed_logps(model.eval(), row, attention)
    alone = [batch_logps(model, collate_pairs([c], tok.pad_token_id, sides=FORGET)) for c in cands]
    assert torch.allclose(logps, torch.cat([a["rejected_logps"] for a in alone]), rtol=1e-5, atol=1e-4)
    assert n_tokens.tolist() == [len(c["rejected_ids"]) for c in cands]
    assert model.config._attn_implementation == "sdpa"
    assert len(set(row.lengths)) > 5 and min(row.lengths) < 10 and max(row.lengths) == 96


@pytest.mark.parametrize(
    ("objective", "attention", "budget"),
    [("npo", "segments", None), ("ga", "segments", 100), ("simnpo", "mask", 150), ("grad_diff", "segments", 40)],
)
def test_packed_scores_equal_naive_on_ragged_candidates(ragged, objective, attention, budget):
    """max|packed - naive| / max|naive| <= 1e-4 (fp32) with one-token responses, a truncated prompt and lengths 4..96
    in one row; budgets from one candidate per row to all of them in one."""
    model, tok, cands, cand_ref, grad_j = ragged
    loss = forget_loss(UnlearnSection(objective=objective))
    ref = cand_ref if loss.needs_reference else None
    kw = dict(pad_id=tok.pad_token_id, ref_logps=ref)
    packed = fast_scores(model, cands, grad_j, loss, token_budget=budget, attention=attention, **kw)
    naive = naive_scores(model, cands, grad_j, loss, **kw)
    assert naive.abs().max() > 0
    assert _rel_diff(packed, naive) <= 1e-4
    assert _rel_diff(fast_scores(model, cands, grad_j, loss, packing=False, batch_size=4, **kw), naive) <= 1e-4


def test_a_model_that_cannot_be_packed_is_padded(ragged):
    """A pre-hook on the decoder (L2P's soft prompts) rules packing out: scores come from padded batches, equal."""
    model, tok, cands, _, grad_j = ragged
    loss = forget_loss(UnlearnSection(objective="ga"))
    handle = model.get_decoder().register_forward_pre_hook(lambda module, args: None)
    try:
        assert "pre-hook" in packing_unsupported(model)
        with pytest.raises(ValueError, match="pre-hook"):
            packed_logps(model, pack_examples(cands[:2]))
        scores = fast_scores(model, cands, grad_j, loss, pad_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert packing_unsupported(model) is None
    assert _rel_diff(scores, naive_scores(model, cands, grad_j, loss, pad_id=tok.pad_token_id)) <= 1e-4


def test_segment_attention_restores_the_implementation_on_error(ragged):
    model, _, cands, _, _ = ragged
    row = pack_examples(cands[:3])
    row.lengths = [1, 1, 1]  # inconsistent with the row: the attention function refuses it
    with pytest.raises(RuntimeError, match=SEGMENT_ATTENTION):
        packed_logps(model, row)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not SAFE_RLHF.is_file(), reason="../shared/data/preference-tasks/safe-rlhf is absent")
def test_packed_scores_equal_naive_on_real_safe_rlhf_negatives(lora_factory):
    """Seven real rejected responses (safe-rlhf), NPO, packed into rows of <= 1024 tokens: packed == naive. Byte
    tokens, so the config's 96/48 limits are scaled to 512/128: 64 to 512 tokens, one prompt and one response cut."""
    model, tok = lora_factory()
    records = json.loads(SAFE_RLHF.read_text())[:20]
    pairs = [PreferencePair(r["query"], r["chosen"], r["rejected"], id=str(i)) for i, r in enumerate(records)]
    data = DataSection(max_length=512, max_prompt_length=128)
    cands = _indexed(tokenize_pairs([pairs[i] for i in (0, 1, 5, 10, 11, 13, 19)], tok, data, sides=FORGET).examples)
    pa = _indexed(tokenize_pairs(pairs[2:5], tok, data).examples)
    lengths = [len(c["prompt_ids"]) + len(c["rejected_ids"]) for c in cands]
    assert len(set(lengths)) == 7 and min(lengths) < 100 and max(lengths) == 512
    ref = lambda: reference_context(model)  # noqa: E731
    cand_ref = compute_reference_logps(model, cands, tok.pad_token_id, FORGET, ref)
    pref_ref = compute_reference_logps(model, pa, tok.pad_token_id, PAIR, ref)
    _, grad_j = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3)
    loss = forget_loss(UnlearnSection(objective="npo"))
    kw = dict(pad_id=tok.pad_token_id, ref_logps=cand_ref)
    packed = fast_scores(model, cands, grad_j, loss, token_budget=1024, **kw)
    assert _rel_diff(packed, naive_scores(model, cands, grad_j, loss, **kw)) <= 1e-4


def _lora_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, list]]:
    """Every parameter's value and identity, and each LoRA layer's record of merged adapters."""
    from peft.tuners.lora import LoraLayer

    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    merged = {n: list(m.merged_adapters) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    return values, ids, merged


def test_scores_run_each_lora_layer_merged_and_leave_the_model_untouched(ragged, monkeypatch):
    """fp32 scores run ``W + s B A`` as one linear layer (the adapter's own modules are never called), equal the
    adapter path and the oracle, and leave every weight bit-identical and the same object, even after an error."""
    import lifealign.unlearning.influence as influence

    model, tok, cands, cand_ref, grad_j = ragged
    loss = forget_loss(UnlearnSection(objective="npo"))
    kw = dict(pad_id=tok.pad_token_id, ref_logps=cand_ref)
    before = _lora_state(model)
    assert any(p.abs().max() > 0 for n, p in before[0].items() if "lora_B" in n)  # W + s B A != W
    calls = []
    lora_a = next(iter(influence.lora_layers(model).values()))[0]
    handle = lora_a.register_forward_hook(lambda *args: calls.append(1))
    try:
        merged = {packing: fast_scores(model, cands, grad_j, loss, packing=packing, **kw) for packing in (True, False)}
        assert calls == []
        with monkeypatch.context() as patch:
            patch.setattr(influence, "_mergeable", lambda module, adapter: False)
            adapter = fast_scores(model, cands, grad_j, loss, **kw)
        assert calls  # the fallback runs the adapter's modules
    finally:
        handle.remove()
    naive = naive_scores(model, cands, grad_j, loss, **kw)
    for scores in (merged[True], merged[False], adapter):
        assert _rel_diff(scores, naive) <= 1e-4
    after = _lora_state(model)
    assert after[1] == before[1] and after[2] == before[2] and all(v == [] for v in after[2].values())
    assert all(torch.equal(after[0][n], before[0][n]) for n in before[0])

    boom = model.get_decoder().layers[-1].register_forward_hook(lambda *args: (_ for _ in ()).throw(OSError("boom")))
    try:
        with pytest.raises(OSError, match="boom"):
            fast_scores(model, cands, grad_j, loss, **kw)
    finally:
        boom.remove()
    after = _lora_state(model)
    assert after[1] == before[1] and after[2] == before[2]
    assert all(torch.equal(after[0][n], before[0][n]) for n in before[0])


@pytest.mark.parametrize("packing", [True, False])
def test_fused_scores_equal_naive_and_run_the_fused_kernels(ragged, monkeypatch, packing):
    """``fused=True`` scores through the compiled RMSNorm / SwiGLU / rotary kernels (on the merged fp32 path only)
    and still equal the oracle; the bf16 path stays eager."""
    import lifealign.unlearning.influence as influence

    model, tok, cands, cand_ref, grad_j = ragged
    loss = forget_loss(UnlearnSection(objective="npo"))
    kw = dict(pad_id=tok.pad_token_id, ref_logps=cand_ref, packing=packing)
    reports = []
    fused_elementwise = influence.fused_elementwise

    @contextlib.contextmanager
    def spy(m):
        with fused_elementwise(m) as report:
            reports.append(report)
            yield report

    monkeypatch.setattr(influence, "fused_elementwise", spy)
    fused = fast_scores(model, cands, grad_j, loss, fused=True, **kw)
    assert len(reports) == 1 and reports[0].rms_norm == 5 and reports[0].mlp == 2 and reports[0].rotary
    assert (
        _rel_diff(fused, naive_scores(model, cands, grad_j, loss, pad_id=tok.pad_token_id, ref_logps=cand_ref)) <= 1e-4
    )
    fast_scores(model, cands, grad_j, loss, fused=True, precision="bf16", **kw)
    assert len(reports) == 1  # bf16 scores are not merged, so not fused either
    assert not any("forward" in vars(m) for m in model.modules())
