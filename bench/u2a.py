"""U2A vs its baselines on real data: PKU-SafeRLHF (``../shared/data/preference-tasks/safe-rlhf``) with SmolLM2.

The paper's set-up at CPU scale (``configs/u2a/safe-rlhf.yaml``): the original model is SmolLM2-135M-Instruct
SFT-trained for a few steps on chosen + rejected responses and merged; the forget candidates are rejected
responses; J is the DPO loss on a slice of the preference pairs; the test split is held out. U2A (NPO) and the
baselines (full-set GA / GradDiff / NPO, a random subset of U2A's size, U2A's top-k without weights, DPO on the
pairs) run under the same step budget.

Each seed (``train.seed``; ``unlearn.split_seed`` stays fixed, so every seed scores the same held-out pairs and the
pairing holds) runs in its own resumable folder ``<out>/seed-<s>``; a finished seed is not re-run. Then the seeds are
aggregated (:func:`aggregate`): each method's means with a hierarchical bootstrap (seeds, then pairs), U2A's paired
tests against each baseline over the shared pairs and seeds, Holm-corrected, and the MDE at 80% power; written to
``--results`` (``summary.md``, ``summary.json`` and each seed's ``results.json`` / ``items.jsonl``).

    python bench/u2a.py --seeds 1,2,3     # the full run (see BENCHMARKS.md); re-run the same line to resume
    python bench/u2a.py --aggregate-only  # the summary of the seeds finished so far
    python bench/u2a.py --quick           # a tiny-size smoke run of the same pipeline (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
LABELS = {
    "original": "original (SFT'd)",
    "u2a": "U2A (selected, weighted; NPO inner)",
    "ga": "full-set GA",
    "grad_diff": "full-set GradDiff",
    "npo": "full-set NPO",
    "random": "random subset (U2A's size)",
    "topk": "top-k without weights",
    "dpo": "DPO on the preference pairs",
}
WALL_FILE = "wall.json"
FIGURES = ("impact_scores.png", "weights.png", "delta_J.png")
"""report.md's figures, copied beside it."""


# ----- running the seeds --------------------------------------------------------------------------------------------


def _finished(cfg: Any, run_dir: Path) -> bool:
    """The seed's last checkpoint, written under this config, has every phase done (and results.json is there)."""
    from lifealign.config.load import trajectory_signature
    from lifealign.training.checkpoint import Checkpointer
    from lifealign.utils.jsonio import nan_to_null

    if not (run_dir / "results.json").exists() or not (run_dir / "checkpoints").exists():
        return False
    latest = Checkpointer(run_dir / "checkpoints").latest()
    if latest is None or latest.state["signature"] != nan_to_null(trajectory_signature(cfg)):
        return False
    last = f"eval:{cfg.unlearn.baselines[-1]}" if cfg.unlearn.baselines else "eval:u2a"
    return last in latest.state["done"]


def run_seed(config: str, overrides: Sequence[str], seed: int, run_dir: Path) -> dict[str, Any]:
    """One seed's ``lifealign unlearn`` in ``run_dir`` (resumed if it was started), its wall time appended to
    ``wall.json`` (one entry per session, with the load average); returns its results."""
    from lifealign.config.load import load_config
    from lifealign.engine.unlearn import run_unlearning

    cfg = load_config(config, [*overrides, f"train.seed={seed}"])
    if _finished(cfg, run_dir):
        print(f"seed {seed}: finished in {run_dir}, not re-run")
        return json.loads((run_dir / "results.json").read_text())
    started, load = time.monotonic(), os.getloadavg()[0]
    results = run_unlearning(cfg, out_dir=run_dir, resume="auto")
    wall_path = run_dir / WALL_FILE
    sessions = json.loads(wall_path.read_text()) if wall_path.exists() else []
    sessions.append({"wall_s": time.monotonic() - started, "load_start": load, "load_end": os.getloadavg()[0]})
    wall_path.write_text(json.dumps(sessions, indent=2))
    print(f"seed {seed}: {sessions[-1]['wall_s']:.0f} s (load average {load:.1f} at the start)")
    return results


