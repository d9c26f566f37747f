"""KL to the reference (the drift diagnostic) on real pairs: the LM head on response positions only vs every position.

``lifealign.evaluation.drift.kl_rows`` as shipped runs both policies' LM heads on the positions that predict a
response token (``scored_logits``) and normalises only those rows. The reference here is the previous computation,
kept in this script: full ``(N, T, V)`` logits of both policies, then the same per-row KL on the response positions.
SmolLM2-135M-Instruct + a seeded LoRA (r 8, q_proj/v_proj, random ``lora_B``), fp32, eval batch ``--batch-size``,
``--pairs`` held-out pairs of ``--data`` at ``data.max_length: --max-length``. The two alternate ``--rounds`` times in
one process; prints seconds per pair of each (median and range), their ratio, the peak extra memory of the logits
(``(N, T, V)`` vs ``(M, V)`` fp32, from the shapes), and the largest difference of the per-pair KL.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/drift_kl.py --data hh-rlhf-helpful-base --pairs 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def full_logits_kl(ctx: Any, examples: list[dict[str, Any]]) -> tuple[list[float], int]:
    """The reference: full logits of both policies, KL on the response positions; ``(per-pair KL sums, the largest
    logits tensor's elements)``."""
    from lifealign.data.collate import collate_pairs
    from lifealign.evaluation.drift import token_kl

    sums, largest = [], 0
    with torch.no_grad():
        for start in range(0, len(examples), ctx.eval.batch_size):
            batch = collate_pairs(
                examples[start : start + ctx.eval.batch_size], ctx.tokenizer.pad_token_id, ("chosen",)
            )
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            policy = ctx.model(**inputs, use_cache=False).logits
            with ctx.reference_policy():
                ref = ctx.model(**inputs, use_cache=False).logits
            largest = max(largest, policy.numel())
            sums += token_kl(policy, ref, batch["completion_mask"])[0].tolist()
    return sums, largest


def main() -> int:
    import train_step
    from _common import machine_report
    from lifealign.config.schema import DataSection, EvalSection, LoraSection, ModelSection
    from lifealign.evaluation.drift import kl_rows
    from lifealign.evaluation.scorers.base import EvalContext
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="hh-rlhf-helpful-base")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "preference-tasks"))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, tok = load_model_and_tokenizer(ModelSection(name_or_path="smollm2-135m-instruct"))
    torch.manual_seed(args.seed)
    model = attach_lora(model, LoraSection(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    model.eval()
    examples = train_step.make_real_data(tok, args, args.pairs).examples
    data = DataSection(max_length=args.max_length, max_prompt_length=min(256, args.max_length // 2))
    ctx = EvalContext(model=model, tokenizer=tok, data=data, eval=EvalSection(batch_size=args.batch_size))
    print(machine_report())
    tokens = sum(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) for ex in examples)
    scored = sum(len(ex["chosen_ids"]) for ex in examples)
    print(
        f"{args.data}: {len(examples)} pairs, {tokens} tokens, {scored} chosen-response tokens ({scored / tokens:.0%})"
    )

    kl_rows(ctx, examples[: args.batch_size])  # warm-up
    times: dict[str, list[float]] = {"scored": [], "full": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        ours = kl_rows(ctx, examples)
        times["scored"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference, largest = full_logits_kl(ctx, examples)
        times["full"].append(time.perf_counter() - start)
    diff = max(abs(a - b) for (a, _), b in zip(ours, reference, strict=True))
    for name, ts in times.items():
        per_pair = [t / len(examples) for t in ts]
        print(
            f"{name}: {statistics.median(per_pair):.3f} s per pair (min {min(per_pair):.3f}, max {max(per_pair):.3f})"
        )
    ratios = [f / s for f, s in zip(times["full"], times["scored"], strict=True)]
    print(f"speedup_scored_head: {statistics.median(ratios):.2f} (rounds: {[round(r, 2) for r in ratios]})")
    print(
        f"full logits: up to {largest * 4 / 2**20:.0f} MiB fp32 per policy per batch; scored rows only: at most "
        f"{max(len(ex['chosen_ids']) for ex in examples) * args.batch_size * model.config.vocab_size * 4 / 2**20:.0f} MiB"
    )
    print(f"max |per-pair KL sum, scored - full|: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
