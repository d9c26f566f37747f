"""U2A impact scores: batched per-example inner products (``fast_scores``) vs one backward per example (naive).

SmolLM2-135M-Instruct + LoRA (r 8, q_proj/v_proj), 64 forget candidates of exactly 128 tokens (safe-rlhf rejected
responses from ``../shared/data/preference-tasks``; random tokens if the data is absent), NPO as the unlearning
loss, the direction = grad J of the DPO loss on 8 preference pairs. One run prints::

    max_rel_diff: max|fast - naive| / max|naive|
    fast / naive: seconds, GFLOP/s, fraction of the fp32 matmul peak (measured here with a large torch.mm)
    speedup_vs_naive: naive seconds / fast seconds

The two methods are timed in interleaved groups (each group: one batched fast pass, then the same examples one by
one, then a few peak matmuls), so a change in the machine's load hits both alike. The clock is the wall clock on
an idle machine with all cores (the acceptance setting); on a shared machine use ``--threads 1``, which times by the
process's CPU time instead (time spent computing, not waiting for a core). FLOPs are the model's matmuls only:
forward ``2 P T`` plus the input-gradient backward ``2 P T`` (the base is frozen, so no weight gradients), with P
the weights of every linear layer and T the tokens — the LM head counted on response tokens only, the only
positions both paths run it on.

    python bench/u2a_scoring.py                      # fp32, all cores, wall clock: the acceptance setting
    python bench/u2a_scoring.py --threads 1          # a shared machine: one thread, process CPU time
    python bench/u2a_scoring.py --precision bf16     # autocast bf16 for the fast path's forward/backward
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference-tasks" / "safe-rlhf" / "train.json"


def matmul_peak(clock: Any, n: int = 2048, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of ``n x n @ n x n`` over ``repeats`` (2 n^3 flops each), timed with ``clock``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        torch.mm(a, b)
        best = min(best, clock() - t0)
    return 2 * n**3 / best / 1e9


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``(fn(*args, **kwargs), process CPU seconds, wall seconds)``."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - c0, time.perf_counter() - w0


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """``(weights of every linear layer but the LM head (LoRA factors included), weights of the LM head)``."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def scoring_flops(body: int, head: int, examples: list[dict]) -> float:
    """Matmul FLOPs of one forward + input-gradient backward: ``4 (P_body T + P_head T_response)`` summed."""
    total = 0
    for ex in examples:
        tokens, response = len(ex["prompt_ids"]) + len(ex["rejected_ids"]), len(ex["rejected_ids"])
        total += 4 * (body * tokens + head * response)
    return float(total)


