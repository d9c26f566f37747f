"""U2A impact scores: batched per-example inner products (``fast_scores``) vs one backward per example (naive).

SmolLM2-135M-Instruct + LoRA (r 8, q_proj/v_proj), NPO as the unlearning loss, the direction = grad J of the DPO
loss on 8 preference pairs. Two cases of forget candidates (safe-rlhf rejected responses from
``../shared/data/preference-tasks``; random words if the data is absent):

- ``fixed``: every candidate exactly ``--tokens`` tokens (48 prompt + 80 response by default): no padding anywhere,
  what the batched path was first measured on;
- ``ragged``: the first ``--examples`` rejected responses at their real lengths, truncated as the U2A config does
  (``--config``, ``configs/u2a/safe-rlhf.yaml``: max_length 96, max_prompt_length 48).

Each case times four ways of scoring the same candidates, interleaved in groups of ``--batch-size`` (each group:
the packed fast pass, the same without fused kernels, the padded fast pass, the same candidates one by one, then a
few peak matmuls), so a change in the machine's load hits all alike:

    fast:   ``fast_scores`` as U2A runs it (``unlearn.score_fused``): the group packed into rows of at most
            ``--token-budget`` tokens (default: batch size x the group's longest candidate), per-candidate positions
            and attention, no padding, the RMSNorms, SwiGLU and rotary as fused compiled kernels
    eager:  the same without the fused kernels (``fused=False``): what they are worth
    padded: ``fast_scores(packing=False)``: the group as one batch padded to its longest candidate (fused kernels)
    naive:  ``naive_scores``: one forward + backward per candidate (the test oracle, eager)

and prints, per case and run, seconds per example, GFLOP/s and the fraction of the fp32 matmul peak (measured here
with a large torch.mm), ``max_rel_diff = max|fast - naive| / max|naive|`` and ``speedup_vs_naive = naive s / fast
s``; after the last run, the median of each over the runs. FLOPs are the model's matmuls only: forward ``2 P T`` plus
the input-gradient backward ``2 P T`` (the base is frozen, so no weight gradients), with P the weights of every
linear layer and T the candidate's tokens — the LM head counted on response tokens only, the only positions every
path runs it on; padding is not counted (it is work, not progress), so the padded path's fraction of the peak says
how much padding costs it.

The clock is the wall clock on an idle machine with all cores (the acceptance setting); on a shared machine use
``--threads 1``, which times by the process's CPU time instead (time spent computing, not waiting for a core).

    python bench/u2a_scoring.py --runs 5             # fp32, all cores, wall clock: the acceptance setting
    python bench/u2a_scoring.py --examples 16        # a short correctness run
    python bench/u2a_scoring.py --threads 1          # a shared machine: one thread, process CPU time
    python bench/u2a_scoring.py --precision bf16     # autocast bf16 for the fast paths' forward/backward
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Large tensors on transparent huge pages (c10 reads this once, at its first large allocation, so it is set before
# torch is imported). The batched paths allocate and free megabytes of activations per layer and glibc hands that
# memory back to the kernel between forwards, so without it every pass re-faults them 4 KiB at a time: 130k-400k
# minor faults and 0.2-0.5 s of system time per 16 candidates on one thread here, more with two threads contending
# for the page tables. The naive loop's small tensors are reused from the heap and never fault. --no-thp: off.
if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference-tasks" / "safe-rlhf" / "train.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_report  # noqa: E402

CASES = ("fixed", "ragged")
PATHS = ("fast", "eager", "padded", "naive")


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


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float, int]:
    """``(fn(*args, **kwargs), process CPU seconds, wall seconds, minor page faults)``."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    c1, w1 = time.process_time(), time.perf_counter()
    return out, c1 - c0, w1 - w0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """``(weights of every linear layer but the LM head (LoRA factors included), weights of the LM head)``."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def n_tokens(ex: dict) -> int:
    return len(ex["prompt_ids"]) + len(ex["rejected_ids"])


def scoring_flops(body: int, head: int, examples: list[dict]) -> float:
    """Matmul FLOPs of one forward + input-gradient backward: ``4 (P_body T + P_head T_response)`` summed."""
    return float(sum(4 * (body * n_tokens(ex) + head * len(ex["rejected_ids"])) for ex in examples))


def load_pairs(n: int) -> list:
    """safe-rlhf pairs with distinct non-empty responses, or ``n`` random-word pairs when the data is absent."""
    from lifealign.data.records import PreferencePair

    if DATA.is_file():
        raw = json.loads(DATA.read_text())
        return [
            PreferencePair(r["query"], r["chosen"], r["rejected"], id=str(i))
            for i, r in enumerate(raw)
            if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]
        ]
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud"]
    text = lambda k: " ".join(words[int(i)] for i in torch.randint(0, 8, (k,), generator=gen))  # noqa: E731
    lengths = torch.randint(5, 150, (n,), generator=gen)
    return [PreferencePair(text(20), text(150), text(int(lengths[i])), id=str(i)) for i in range(n)]


def build_cases(tokenizer, pairs: list, args: argparse.Namespace, data) -> dict[str, list[dict]]:
    """``{"fixed": n candidates of exactly --tokens ids, "ragged": the first n at the config's truncation}``."""
    from lifealign.config.schema import DataSection
    from lifealign.data.tokenize import tokenize_pairs

    n, cases = args.examples, {}
    if "fixed" in args.cases:
        fixed_data = DataSection(max_length=args.tokens, max_prompt_length=args.prompt_tokens)
        fixed = [
            ex
            for ex in tokenize_pairs(pairs[: 8 * n], tokenizer, fixed_data, sides=("rejected",)).examples
            if n_tokens(ex) == args.tokens
        ][:n]
        if len(fixed) < n:
            raise SystemExit(f"only {len(fixed)} examples reach {args.tokens} tokens")
        cases["fixed"] = fixed
    if "ragged" in args.cases:
        cases["ragged"] = tokenize_pairs(pairs[:n], tokenizer, data, sides=("rejected",)).examples[:n]
    return {name: [dict(ex, index=i) for i, ex in enumerate(exs)] for name, exs in cases.items()}


def describe(examples: list[dict], batch_size: int, budget: int | None) -> str:
    """Lengths, the padding a padded batch carries, and the packed rows of each group."""
    from lifealign.data.packing import pack_rows

    lengths = [n_tokens(ex) for ex in examples]
    padded = rows = 0
    for start in range(0, len(lengths), batch_size):
        group = lengths[start : start + batch_size]
        padded += len(group) * max(group)
        rows += len(pack_rows(group, budget or batch_size * max(group)))
    return (
        f"tokens per candidate min {min(lengths)} median {statistics.median(lengths):g} max {max(lengths)} "
        f"(response median {statistics.median(len(ex['rejected_ids']) for ex in examples):g}); padded batches of "
        f"{batch_size}: {1 - sum(lengths) / padded:.1%} padding; packed: {rows} rows of {sum(lengths) / rows:.0f} "
        "tokens on average"
    )


def run_case(
    examples: list[dict], setup: dict[str, Any], args: argparse.Namespace, clock: Any
) -> tuple[dict[str, float], dict[str, int], float, float]:
    """One timed pass over ``examples``: ``(seconds per path, page faults per path, max_rel_diff, matmul peak)``."""
    from lifealign.unlearning.influence import fast_scores, naive_scores

    model, direction, loss, pad, ref = setup["model"], setup["direction"], setup["loss"], setup["pad"], setup["ref"]
    common = dict(pad_id=pad, batch_size=args.batch_size, precision=args.precision)
    paths = {
        "fast": lambda group, rows: fast_scores(
            model, group, direction, loss, ref_logps=rows, token_budget=args.token_budget, fused=True, **common
        ),
        "eager": lambda group, rows: fast_scores(
            model, group, direction, loss, ref_logps=rows, token_budget=args.token_budget, **common
        ),
        "padded": lambda group, rows: fast_scores(
            model, group, direction, loss, ref_logps=rows, packing=False, fused=True, **common
        ),
        "naive": lambda group, rows: naive_scores(model, group, direction, loss, pad_id=pad, ref_logps=rows),
    }
    if args.no_padded:
        del paths["padded"]
    if args.no_eager:
        del paths["eager"]
    seconds = {name: 0.0 for name in paths}
    faults = {name: 0 for name in paths}
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in paths}
    peaks = []
    for start in range(0, len(examples), args.batch_size):
        group, rows = examples[start : start + args.batch_size], ref[start : start + args.batch_size]
        for name, fn in paths.items():
            out, cpu, wall, flt = timed(fn, group, rows)
            scores[name].append(out)
            seconds[name] += cpu if clock is time.process_time else wall
            faults[name] += flt
        peaks.append(matmul_peak(clock))
    naive = torch.cat(scores["naive"])
    rel = float((torch.cat(scores["fast"]) - naive).abs().max() / naive.abs().max())
    return seconds, faults, rel, max(peaks)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=64, help="candidates per case")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--runs", type=int, default=1, help="timed passes per case (medians printed at the end)")
    parser.add_argument("--tokens", type=int, default=128, help="fixed case: tokens per candidate")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="fixed case: max prompt tokens")
    parser.add_argument("--config", default=str(REPO / "configs" / "u2a" / "safe-rlhf.yaml"), help="ragged: data.*")
    parser.add_argument("--batch-size", type=int, default=16, help="candidates per group (and per padded batch)")
    parser.add_argument("--token-budget", type=int, default=None, help="packed row tokens (default: batch x longest)")
    parser.add_argument("--no-padded", action="store_true", help="do not time the padded path")
    parser.add_argument("--no-eager", action="store_true", help="do not time the fast path without fused kernels")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-thp", action="store_true", help="leave THP_MEM_ALLOC_ENABLE unset (see the module)")
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

    from lifealign.config.load import load_config
    from lifealign.config.schema import LoraSection, ModelSection
    from lifealign.config.unlearn import UnlearnSection
    from lifealign.data.tokenize import tokenize_pairs
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora, lora_parameters, reference_context
    from lifealign.training.forward import compute_reference_logps
    from lifealign.unlearning.influence import fast_scores, preference_gradient
    from lifealign.unlearning.objectives import forget_loss

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(ModelSection(name_or_path=args.model))
    model = attach_lora(model, LoraSection())
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the A factors get gradients too
        for p in lora_parameters(model).values():
            p.normal_(0.0, 0.02)
    pad = tokenizer.pad_token_id
    data = load_config(args.config).data
    pairs = load_pairs(8 * args.examples)
    cases = build_cases(tokenizer, pairs, args, data)
    preference = [dict(ex, index=i) for i, ex in enumerate(tokenize_pairs(pairs[-8:], tokenizer, data).examples)]
    ref = lambda: reference_context(model)  # noqa: E731
    loss = forget_loss(UnlearnSection(objective="npo"))
    pref_ref = compute_reference_logps(model, preference, pad, ("chosen", "rejected"), ref, 8)
    _, direction = preference_gradient(model, preference, pref_ref, pad_id=pad, beta=0.3)
    body, head = matmul_params(model)

    print(machine_report())
    print(
        f"clock: {'process CPU time (one thread)' if by_cpu else 'wall clock'}; precision {args.precision}; "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
    )
    setups, flops = {}, {}
    for name, examples in cases.items():
        cand_ref = compute_reference_logps(model, examples, pad, ("rejected",), ref, 16)
        setups[name] = dict(model=model, direction=direction, loss=loss, pad=pad, ref=cand_ref)
        flops[name] = scoring_flops(body, head, examples)
        print(f"{name}: {len(examples)} candidates; {describe(examples, args.batch_size, args.token_budget)}")
        print(f"{name}: model matmul work {flops[name] / 1e9 / len(examples):.1f} GFLOP per candidate")
        group, rows = examples[: args.batch_size], cand_ref[: args.batch_size]  # warm-up of every fast path
        for packing, fused in ((True, True), (True, False), (False, True)):
            start = time.perf_counter()
            fast_scores(
                model, group, direction, loss, pad_id=pad, ref_logps=rows, batch_size=args.batch_size,
                packing=packing, fused=fused,
            )  # fmt: skip
            if fused and name == next(iter(cases)) and packing:
                print(f"first fused pass (torch.compile included): {time.perf_counter() - start:.1f} s")

    results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for run in range(1, args.runs + 1):
        for name, examples in cases.items():
            seconds, faults, rel, peak = run_case(examples, setups[name], args, clock)
            n = len(examples)
            row = {"peak": peak, "max_rel_diff": rel, "speedup_vs_naive": seconds["naive"] / seconds["fast"]}
            parts = []
            for path, s in seconds.items():
                row[f"{path}_s"], row[f"{path}_peak"] = s / n, flops[name] / s / 1e9 / peak
                row[f"{path}_faults"] = faults[path] / n
                parts.append(f"{path} {s / n:.3f} s/example ({row[f'{path}_peak']:.1%} of peak)")
            if "padded" in seconds:
                row["speedup_vs_padded"] = seconds["padded"] / seconds["fast"]
            if "eager" in seconds:
                row["speedup_vs_eager"] = seconds["eager"] / seconds["fast"]
            results[name].append(row)
            print(
                f"[{name} run {run}] peak {peak:.1f} GFLOP/s; {'; '.join(parts)}; "
                f"speedup_vs_naive {row['speedup_vs_naive']:.2f}; max_rel_diff {rel:.2e}; "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )

    print(f"\nsummary: median over {args.runs} run(s); load average now {os.getloadavg()[0]:.1f}")
    for name, rows in results.items():
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        bound = flops[name] / med["peak"] / 1e9 / len(cases[name])
        print(f"{name}:")
        print(
            f"  speedup_vs_naive: {med['speedup_vs_naive']:.2f}  (runs: {[round(r['speedup_vs_naive'], 2) for r in rows]})"
        )
        if "speedup_vs_padded" in med:
            print(f"  speedup_vs_padded: {med['speedup_vs_padded']:.2f}")
        if "speedup_vs_eager" in med:
            print(f"  speedup_vs_eager (the fused kernels): {med['speedup_vs_eager']:.2f}")
        print(f"  max_rel_diff: {max(r['max_rel_diff'] for r in rows):.3e}")
        for path in (p for p in PATHS if f"{p}_s" in med):
            print(
                f"  {path}: {med[f'{path}_s']:.3f} s per example, {med[f'{path}_peak']:.1%} of the fp32 matmul peak, "
                f"{med[f'{path}_faults']:.0f} minor page faults per example"
            )
        print(f"  bound (all matmuls at the peak {med['peak']:.1f} GFLOP/s): {bound:.3f} s per example")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
