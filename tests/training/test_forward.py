"""batch_logps: the LM head on scored positions only gives the full-logits values and gradients; bf16 vs fp32."""

import pytest
import torch

from lifealign.config import config_from_dict
from lifealign.data.collate import collate_pairs
from lifealign.engine.experiment import load_base_with_adapter
from lifealign.losses.logps import sequence_logps
from lifealign.training.forward import batch_logps, output_head


@pytest.fixture(scope="module")
def model_and_batch():
    cfg = config_from_dict(
        {"model": {"name_or_path": "tiny"}, "tasks": [{"name": "t", "train": "synthetic:arithmetic"}]}
    )
    model, tokenizer = load_base_with_adapter(cfg)
    with torch.no_grad():  # a non-zero adapter, so the LoRA path contributes to values and gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(5, 250, (n,), generator=g).tolist()  # noqa: E731
    # different prompt and response lengths: right padding, and scored positions that differ per row
    examples = [
        {"id": str(i), "prompt_ids": ids(6 + 5 * i), "chosen_ids": ids(14 - 3 * i), "rejected_ids": ids(4 + 4 * i)}
        for i in range(4)
    ]
    return model, collate_pairs(examples, tokenizer.pad_token_id)


def lora_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_scored_head_matches_full_logits_values_and_gradients(model_and_batch):
    model, batch = model_and_batch
    model.zero_grad()
    out = batch_logps(model, batch)
    ours = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    (ours * torch.arange(1.0, 9.0)).sum().backward()
    grads = lora_grads(model)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full, n_tokens = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    (full * torch.arange(1.0, 9.0)).sum().backward()
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grads, lora_grads(model), atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.cat([out["chosen_tokens"], out["rejected_tokens"]]), n_tokens)
    assert not output_head(model)._forward_pre_hooks  # the selection hook is removed after the call


def test_bf16_autocast_sequence_logps_match_fp32(model_and_batch):
    """Tolerance 2e-2 nats per response token: the bf16 forward rounds activations (the log-softmax stays fp32)."""
    model, batch = model_and_batch
    with torch.no_grad():
        fp32 = batch_logps(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = batch_logps(model, batch)
    for side in ("chosen", "rejected"):
        assert bf16[f"{side}_logps"].dtype == torch.float32
        gap = (bf16[f"{side}_logps"] - fp32[f"{side}_logps"]).abs() / fp32[f"{side}_tokens"]
        assert 0 < gap.max().item() < 2e-2, gap


def test_mean_logits_per_side_are_trls_logits_metrics_in_every_layout(model_and_batch):
    """trl's ``logits/chosen``: the mean of the logits over the vocabulary and every chosen response token of the
    batch (``logits[chosen rows][loss mask].mean()``); ours is ``Σ logits_sum / Σ tokens``, in each layout."""
    from lifealign.data.collate import collate

    model, batch = model_and_batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicting = batch["completion_mask"][:, 1:].bool()  # position t-1 predicts response token t
    b = batch["n_pairs"]
    expected = {
        side: logits[k * b : (k + 1) * b, :-1][predicting[k * b : (k + 1) * b]].mean().item()
        for k, side in enumerate(("chosen", "rejected"))
    }
    examples = [
        {"id": i, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for i, (p, c, r) in enumerate(zip(*_unpad(batch), strict=True))
    ]
    for layout in ("concat", "shared", "packed"):
        with torch.no_grad():
            out = batch_logps(model, collate(examples, 0, layout=layout))
        for side in ("chosen", "rejected"):
            got = (out[f"{side}_logits_sum"].sum() / out[f"{side}_tokens"].sum()).item()
            assert got == pytest.approx(expected[side], abs=1e-5), (layout, side)


def _unpad(batch):
    """Prompt, chosen and rejected ids of every pair of a concat batch (from its masks)."""
    b, prompts, chosen, rejected = batch["n_pairs"], [], [], []
    for i in range(b):
        for k, bucket in ((0, chosen), (1, rejected)):
            row = batch["input_ids"][k * b + i]
            response = batch["completion_mask"][k * b + i].bool()
            bucket.append(row[response].tolist())
            if k == 0:
                prompt = batch["attention_mask"][i].bool() & ~response
                prompts.append(row[prompt].tolist())
    return prompts, chosen, rejected
