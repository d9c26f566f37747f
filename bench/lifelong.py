"""Lifelong-alignment comparison on the real four-task stream (hh-harmless → hh-helpful → safe-rlhf → TruthfulQA).

Runs every method of a stream config (default ``configs/real-stream.yaml``: LifeAlign, its two ablations FPO-only
and SLMC-only, and every baseline -- SeqFT, ER, EWC, GEM, A-GEM, O-LoRA, L2P, CPPO, MTL, STL) with
SmolLM2-135M-Instruct + LoRA under the same loop and budget, then prints the paper's table (BWT / Last / AP per
metric and their average) and the wall time. Resumable: re-running with the same --out continues, and a method
added to the config later runs alone (finished methods are kept: checkpoints are keyed per method).

    python bench/lifelong.py                                   # the full comparison (see BENCHMARKS.md for time)
    python bench/lifelong.py --methods seqft lifealign --quick # a shorter smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lifealign.engine.experiment import run_experiment
    from lifealign.engine.specs import load_run_config as load_config
    from lifealign.report.markdown import SCORE_METRICS, summary_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "real-stream.yaml"))
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "lifelong"))
    parser.add_argument("--methods", nargs="*", help="subset of the config's method names")
    parser.add_argument("--quick", action="store_true", help="32 train / 16 test pairs per task, 4 steps")
    parser.add_argument(
        "--allow-config-change", action="store_true", help="resume checkpoints written under another config hash"
    )
    parser.add_argument("--seeds", help="run the stream once per seed, e.g. 1,2,3 (folders seed-<s>/)")
    parser.add_argument("--orders", type=int, help="K task orders (the config's, its named orders, permutations)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    if args.methods:  # `--methods a b key=value`: nargs="*" also swallows the overrides that follow it
        args.overrides += [m for m in args.methods if "=" in m]
        args.methods = [m for m in args.methods if "=" not in m]

    os.chdir(REPO)  # the shipped configs use data paths relative to the repo root
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.quick:
        for i in range(len(cfg.tasks)):
            overrides += [f"tasks.{i}.max_train=32", f"tasks.{i}.max_test=16"]
        overrides += ["train.max_steps=4"]
        cfg = load_config(args.config, overrides)

    started = time.monotonic()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    scores = run_experiment(
        cfg,
        out_dir=args.out,
        resume="auto",
        allow_config_change=args.allow_config_change,
        seeds=seeds,
        orders=args.orders,
        methods=args.methods or None,  # each in its own folder, as in a run of all of them
    )
    wall = time.monotonic() - started
    metrics = [m for m in dict.fromkeys(k for s in scores.values() for k in s) if m in SCORE_METRICS]
    print("\n".join(summary_table(scores, metrics, avg=True)).replace("\\_", "_"))
    timings = json.loads((Path(args.out) / "timings.json").read_text())
    print("\nper-method seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings["methods"].items()))
    print(f"load average: {os.getloadavg()[0]:.1f}")
    print(f"wall_seconds: {wall:.0f} (this invocation); sum over methods: {sum(timings['methods'].values()):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