# ----- aggregation ----------------------------------------------------------------------------------------------------


def _seed_mean(tables: Sequence[Mapping[str, Any]], method: str, key: str) -> float | None:
    values = [t[method][key] for t in tables if isinstance(t.get(method, {}).get(key), int | float)]
    return float(np.mean(values)) if len(values) == len(tables) and values else None


def aggregate(
    runs: Sequence[Sequence[Mapping[str, Any]]],
    tables: Sequence[Mapping[str, Mapping[str, Any]]],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    power: float = 0.8,
) -> dict[str, Any]:
    """The seeds' summary from each seed's ``items.jsonl`` records (``runs``) and ``results.json`` table (``tables``),
    seeds in the same order in both.

    ``table[method]``: ``pref_acc``, ``J``, ``delta_J``, ``margin`` (the mean over seeds and pairs, ``_se``, ``_ci``
    from the hierarchical bootstrap, ``variance_components`` with several seeds) and ``per_seed`` (each seed's pair
    means); ``forget_nll``, ``retain_nll`` and ``steps`` as means over the seeds. ``comparisons``: U2A − each baseline
    (``engine.unlearn.u2a_comparisons``; Holm over all rows). ``power``: the pref_acc comparisons' MDE and, for
    reference, the binomial bound of a paired binary score at U2A's accuracy (``stats.paired_binary_mde``).
    """
    from lifealign.engine.unlearn import item_array, unlearn_statistics
    from lifealign.evaluation.stats import paired_binary_mde
    from lifealign.unlearning.evaluate import ITEM_METRICS

    methods = [m for m in tables[0] if all(m in t and "skipped" not in t[m] for t in tables)]
    stats = unlearn_statistics(runs, methods, n_boot=n_boot, level=level, power=power)
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        row = dict(stats["estimates"].get(method, {}))
        row["per_seed"] = {
            metric: [float(np.nanmean(v)) for v in found[1][:, 0, :]]
            for metric in ITEM_METRICS
            if (found := item_array(runs, method, metric)) is not None
        }
        for key in ("forget_nll", "retain_nll", "steps"):
            row[key] = _seed_mean(tables, method, key)
        table[method] = row
    u2a = table.get("u2a", {}).get("pref_acc")
    n_items = stats["statistics"]["n_items"]
    power_info = {
        "pref_acc": [
            {k: c[k] for k in ("baseline", "diff", "mde", "mde_items")}
            for c in stats["comparisons"]
            if c["metric"] == "pref_acc"
        ],
        "binomial_bound_at_u2a_accuracy": (
            100 * paired_binary_mde(u2a / 100, n_items, alpha=1 - level, power=power)
            if isinstance(u2a, float) and isinstance(n_items, int)
            else None
        ),
    }
    return {
        "table": table,
        "comparisons": stats["comparisons"],
        "statistics": stats["statistics"],
        "power": power_info,
    }


# ----- the summary --------------------------------------------------------------------------------------------------


def _num(x: Any, digits: int = 3, sign: bool = False) -> str:
    if not isinstance(x, int | float) or not np.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _est(row: Mapping[str, Any], key: str, digits: int = 3, sign: bool = False) -> str:
    ci = row.get(f"{key}_ci")
    text = _num(row.get(key), digits, sign)
    return f"{text} [{_num(ci[0], digits, sign)}, {_num(ci[1], digits, sign)}]" if ci else text


