"""How far fp32 summed log-probs are from fp64 ones, per layout: the noise floor for ``max_abs_logp_diff``.

``bench/train_step.py`` compares the packed and shared layouts with the concatenated one in fp32 and reports the
largest absolute difference of a sequence's summed log-prob. Two fp32 forwards that differ only in matmul shapes
(a packed row vs padded rows) round differently, so that difference has a floor set by fp32 itself. This script
measures it: the same batches in fp64 (the reference) and in fp32 in each layout, on real pairs of a task; then,
per token, where the fp32 error comes from: the 30-layer body (fp32 hidden states through an fp64 head) or the LM
head and log-softmax (fp64 hidden states through an fp32 head).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/logp_noise_floor.py --data safe-rlhf --batches 5
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    import train_step
    from lifealign.config.schema import LoraSection, ModelSection
    from lifealign.data.collate import collate
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="safe-rlhf")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "preference-tasks"))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, tok = load_model_and_tokenizer(ModelSection(name_or_path="smollm2-135m-instruct"))
    torch.manual_seed(args.seed)  # lora_A is drawn by peft from the global generator
    model = attach_lora(model, LoraSection(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    model.eval()
    data = train_step.make_real_data(tok, args, 4 * args.batches)
    pad = tok.pad_token_id
    worst = {"concat": 0.0, "packed": 0.0, "packed_vs_concat": 0.0}
    largest = 0.0
    layouts: list[torch.Tensor] = []  # per token, fp32 packed - fp32 concat (the scored tokens share one grid)
    with per_token_logps() as logps:
        for b in range(args.batches):
            examples = data.examples[4 * b : 4 * b + 4]
            with torch.no_grad():
                model.double()
                exact, _ = logps(model, collate(examples, pad))
                model.float()
                got = {layout: logps(model, collate(examples, pad, layout=layout)) for layout in ("concat", "packed")}
            layouts.append(got["packed"][1] - got["concat"][1])
            for side in ("chosen_logps", "rejected_logps"):
                largest = max(largest, exact[side].abs().max().item())
                for layout in ("concat", "packed"):
                    diff = (got[layout][0][side].double() - exact[side]).abs().max().item()
                    worst[layout] = max(worst[layout], diff)
                pc = (got["packed"][0][side] - got["concat"][0][side]).abs().max().item()
                worst["packed_vs_concat"] = max(worst["packed_vs_concat"], pc)
    print(f"{args.data}: {4 * args.batches} pairs, largest |summed log-prob| {largest:.1f}")
    print(f"max |fp32 concat - fp64|: {worst['concat']:.2e}")
    print(f"max |fp32 packed - fp64|: {worst['packed']:.2e}")
    print(f"max |fp32 packed - fp32 concat| (the bench's max_abs_logp_diff): {worst['packed_vs_concat']:.2e}")
    per_token_errors(model, data.examples[: 4 * args.batches], pad)
    d = torch.cat(layouts)
    print(
        f"per token, fp32 packed - fp32 concat ({d.numel()} tokens): mean |diff| {d.abs().mean():.2e}, max {d.abs().max():.2e}"
    )
    return 0


@contextlib.contextmanager
def per_token_logps() -> Iterator[Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]]:
    """``batch_logps`` that also returns the per-token log-probs it sums (fp64 copy, in the scored grid's order)."""
    import lifealign.training.head as head_module
    from lifealign.training.forward import batch_logps

    captured: list[torch.Tensor] = []
    sum_scored = head_module.sum_scored

    def spy(per_token: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        captured.append(per_token.detach().double())
        return sum_scored(per_token, scored)

    def logps(model: torch.nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        captured.clear()
        out = batch_logps(model, batch)
        return out, captured[0]  # the first sum is the log-probs' (a second one may sum logits)

    head_module.sum_scored = spy
    try:
        yield logps
    finally:
        head_module.sum_scored = sum_scored


def per_token_errors(model: torch.nn.Module, examples: list[dict], pad: int) -> None:
    """Per-token log-prob errors against fp64 (padded rows through the decoder, then the head by hand): fp32
    throughout, fp32 body + fp64 head, fp64 body + fp32 head."""
    from lifealign.data.collate import collate
    from lifealign.losses.logps import label_logps

    decoder, weight = model.get_decoder(), model.get_output_embeddings().weight.detach()

    def token_logps(hidden: torch.Tensor, dtype: torch.dtype, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return label_logps(hidden[:, :-1][keep].to(dtype) @ weight.to(dtype).T, ids[:, 1:][keep]).double()

    errors: dict[str, list[torch.Tensor]] = {"fp32": [], "fp32 body, fp64 head": [], "fp64 body, fp32 head": []}
    for b in range(0, len(examples), 4):
        batch = collate(examples[b : b + 4], pad)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = mask[:, 1:].bool()
        with torch.no_grad():
            model.double()
            h64 = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            model.float()
            h32 = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            exact = token_logps(h64, torch.float64, ids, keep)
            errors["fp32"].append(token_logps(h32, torch.float32, ids, keep) - exact)
            errors["fp32 body, fp64 head"].append(token_logps(h32.double(), torch.float64, ids, keep) - exact)
            errors["fp64 body, fp32 head"].append(token_logps(h64.float(), torch.float32, ids, keep) - exact)
    for name, parts in errors.items():
        d = torch.cat(parts)
        print(
            f"per token, {name} - fp64: mean |err| {d.abs().mean():.2e}, max {d.abs().max():.2e}, mean {d.mean():+.1e}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
