"""How far fp32 summed log-probs are from fp64 ones, per layout: the noise floor for ``max_abs_logp_diff``.

``bench/train_step.py`` compares the packed and shared layouts with the concatenated one in fp32 and reports the
largest absolute difference of a sequence's summed log-prob. Two fp32 forwards that differ only in matmul shapes
(a packed row vs padded rows) round differently, so that difference has a floor set by fp32 itself. This script
measures it: the same batches in fp64 (the reference) and in fp32 in each layout, on real pairs of a task.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/logp_noise_floor.py --data safe-rlhf --batches 5
"""

from __future__ import annotations

import argparse
import sys
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
    from lifealign.training.forward import batch_logps

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="safe-rlhf")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "preference-tasks"))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, tok = load_model_and_tokenizer(ModelSection(name_or_path="smollm2-135m-instruct"))
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
    for b in range(args.batches):
        examples = data.examples[4 * b : 4 * b + 4]
        with torch.no_grad():
            model.double()
            exact = batch_logps(model, collate(examples, pad))
            model.float()
            got = {layout: batch_logps(model, collate(examples, pad, layout=layout)) for layout in ("concat", "packed")}
        for side in ("chosen_logps", "rejected_logps"):
            largest = max(largest, exact[side].abs().max().item())
            for layout in ("concat", "packed"):
                diff = (got[layout][side].double() - exact[side]).abs().max().item()
                worst[layout] = max(worst[layout], diff)
            pc = (got["packed"][side] - got["concat"][side]).abs().max().item()
            worst["packed_vs_concat"] = max(worst["packed_vs_concat"], pc)
    print(f"{args.data}: {4 * args.batches} pairs, largest |summed log-prob| {largest:.1f}")
    print(f"max |fp32 concat - fp64|: {worst['concat']:.2e}")
    print(f"max |fp32 packed - fp64|: {worst['packed']:.2e}")
    print(f"max |fp32 packed - fp32 concat| (the bench's max_abs_logp_diff): {worst['packed_vs_concat']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
