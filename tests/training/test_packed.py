"""Prefix-shared and packed batches give the concatenated forward's log-probs, token counts and LoRA gradients.

The oracle is ``batch_logps`` on ``collate_pairs`` rows (the path every caller used so far). fp32 values agree to
float rounding (attention over other lengths reorders its sums): ``atol 1e-5`` plus ``rtol 1e-6`` of a sequence
log-prob, which is a sum over up to a few hundred tokens (SmolLM2 on hh-rlhf: per-token differences up to 3e-5, 2
ulps of a -348 sum); LoRA gradients within 1e-5 of the gradient's norm and of its largest element.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from lifealign.config.schema import DataSection
from lifealign.data.collate import LAYOUTS, collate, collate_pairs
from lifealign.data.packing import pack_rows
from lifealign.data.records import PreferencePair
from lifealign.data.tokenize import tokenize_pairs
from lifealign.training.forward import batch_logps, compute_reference_logps
from lifealign.training.head import output_head
from lifealign.training.packed import SEGMENT_ATTENTION, SegmentPlan, segment_attention, segment_mask
from tests.helpers import perturb_lora_b

PAIR = ("chosen", "rejected")
SEGMENT_CASES = [("shared", None), ("packed", None), ("packed", 48)]
TASKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "preference-tasks"


@pytest.fixture
def model_and_tokenizer(tiny_lora_model, one_torch_thread):
    model, tokenizer = tiny_lora_model
    perturb_lora_b(model)  # a non-zero adapter: the LoRA path contributes to values and gradients
    return model, tokenizer


def ragged_examples(n: int = 5, seed: int = 1) -> list[dict]:
    """Ragged prompt and response lengths, a one-token response, and pair ids with dataset indices."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(5, 250, (k,), generator=g).tolist()

    out = [
        {
            "id": str(i),
            "index": i,
            "prompt_ids": ids(6 + 5 * i),
            "chosen_ids": ids(14 - 3 * i),
            "rejected_ids": ids(4 + 4 * i),
        }
        for i in range(n - 1)
    ]
    out.append({"id": "one", "index": n - 1, "prompt_ids": ids(3), "chosen_ids": ids(1), "rejected_ids": ids(2)})
    return out


def lora_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def logps_and_grads(model, batch, sides=PAIR):
    """Log-probs, token counts, and the LoRA gradient of a weighted sum of the log-probs (distinct weights per
    sequence, so a gradient routed to the wrong pair or side shows)."""
    model.zero_grad()
    out = batch_logps(model, batch)
    logps = torch.cat([out[f"{s}_logps"] for s in sides])
    tokens = torch.cat([out[f"{s}_tokens"] for s in sides])
    (logps * torch.linspace(0.5, 2.0, logps.numel())).sum().backward()
    return logps.detach(), tokens, lora_grads(model)


def assert_same_as_concat(model, examples, pad_id, sides=PAIR, cases=SEGMENT_CASES):
    want, want_tokens, want_grads = logps_and_grads(model, collate_pairs(examples, pad_id, sides=sides), sides)
    for layout, pack_tokens in cases:
        batch = collate(examples, pad_id, sides=sides, layout=layout, pack_tokens=pack_tokens)
        got, tokens, grads = logps_and_grads(model, batch, sides)
        case = f"{layout} pack_tokens={pack_tokens}"
        assert torch.equal(tokens, want_tokens), case
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (case, (got - want).abs().max().item())
        # gradients compared at their own scale: an element near 0 carries the absolute rounding of the large ones
        diff = grads - want_grads
        rel_norm, rel_max = (diff.norm() / want_grads.norm()).item(), (diff.abs().max() / want_grads.abs().max()).item()
        assert rel_norm < 1e-5 and rel_max < 1e-5, (case, rel_norm, rel_max)
    assert not output_head(model)._forward_pre_hooks  # the selection hook is removed after every call


# ----- the mask and the packing ------------------------------------------------------------------------------------
def test_mask_keeps_sides_apart_and_pairs_apart():
    """Row: pair 1 = prompt [p p] chosen [c] rejected [r r], pair 2 = prompt [q] chosen [d], then one pad.
    A rejected token sees the prompt and earlier rejected tokens, never the chosen one; pair 2 sees only itself;
    the pad sees only itself (no empty mask row)."""
    segment = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 0]])
    branch = torch.tensor([[0, 0, 1, 2, 2, 0, 1, 0]])
    mask = segment_mask(segment, branch)[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ]