def build_examples(tokenizer, n: int, tokens: int, prompt_tokens: int) -> tuple[list[dict], list[dict]]:
    """``n`` forget examples of exactly ``tokens`` ids and 8 preference pairs, from safe-rlhf when available."""
    from lifealign.config.schema import DataSection
    from lifealign.data.records import PreferencePair
    from lifealign.data.tokenize import tokenize_pairs

    data = DataSection(max_length=tokens, max_prompt_length=prompt_tokens)
    if DATA.is_file():
        raw = json.loads(DATA.read_text())
        pairs = [
            PreferencePair(r["query"], r["chosen"], r["rejected"], id=str(i))
            for i, r in enumerate(raw)
            if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]
        ]
    else:
        gen = torch.Generator().manual_seed(0)
        words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud"]
        text = lambda k: " ".join(words[int(i)] for i in torch.randint(0, 8, (k,), generator=gen))  # noqa: E731
        pairs = [PreferencePair(text(20), text(150), text(150), id=str(i)) for i in range(4 * n)]
    forget = []
    for ex in tokenize_pairs(pairs[: 6 * n], tokenizer, data, sides=("rejected",)).examples:
        if len(ex["prompt_ids"]) + len(ex["rejected_ids"]) == tokens:
            forget.append(dict(ex, index=len(forget)))
        if len(forget) == n:
            break
    if len(forget) < n:
        raise SystemExit(f"only {len(forget)} examples reach {tokens} tokens")
    preference = [dict(ex, index=i) for i, ex in enumerate(tokenize_pairs(pairs[-8:], tokenizer, data).examples)]
    return forget, preference


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batched forward/backward (fast)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default 0: every core, timed by the wall clock; 1: process CPU time)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    by_cpu = torch.get_num_threads() == 1
    clock = time.process_time if by_cpu else time.perf_counter

    from lifealign.config.schema import LoraSection, ModelSection
    from lifealign.config.unlearn import UnlearnSection
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora, lora_parameters, reference_context
    from lifealign.training.forward import compute_reference_logps
    from lifealign.unlearning.objectives import forget_loss
    from lifealign.unlearning.influence import fast_scores, naive_scores, preference_gradient

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(ModelSection(name_or_path=args.model))
    model = attach_lora(model, LoraSection())
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the A factors get gradients too
        for p in lora_parameters(model).values():
            p.normal_(0.0, 0.02)
    pad = tokenizer.pad_token_id
    forget, preference = build_examples(tokenizer, args.examples, args.tokens, args.prompt_tokens)
    ref = lambda: reference_context(model)  # noqa: E731
    loss = forget_loss(UnlearnSection(objective="npo"))
    cand_ref = compute_reference_logps(model, forget, pad, ("rejected",), ref, 16)
    pref_ref = compute_reference_logps(model, preference, pad, ("chosen", "rejected"), ref, 8)
    _, direction = preference_gradient(model, preference, pref_ref, pad_id=pad, beta=0.3)

    flops = scoring_flops(*matmul_params(model), forget)
    print(
        f"threads: {torch.get_num_threads()} ({'process CPU time' if by_cpu else 'wall clock'})  "
        f"load average: {os.getloadavg()[0]:.1f}"
    )
    print(f"examples: {args.examples} x {args.tokens} tokens, batch {args.batch_size}, precision {args.precision}")
    fast_scores(
        model,
        forget[: args.batch_size],
        direction,
        loss,
        pad_id=pad,
        ref_logps=cand_ref,
        batch_size=args.batch_size,
        precision=args.precision,
    )  # warm-up
    cpu = {"fast": 0.0, "naive": 0.0}
    wall = {"fast": 0.0, "naive": 0.0}
    fast, naive, peaks = [], [], []
    for start in range(0, args.examples, args.batch_size):
        group = forget[start : start + args.batch_size]
        ref_rows = cand_ref[start : start + args.batch_size]
        scores, c, w = timed(
            fast_scores,
            model,
            group,
            direction,
            loss,
            pad_id=pad,
            ref_logps=ref_rows,
            batch_size=args.batch_size,
            precision=args.precision,
        )
        fast.append(scores)
        cpu["fast"], wall["fast"] = cpu["fast"] + c, wall["fast"] + w
        scores, c, w = timed(naive_scores, model, group, direction, loss, pad_id=pad, ref_logps=ref_rows)
        naive.append(scores)
        cpu["naive"], wall["naive"] = cpu["naive"] + c, wall["naive"] + w
        peaks.append(matmul_peak(clock))
    peak = max(peaks)
    fast_all, naive_all = torch.cat(fast), torch.cat(naive)
    rel = float((fast_all - naive_all).abs().max() / naive_all.abs().max())
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s; model matmul work: {flops / 1e9:.1f} GFLOP per scoring pass")
    seconds = cpu if by_cpu else wall
    for name in ("fast", "naive"):
        rate = flops / seconds[name] / 1e9
        print(
            f"{name}: {cpu[name]:.2f} s CPU, {wall[name]:.2f} s wall, {seconds[name] / args.examples:.3f} s per "
            f"example, {rate:.1f} GFLOP/s, {rate / peak:.1%} of the fp32 matmul peak"
        )
    print(f"bound (all matmuls at the peak): {flops / peak / 1e9 / args.examples:.3f} s per example")
    print(f"max_rel_diff: {rel:.3e}")
    print(f"fraction_of_matmul_peak: {flops / seconds['fast'] / 1e9 / peak:.3f}")
    print(f"speedup_vs_naive: {seconds['naive'] / seconds['fast']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
