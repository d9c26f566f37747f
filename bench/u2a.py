"""U2A vs its baselines on real data: PKU-SafeRLHF (``../shared/data/preference-tasks/safe-rlhf``) with SmolLM2.

The paper's set-up at CPU scale (``configs/u2a/safe-rlhf.yaml``): the original model is SmolLM2-135M-Instruct
SFT-trained for a few steps on chosen + rejected responses and merged; the forget candidates are rejected
responses; J is the DPO loss on a slice of the preference pairs; the test split is held out. U2A (NPO) and the
baselines (full-set GA / GradDiff / NPO, a random subset of U2A's size, U2A's top-k without weights, DPO on the
pairs) run under the same step budget. Prints the table and the wall time; resumable (re-run with the same --out).

    python bench/u2a.py            # the reduced full run (765 s on one thread; see BENCHMARKS.md)
    python bench/u2a.py --quick    # a tiny-size smoke run of the same pipeline (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

QUICK = [
    "tasks.0.max_train=60",
    "tasks.0.max_test=4",
    "eval.max_examples=4",
    "unlearn.k=4",
    "unlearn.rounds=1",
    "unlearn.inner_max_steps=1",
    "unlearn.max_preference=4",
    "unlearn.original_sft_steps=2",
]


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "u2a" / "safe-rlhf.yaml"))
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "u2a"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()

    import torch

    from lifealign.config.load import load_config
    from lifealign.engine.unlearn import run_unlearning

    torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the config's data paths are relative to the repository root
    cfg = load_config(args.config, (QUICK if args.quick else []) + list(args.overrides))
    out = Path(args.out + ("-quick" if args.quick else ""))
    started = time.monotonic()
    results = run_unlearning(cfg, out_dir=out, resume="auto")
    wall = time.monotonic() - started
    columns = ["pref_acc", "J", "delta_J", "forget_nll", "retain_nll", "steps", "stopped"]
    print("| method | " + " | ".join(columns) + " |")
    for method, row in results["table"].items():
        cells = (
            [row.get("skipped", "")]
            if "skipped" in row
            else [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns]
        )
        print(f"| {method} | " + " | ".join(cells) + " |")
    selection = results["u2a"]["selection"]
    print(
        f"\nselected {selection['selected']} of {selection['candidates']} candidates; "
        f"budget {results['budget']} steps per method"
    )
    print(json.dumps({"data": results["data"]}, indent=None))
    print(f"report: {out / 'report.md'}")
    print(f"wall seconds: {wall:.0f}  load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