def test_a_segment_runs_the_same_sdpa_kernel_as_a_plain_causal_row():
    """Two segments of one row, each a prompt + one response: each is exactly (bit for bit) the causal SDPA of its
    own slice. The segments go through SDPA as 4-D ``(1, H, n, d)`` tensors like transformers' own call (3-D ones
    would take the unfused math path, which rounds differently), with GQA's 9 query heads on 3 key heads as in
    SmolLM2."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 150, 64, generator=gen) for h in (9, 3, 3))
    module = torch.nn.Module()
    plan = SegmentPlan(rows=[[(0, 40, (60,)), (100, 20, (30,))]])
    out, _ = segment_attention(module, q, k, v, None, scaling=0.125, pair_segments=plan)

    def plain(a: int, b: int) -> torch.Tensor:
        sl = slice(a, b)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, scale=0.125, enable_gqa=True
        )
        return ref.transpose(1, 2)

    assert out.shape == (1, 150, 9, 64) and plan.calls == 1
    assert torch.equal(out[:, :100], plain(0, 100))
    assert torch.equal(out[:, 100:150], plain(100, 150))


def test_pack_rows_balances_rows_within_budget():
    """Lengths 5, 3, 4, 2, 7 (21 tokens), budget 8: three rows; longest first into the least-filled row with room:
    7 -> A, 5 -> B, 4 -> C, 3 -> C (4 < 5; 7 <= 8), 2 -> B (5 < 7): A = {4}, B = {0, 3}, C = {1, 2}."""
    assert pack_rows([5, 3, 4, 2, 7], 8) == [[0, 3], [1, 2], [4]]
    assert pack_rows([5, 3, 4], None) == [[0, 1, 2]]
    assert pack_rows([9, 1], 4) == [[0], [1]]  # a segment over the budget gets a row of its own
    with pytest.raises(ValueError, match="positive"):
        pack_rows([1], 0)


def test_collate_rejects_an_unknown_layout():
    assert LAYOUTS == ("concat", "shared", "packed")
    with pytest.raises(ValueError, match="unknown batch layout"):
        collate(ragged_examples(), 0, layout="nested")


# ----- equality with the concatenated forward ------------------------------------------------------------------------
def test_ragged_pairs_match_concat_values_and_gradients(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert_same_as_concat(model, ragged_examples(), tokenizer.pad_token_id)


@pytest.mark.parametrize("sides", [("chosen",), ("rejected",)])
def test_single_side_batches_are_plain_rows_and_match(model_and_tokenizer, sides):
    """SFT (chosen only) and unlearning (rejected only): one ``prompt | response`` segment per pair."""
    model, tokenizer = model_and_tokenizer
    examples = ragged_examples()
    batch = collate(examples, tokenizer.pad_token_id, sides=sides, layout="shared")
    assert (batch["branch_ids"] <= 1).all() and batch["input_ids"].shape[0] == len(examples)
    assert_same_as_concat(model, examples, tokenizer.pad_token_id, sides=sides)


def test_empty_prompt_does_not_score_the_first_response_token(model_and_tokenizer):
    """As in the concatenated row, a response token at position 0 has no predicting position."""
    model, tokenizer = model_and_tokenizer
    examples = ragged_examples(3) + [{"id": "np", "prompt_ids": [], "chosen_ids": [40, 41, 42], "rejected_ids": [43]}]
    assert_same_as_concat(model, examples, tokenizer.pad_token_id)
    out = batch_logps(model, collate(examples, tokenizer.pad_token_id, layout="shared"))
    assert out["chosen_tokens"][-1].item() == 2 and out["rejected_tokens"][-1].item() == 0


def test_chat_template_and_truncated_prompts_match(model_and_tokenizer):
    """Tokenised through the chat template (string and message prompts), with prompts cut to their last 24 tokens."""
    model, tokenizer = model_and_tokenizer
    records = [
        PreferencePair("What is 2 + 2? Answer briefly, then explain.", "4, because 2 + 2 = 4.", "5."),
        PreferencePair(
            [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one, please."},
            ],
            "Green.",
            "I will not.",
        ),
        PreferencePair("Say yes.", "yes", "no", id="short"),
    ]
    data = DataSection(max_length=64, max_prompt_length=24, use_chat_template=True)
    ts = tokenize_pairs(records, tokenizer, data)
    assert ts.stats["prompt_truncated"] >= 2 and len(ts.examples) == 3
    assert_same_as_concat(model, ts.examples, tokenizer.pad_token_id)


def test_real_pairs_match(model_and_tokenizer):
    """A few pairs of every preference task in ../shared/data (byte-level tokenizer, so lengths are in bytes)."""
    if not TASKS.is_dir():
        pytest.skip(f"{TASKS} is absent")
    model, tokenizer = model_and_tokenizer
    records = []
    for path in sorted(TASKS.glob("*/train.json")):
        for i, obj in enumerate(json.loads(path.read_text())[:2]):
            records.append(PreferencePair(obj["query"], obj["chosen"], obj["rejected"], id=f"{path.parent.name}:{i}"))
    if not records:
        pytest.skip(f"no train.json under {TASKS}")
    ts = tokenize_pairs(records, tokenizer, DataSection(max_length=160, max_prompt_length=96))
    assert_same_as_concat(model, ts.examples, tokenizer.pad_token_id, cases=[("shared", None), ("packed", 256)])


def test_full_logits_fallback_when_the_head_is_not_a_module(model_and_tokenizer, monkeypatch):
    """A model whose head the pre-hook cannot reach gives the same values through its full logits."""
    import lifealign.training.head as head

    model, tokenizer = model_and_tokenizer
    batch = collate(ragged_examples(), tokenizer.pad_token_id, layout="packed")
    with torch.no_grad():
        want = batch_logps(model, batch)
        monkeypatch.setattr(head, "output_head", lambda _model: None)
        got = batch_logps(model, batch)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_eager_attention_takes_the_additive_mask(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.config._attn_implementation = "eager"
    try:
        assert_same_as_concat(model, ragged_examples(), tokenizer.pad_token_id, cases=[("packed", None)])
    finally:
        model.config._attn_implementation = "sdpa"


def test_bf16_autocast_within_the_concat_tolerance(model_and_tokenizer):
    """Under bf16 autocast both paths round activations; they stay within 2e-2 nats per token of each other and of
    fp32 (tests/training/test_forward.py's bound)."""
    model, tokenizer = model_and_tokenizer
    examples = ragged_examples()
    with torch.no_grad():
        fp32 = batch_logps(model, collate_pairs(examples, tokenizer.pad_token_id))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            concat = batch_logps(model, collate_pairs(examples, tokenizer.pad_token_id))
            packed = batch_logps(model, collate(examples, tokenizer.pad_token_id, layout="packed"))
    for side in PAIR:
        assert packed[f"{side}_logps"].dtype == torch.float32
        n = fp32[f"{side}_tokens"]
        assert ((packed[f"{side}_logps"] - concat[f"{side}_logps"]).abs() / n).max() < 2e-2
        assert ((packed[f"{side}_logps"] - fp32[f"{side}_logps"]).abs() / n).max() < 2e-2


def test_reference_logps_through_the_same_entry_point(model_and_tokenizer):
    """``compute_reference_logps(..., layout=...)`` fills the same (n, sides) table, in dataset-index order."""
    from lifealign.models.lora import reference_context

    model, tokenizer = model_and_tokenizer
    examples = ragged_examples()
    ref = lambda: reference_context(model)  # noqa: E731
    was_training = model.train().training
    want = compute_reference_logps(model, examples, tokenizer.pad_token_id, PAIR, ref, batch_size=2)
    for layout in ("shared", "packed"):
        got = compute_reference_logps(
            model, examples, tokenizer.pad_token_id, PAIR, ref, batch_size=3, layout=layout, pack_tokens=64
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert model.training == was_training


def test_unsupported_attention_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="use layout 'concat'"):
            batch_logps(model, collate(ragged_examples(), tokenizer.pad_token_id, layout="shared"))
    finally:
        model.config._attn_implementation = "sdpa"


def test_a_model_that_bypasses_segment_attention_is_refused(model_and_tokenizer, monkeypatch):
    """If the layers never call ``segment_attention`` (here: the registry entry is plain SDPA, which ignores the
    plan), the forward ran with plain causal attention over whole rows: refused, and the implementation restored."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, tokenizer = model_and_tokenizer
    monkeypatch.setitem(AttentionInterface._global_mapping, SEGMENT_ATTENTION, sdpa_attention_forward)
    with pytest.raises(ValueError, match="never dispatched"):
        batch_logps(model, collate(ragged_examples(), tokenizer.pad_token_id, layout="packed"))
    assert model.config._attn_implementation == "sdpa"


def test_sliding_window_shorter_than_a_segment_is_refused(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(model.config, "sliding_window", 16, raising=False)
    with pytest.raises(ValueError, match="sliding window"):
        batch_logps(model, collate(ragged_examples(), tokenizer.pad_token_id, layout="shared"))


def test_a_decoder_hook_that_rewrites_the_inputs_is_refused(model_and_tokenizer):
    """L2P-style: a pre-hook on the decoder that swaps the mask for a 2-D one cannot see the segment mask."""
    model, tokenizer = model_and_tokenizer
    decoder = model.get_base_model().model

    def rewrite(_module, args, kwargs):
        ids = kwargs["input_ids"]
        return args, {**kwargs, "attention_mask": torch.ones(ids.shape, dtype=torch.long)}

    handle = decoder.register_forward_pre_hook(rewrite, with_kwargs=True)
    try:
        with pytest.raises(ValueError, match="layout 'concat'"):
            batch_logps(model, collate(ragged_examples(), tokenizer.pad_token_id, layout="packed"))
    finally:
        handle.remove()
    assert not decoder._forward_pre_hooks


# ----- two processes ----------------------------------------------------------------------------------------------
def seeded_lora_model():
    """The tiny model with a seeded LoRA adapter (peft draws ``lora_A`` from the global generator)."""
    from lifealign.config.schema import LoraSection
    from lifealign.models.lora import attach_lora
    from lifealign.models.tiny import tiny_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    model = attach_lora(model, LoraSection())
    perturb_lora_b(model)
    return model, tokenizer


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    """Each rank: its half of the pairs through DDP in each segment layout; the all-reduced LoRA gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, tokenizer = seeded_lora_model()
        ddp = DistributedDataParallel(model)
        examples = ragged_examples(6)[rank::world]
        for layout in ("shared", "packed"):
            model.zero_grad()
            out = batch_logps(ddp, collate(examples, tokenizer.pad_token_id, layout=layout, pack_tokens=64))
            loss = (out["chosen_logps"] - 0.5 * out["rejected_logps"]).sum() / len(examples)
            loss.backward()  # DDP averages the gradient over the ranks
            results[(layout, rank)] = (lora_grads(model), out["chosen_logps"].detach(), out["rejected_logps"].detach())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters importing torch + transformers + peft: 15-40 s on the 2-core box
def test_two_processes_give_the_single_process_concat_gradient(one_torch_thread):
    """Two gloo ranks with a shared / packed layout: the averaged gradient and each rank's log-probs equal one
    process's concatenated forward over all pairs."""
    import torch.multiprocessing as mp

    model, tokenizer = seeded_lora_model()
    examples = ragged_examples(6)
    model.zero_grad()
    out = batch_logps(model, collate_pairs(examples, tokenizer.pad_token_id))
    (out["chosen_logps"] - 0.5 * out["rejected_logps"]).sum().div(3).backward()  # 3 pairs per rank
    want = lora_grads(model) / 2  # the mean over the ranks of per-rank sums over 3 pairs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
        got = dict(results)
    for layout in ("shared", "packed"):
        for rank in (0, 1):
            grads, chosen, rejected = got[(layout, rank)]
            assert torch.allclose(grads, want, atol=1e-6, rtol=1e-4), (layout, rank)
            assert torch.allclose(chosen, out["chosen_logps"][rank::2].detach(), atol=1e-5, rtol=1e-6)
            assert torch.allclose(rejected, out["rejected_logps"][rank::2].detach(), atol=1e-5, rtol=1e-6)


# ----- the bundled model ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_on_real_pairs_matches_concat(one_torch_thread):
    """SmolLM2-135M-Instruct + LoRA on 3 pairs of each real task (its own tokenizer and chat template)."""
    if not TASKS.is_dir():
        pytest.skip(f"{TASKS} is absent")
    from lifealign.config.schema import LoraSection, ModelSection
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora

    model, tokenizer = load_model_and_tokenizer(ModelSection(name_or_path="smollm2-135m-instruct"))
    model = attach_lora(model, LoraSection(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    perturb_lora_b(model, std=0.02)
    model.train()
    for path in sorted(TASKS.glob("*/train.json")):
        objs = json.loads(path.read_text())[:3]
        records = [PreferencePair(o["query"], o["chosen"], o["rejected"], id=str(i)) for i, o in enumerate(objs)]
        ts = tokenize_pairs(records, tokenizer, DataSection(max_length=256, max_prompt_length=128))
        assert_same_as_concat(model, ts.examples, tokenizer.pad_token_id, cases=[("shared", None), ("packed", None)])