def _p(p: Any) -> str:
    return "–" if not isinstance(p, int | float) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def verdicts(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain sentences: which differences are significant after Holm, which are not, which the test could not see."""
    lines = []
    for metric, better in (("delta_J", "lower"), ("pref_acc", "higher")):
        rows = [c for c in comparisons if c["metric"] == metric]
        sig = [c for c in rows if c["significant"]]
        wins = [c["baseline"] for c in sig if (c["diff"] < 0) == (better == "lower")]
        losses = [c["baseline"] for c in sig if c["baseline"] not in wins]
        unclear = [c for c in rows if not c["significant"]]
        if wins:
            lines.append(f"- {metric}: U2A is significantly better ({better}) than {', '.join(wins)} (Holm, α = 0.05).")
        if losses:
            lines.append(f"- {metric}: U2A is significantly worse than {', '.join(losses)}.")
        digits = 1 if metric == "pref_acc" else 3
        if unclear:
            parts = [
                f"{c['baseline']} ({_num(c['diff'], digits, True)}, p_holm {_p(c['p_holm'])}"
                + (f"; smaller than the MDE {_num(c['mde'], digits)}" if c.get("underpowered") else "")
                + ")"
                for c in unclear
            ]
            lines.append(f"- {metric}: no significant difference from {'; '.join(parts)}.")
    return lines


def render_summary(summary: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    stats, table = summary["statistics"], summary["table"]
    level = f"{100 * stats['level']:g}%"
    seeds = f"{stats['n_seeds']} seed{'s' if stats['n_seeds'] != 1 else ''}"
    lines = [*header, "", f"## Methods ({stats['n_items']} held-out pairs × {seeds})", ""]
    lines += [
        f"Mean over seeds and pairs [{level} interval, {stats['method']}, {stats['n_boot']} resamples]; forget/retain "
        "NLL and steps are means over the seeds. The original model scores pref_acc 50 and ΔJ 0 on every pair.",
        "",
        "| method | pref_acc | ΔJ | J | margin | forget NLL | retain NLL | steps | ΔJ per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in table.items():
        per_seed = " / ".join(_num(v, 3, True) for v in row.get("per_seed", {}).get("delta_J", []))
        lines.append(
            f"| {LABELS.get(method, method)} | {_est(row, 'pref_acc', 1)} | {_est(row, 'delta_J', 3, True)} "
            f"| {_num(row.get('J'))} | {_est(row, 'margin')} | {_num(row.get('forget_nll'))} "
            f"| {_num(row.get('retain_nll'))} | {_num(row.get('steps'), 0)} | {per_seed} |"
        )
    lines += [
        "",
        "## Paired tests: U2A − baseline",
        "",
        f"Same pairs and seeds for both arms (a paired bootstrap over seeds, then pairs); {level} interval, bootstrap "
        "p, Holm over all rows together; MDE: the difference detected with 80% power (2.8 × the paired SE); MDE, pairs "
        "only: from the SD of the per-pair differences of the seed means.",
        "",
        "| baseline | metric | U2A − baseline | p | p (Holm) | MDE | MDE, pairs only | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["comparisons"]:
        verdict = "significant" if c["significant"] else ("underpowered" if c["underpowered"] else "not significant")
        digits = 1 if c["metric"] == "pref_acc" else 3
        lines.append(
            f"| {LABELS.get(c['baseline'], c['baseline'])} | {c['metric']} "
            f"| {_num(c['diff'], digits, True)} [{_num(c['ci'][0], digits, True)}, {_num(c['ci'][1], digits, True)}] "
            f"| {_p(c['p'])} | {_p(c['p_holm'])} | {_num(c['mde'], digits)} | {_num(c.get('mde_items'), digits)} "
            f"| {verdict} |"
        )
    bound = summary["power"]["binomial_bound_at_u2a_accuracy"]
    lines += [
        "",
        "## What is and is not significant",
        "",
        *verdicts(summary["comparisons"]),
        "",
        f"Power: with {stats['n_items']} pairs the paired pref_acc test detects (80% power) a difference of about "
        + ", ".join(f"{_num(r['mde'], 1)} ({r['baseline']})" for r in summary["power"]["pref_acc"])
        + f" points; the binomial bound at U2A's accuracy (independent arms) is {_num(bound, 1)} points.",
    ]
    components = table.get("u2a", {}).get("variance_components", {}).get("delta_J")
    if components:
        lines.append(
            f"U2A's ΔJ variance: between seeds {components['between_seeds']:.2e}, within seeds (pairs) "
            f"{components['within_seeds']:.2e}."
        )
    return "\n".join(lines) + "\n"


def write_summary(
    out: Path, results_dir: Path, seeds: Sequence[int], header: Sequence[str], n_boot: int
) -> dict[str, Any] | None:
    """Aggregate the finished seeds of ``out`` into ``results_dir`` (summary and each seed's files)."""
    from lifealign.engine.items import ITEMS_FILE, read_items
    from lifealign.utils.jsonio import nan_to_null

    done = [s for s in seeds if (out / f"seed-{s}" / "results.json").exists()]
    if not done:
        print("no finished seed to aggregate")
        return None
    runs = [read_items(out / f"seed-{s}" / ITEMS_FILE) for s in done]
    results = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in done]
    summary = aggregate(runs, [r["table"] for r in results], n_boot=n_boot)
    walls = {}
    for s in done:
        target = results_dir / f"seed-{s}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", ITEMS_FILE, WALL_FILE, "report.md", *FIGURES):
            if (out / f"seed-{s}" / name).exists():
                shutil.copyfile(out / f"seed-{s}" / name, target / name)
        wall = out / f"seed-{s}" / WALL_FILE
        walls[s] = json.loads(wall.read_text()) if wall.exists() else []
    summary.update(seeds=done, wall=walls, data=results[0]["data"], budget=results[0]["budget"])
    text = json.dumps(nan_to_null(summary), indent=2, allow_nan=False)
    (results_dir / "summary.json").write_text(text + "\n")
    seconds = "; ".join(
        f"seed {s}: {sum(w['wall_s'] for w in walls[s]):.0f} s (load average {walls[s][0]['load_start']:.1f} at the "
        f"start, {walls[s][-1]['load_end']:.1f} at the end{f', {len(walls[s])} sessions' if len(walls[s]) > 1 else ''})"
        for s in done
        if walls[s]
    )
    head = [*header, "", f"Seeds finished: {', '.join(map(str, done))} of {', '.join(map(str, seeds))}. {seconds}"]
    (results_dir / "summary.md").write_text(render_summary(summary, head))
    print((results_dir / "summary.md").read_text())
    return summary


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "u2a" / "safe-rlhf.yaml"))
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "u2a"))
    parser.add_argument("--results", default=None, help="summary folder (default bench/results/u2a; --quick: <out>)")
    parser.add_argument("--seeds", default="1,2,3", help="train.seed values, comma-separated")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    parser.add_argument("--aggregate-only", action="store_true", help="summarise the finished seeds, run nothing")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the config's data paths are relative to the repository root
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    overrides = (QUICK if args.quick else []) + [f"train.threads={args.threads}", *args.overrides]
    out = Path(args.out + ("-quick" if args.quick else ""))
    results_dir = Path(args.results or (out if args.quick else REPO / "bench" / "results" / "u2a"))
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.aggregate_only:
        for seed in seeds:
            run_seed(args.config, overrides, seed, out / f"seed-{seed}")
    command = "python bench/u2a.py " + " ".join([f"--seeds {args.seeds}", *(["--quick"] if args.quick else [])])
    config = Path(args.config).resolve()
    shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config.name
    header = [
        "# U2A vs baselines on safe-rlhf (bench/u2a.py)",
        "",
        f"`{command}` with `{shown}`{' + ' + ' '.join(args.overrides) if args.overrides else ''}; "
        f"{args.threads} torch thread(s) per run.",
    ]
    write_summary(out, results_dir, seeds, header, args.n_boot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
