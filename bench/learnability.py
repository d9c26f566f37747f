"""Learnability probe: SeqFT (DPO) held-out preference accuracy against optimizer steps, one task at a time.

For each shared task (../shared/data/preference-tasks) a fresh LoRA adapter on the bundled SmolLM2-135M-Instruct
is trained with DPO (β 0.1, reference = the base model, i.e. the adapter disabled) by the project's own loop
(``lifealign.training.loop.train_task``: AdamW, cosine schedule with 10 % warm-up, gradient clipping at 1.0) for
one stage of T optimizer steps of 4 pairs, and the adapter is scored on held-out pairs at evaluation points inside
that stage. Each task's ``.json`` keeps, per held-out pair, the raw numbers (policy and reference summed log-probs
of the chosen and rejected response and their token counts), so every statistic below can be recomputed:

* ``pref_acc``: implicit-reward win ``β(log π_c − log π_ref,c) > β(log π_r − log π_ref,r)`` (ties ½) — the score
  matrix's diagonal. The untrained adapter ties on every pair (50 by construction), so "above the untrained model"
  is an exact two-sided sign test of the wins against ½ (ties dropped);
* ``lik_acc``: likelihood win ``log π(c) > log π(r)`` (summed log-probs), and ``lik_acc_tok`` per token; these the
  untrained model already scores, so "above the untrained model" is an exact two-sided McNemar test on the same
  items (the discordant pairs) plus the paired difference with its standard error (STATISTICS.md §3).

Intervals are 95 % Wilson intervals (items are independent pairs). p-values are Holm-adjusted over the evaluation
points of a task (repeated looks at one curve); a task's "first significant step" is the first point with adjusted
p < 0.05 and a positive difference.

Resumable at any moment: every ``save_every`` (8) steps the loop's checkpoint callback scores the adapter if the
step is an evaluation point (results written atomically to ``bench/results/learnability/<task>.json``) and then
commits an atomic checkpoint (adapter, AdamW, scheduler, loop state) under ``bench/out/learnability/<task>/``;
re-running the same command restores it and continues bit-identically (no finished evaluation is redone; a
re-reached evaluation point is checked against the stored adapter hash).

    # the library pinned to one commit (other work edits src/ meanwhile); once, before the first invocation:
    C=8b4ea9b612e1272295b2a4f0657cdfa6bb334ea8; mkdir -p bench/out/learnability
    git archive --prefix=lib/ $C src | tar -x -C bench/out/learnability && echo $C > bench/out/learnability/lib/COMMIT
    # the real probe (one torch thread); re-run the same line to resume after any interruption:
    PYTHONPATH=bench/out/learnability/lib/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        nohup .venv/bin/python bench/learnability.py >> bench/out/learnability.log 2>&1 &
    .venv/bin/python bench/learnability.py --report              # summary.md + learnability.png from the .json
    .venv/bin/python bench/learnability.py --quick               # smoke run into bench/out/learnability-quick

Measured before choosing the budget (2 logical CPUs, Intel Xeon with AMX, one torch thread, bf16 autocast,
max_length 128, load average < 1): one training step of 4 pairs ≈ 3 s (≈ 0.6 s of it the reference forward; 2 s
for TruthfulQA's short pairs), one evaluation of 200 held-out pairs ≈ 33 s (83 TruthfulQA pairs ≈ 11 s). The
default T = 384 steps with 11 evaluation points (0, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384) is then ≈ 0.55
CPU-hours per hh/safe task and ≈ 0.3 for TruthfulQA, ≈ 2 CPU-hours in all; on the shared machine (load average
5–9 on 2 CPUs) wall time was ≈ 2.5× CPU time. `--quick` (4 steps, 8 held-out pairs per task) took 5 min wall
(2 min CPU) at load average 4–9. The real run's recorded time is in bench/results/learnability/summary.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference-tasks"
TASKS = ["hh-rlhf-harmless-base", "hh-rlhf-helpful-base", "safe-rlhf", "TruthfulQA"]
RESULTS = REPO / "bench" / "results" / "learnability"
WORK = REPO / "bench" / "out" / "learnability"
QUICK_RESULTS = REPO / "bench" / "out" / "learnability-quick" / "results"
QUICK_WORK = REPO / "bench" / "out" / "learnability-quick" / "work"
LADDER = [8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
ALPHA = 0.05
Z95 = 1.959963984540054

logger = logging.getLogger("learnability")


# ----- statistics (pure Python: no scipy in the venv) ---------------------------------------------------------------
def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (``successes`` may be fractional: ties count ½)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial test of ``k`` successes in ``n`` against p = ½ (the sign test / exact McNemar)."""
    if n == 0:
        return 1.0
    tail = min(k, n - k)
    p = sum(math.comb(n, i) for i in range(tail + 1)) / 2**n
    return min(1.0, 2 * p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1), in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [1.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def wins(a: list[float], b: list[float]) -> list[float]:
    """Per item: 1 if a > b, ½ if equal, 0 if below."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def point_scores(items: dict[str, list], point: dict[str, list], beta: float) -> dict[str, list[float]]:
    """Per-item outcomes of one evaluation point (0/½/1)."""
    pc, pr = point["policy_chosen"], point["policy_rejected"]
    rc, rr = items["ref_chosen"], items["ref_rejected"]
    nc, nr = items["chosen_tokens"], items["rejected_tokens"]
    return {
        "pref_acc": wins([c - r for c, r in zip(pc, rc, strict=True)], [c - r for c, r in zip(pr, rr, strict=True)]),
        "lik_acc": wins(pc, pr),
        "lik_acc_tok": wins([c / n for c, n in zip(pc, nc, strict=True)], [r / n for r, n in zip(pr, nr, strict=True)]),
        "margin": [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)],
    }


def accuracy_summary(outcomes: list[float]) -> dict[str, float]:
    n = len(outcomes)
    mean, sd = mean_sd(outcomes)
    lo, hi = wilson(sum(outcomes), n)
    return {"acc": 100 * mean, "se": 100 * sd / math.sqrt(n), "ci_low": 100 * lo, "ci_high": 100 * hi}


def paired_vs_base(now: list[float], base: list[float]) -> dict[str, float]:
    """Paired comparison with the untrained model on the same items: exact McNemar + the mean difference's CI."""
    diffs = [a - b for a, b in zip(now, base, strict=True)]
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    se = sd / math.sqrt(n)
    up = sum(1 for a, b in zip(now, base, strict=True) if a > b)
    down = sum(1 for a, b in zip(now, base, strict=True) if a < b)
    return {
        "diff": 100 * mean,
        "diff_se": 100 * se,
        "diff_ci_low": 100 * (mean - Z95 * se),
        "diff_ci_high": 100 * (mean + Z95 * se),
        "discordant_up": up,
        "discordant_down": down,
        "p": binom_two_sided(up, up + down),
        "mdd80": 100 * 2.8 * sd / math.sqrt(n),
    }


def sign_vs_half(outcomes: list[float]) -> dict[str, float]:
    """Exact two-sided sign test of the implicit-reward wins against ½ (ties dropped)."""
    w = sum(1 for o in outcomes if o == 1.0)
    loss = sum(1 for o in outcomes if o == 0.0)
    return {"wins": w, "losses": loss, "ties": len(outcomes) - w - loss, "p": binom_two_sided(w, w + loss)}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluation point: accuracies with SE and Wilson CI, tests against the untrained model (Holm)."""
    items, points = result["items"], sorted(result["points"], key=lambda p: p["step"])
    if not points:
        return []
    base = {
        "lik_acc": wins(items["ref_chosen"], items["ref_rejected"]),
        "lik_acc_tok": wins(
            [c / n for c, n in zip(items["ref_chosen"], items["chosen_tokens"], strict=True)],
            [r / n for r, n in zip(items["ref_rejected"], items["rejected_tokens"], strict=True)],
        ),
    }
    rows = []
    for point in points:
        s = point_scores(items, point, result["settings"]["beta"])
        row: dict[str, Any] = {"step": point["step"], "pairs_seen": point["pairs_seen"], "n": len(s["pref_acc"])}
        for key in ("pref_acc", "lik_acc", "lik_acc_tok"):
            row[key] = accuracy_summary(s[key])
        row["margin"] = mean_sd(s["margin"])[0]
        row["pref_acc"]["vs_half"] = sign_vs_half(s["pref_acc"])
        for key in ("lik_acc", "lik_acc_tok"):
            row[key]["vs_base"] = paired_vs_base(s[key], base[key])
        rows.append(row)
    later = [r for r in rows if r["step"] > 0]
    for path in (("pref_acc", "vs_half"), ("lik_acc", "vs_base"), ("lik_acc_tok", "vs_base")):
        adjusted = holm([r[path[0]][path[1]]["p"] for r in later])
        for r, p in zip(later, adjusted, strict=True):
            r[path[0]][path[1]]["p_holm"] = p
    return rows


def first_significant(rows: list[dict[str, Any]], key: str, test: str) -> int | None:
    for r in rows:
        if r["step"] == 0:
            continue
        t = r[key][test]
        up = (t["wins"] > t["losses"]) if test == "vs_half" else (t["diff"] > 0)
        if up and t["p_holm"] < ALPHA:
            return r["step"]
    return None


# ----- the run -----------------------------------------------------------------------------------------------------
def eval_points(steps: int, every: int | None, save_every: int) -> list[int]:
    """0, the ladder 8, 16, 32, 48, 64, 96, ... (or multiples of ``every``) below ``steps``, and ``steps``."""
    inner = range(every, steps, every) if every else [s for s in LADDER if s < steps]
    bad = [s for s in inner if s % save_every]
    if bad:
        raise SystemExit(f"evaluation points {bad} are not multiples of save_every={save_every}")
    return sorted({0, *inner, steps})


def adapter_hash(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def library_provenance() -> str:
    """Where ``lifealign`` was imported from (the run pins a snapshot of a commit; see the module docstring)."""
    import lifealign

    src = Path(lifealign.__file__).resolve().parents[1]
    marker = src.parent / "COMMIT"
    commit = marker.read_text().strip() if marker.exists() else "working tree"
    return f"{src} ({commit})"


def write_json(path: Path, obj: Any) -> None:
    from lifealign.utils.jsonio import atomic_write_text, nan_to_null

    atomic_write_text(path, json.dumps(nan_to_null(obj), indent=1, allow_nan=False) + "\n")


class Probe:
    """Model, tokenizer and accelerator shared by every task; one fresh adapter (the same initial one) per task."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from lifealign.config.schema import DataSection, LoraSection, LossTerm, ModelSection, RunConfig, TrainSection
        from lifealign.losses import bind_losses
        from lifealign.models.lora import lora_state
        from lifealign.pipeline import load_base_with_adapter, make_accelerator

        self.settings = settings
        self.cfg = RunConfig(
            model=ModelSection(
                name_or_path=settings["model"], lora=LoraSection(r=settings["lora_r"], alpha=settings["lora_alpha"])
            ),
            data=DataSection(max_length=settings["max_length"], max_prompt_length=settings["max_prompt_length"]),
            train=TrainSection(
                lr=settings["lr"],
                max_steps=settings["steps"],
                batch_size=settings["batch_size"],
                grad_accum=1,
                precision=settings["precision"],
                threads=1,
                cache_reference=False,
                save_every=settings["save_every"],
                keep_checkpoints=2,
                progress=False,
                seed=settings["seed"],
            ),
        )
        self.acc = make_accelerator(self.cfg)
        model, self.tokenizer = load_base_with_adapter(self.cfg)
        self.model = self.acc.prepare(model)
        self.init_adapter = lora_state(self.acc.unwrap_model(self.model))
        self.loss = bind_losses([LossTerm(name="dpo", beta=settings["beta"])], "method.loss")

    def logps(self, examples: list[dict[str, Any]], reference: bool) -> dict[str, list[float]]:
        """Summed response log-probs (fp32 sums under the run's autocast) of every held-out pair, in order."""
        import contextlib

        from lifealign.evaluation.scorers.base import eval_mode
        from lifealign.evaluation.scorers.preference import pair_logps
        from lifealign.models.lora import reference_context

        model = self.acc.unwrap_model(self.model)
        ref = reference_context(model) if reference else contextlib.nullcontext()
        with eval_mode(model), ref, self.acc.autocast():
            out = pair_logps(model, examples, self.tokenizer.pad_token_id, batch_size=self.settings["eval_batch"])
        return {"chosen": out.chosen.tolist(), "rejected": out.rejected.tolist()}

    def run_task(self, index: int, name: str, results_dir: Path, work_dir: Path, stop_at: int | None) -> None:
        from lifealign.config.schema import TaskSection
        from lifealign.data.sources import load_task
        from lifealign.data.tokenize import tokenize_pairs
        from lifealign.models.lora import load_lora_state, lora_state
        from lifealign.training import loop
        from lifealign.training.checkpoint import Checkpointer
        from lifealign.training.plugin import PluginContext

        st = self.settings
        out_path = results_dir / f"{name}.json"
        result: dict[str, Any] | None = json.loads(out_path.read_text()) if out_path.exists() else None
        if result is not None and result["settings"] != st:
            diff = {k: (result["settings"].get(k), v) for k, v in st.items() if result["settings"].get(k) != v}
            raise SystemExit(f"{out_path}: written under other settings {diff}; move it away to start afresh")
        if result is not None and result.get("finished"):
            logger.info("%s: finished earlier, skipped", name)
            return
        max_test = st["held_out_truthfulqa"] if name == "TruthfulQA" else st["held_out"]
        section = TaskSection(
            name=name,
            train=str(DATA / name / "train.json"),
            test=str(DATA / name / "test.json"),
            max_train=st["max_train"],
            max_test=max_test,
        )
        task = load_task(section, self.cfg.data, seed=st["seed"])
        train = tokenize_pairs(task.train, self.tokenizer, self.cfg.data)
        test = tokenize_pairs(task.test, self.tokenizer, self.cfg.data)
        model = self.acc.unwrap_model(self.model)
        load_lora_state(model, self.init_adapter)
        t0 = time.monotonic()
        ckpt_dir = work_dir / name / "checkpoints"
        checkpointer = Checkpointer(ckpt_dir, keep=2)
        checkpointer.clean_stale_tmp()
        if result is None and checkpointer.latest() is not None:
            raise SystemExit(f"{ckpt_dir} holds checkpoints but {out_path} is missing; remove {ckpt_dir} to restart")
        if result is None:
            ref = self.logps(test.examples, reference=True)
            result = {
                "task": name,
                "settings": st,
                "data": {
                    "train_pairs": len(train.examples),
                    "held_out_pairs": len(test.examples),
                    "loader_skipped": task.skipped,
                    "train_tokenization": train.stats,
                    "held_out_tokenization": test.stats,
                },
                "items": {
                    "ids": [e["id"] for e in test.examples],
                    "chosen_tokens": [len(e["chosen_ids"]) for e in test.examples],
                    "rejected_tokens": [len(e["rejected_ids"]) for e in test.examples],
                    "ref_chosen": ref["chosen"],
                    "ref_rejected": ref["rejected"],
                },
                "points": [],
                "train_metrics": [],
                "timing": {"reference_eval_seconds": time.monotonic() - t0, "segments": []},
                "finished": False,
            }
            write_json(out_path, result)
        elif result["items"]["ids"] != [e["id"] for e in test.examples]:
            raise SystemExit(f"{out_path}: the held-out items differ from the stored ones")
        points = set(st["eval_points"])
        done = {p["step"]: p for p in result["points"]}
        resume = None
        ckpt = checkpointer.latest()
        if ckpt is not None:
            if ckpt.state["settings"] != st:
                raise SystemExit(f"{ckpt.path}: written under other settings; remove {ckpt_dir} to start afresh")
            load_lora_state(model, ckpt.tensors("adapter"))
            resume = dict(ckpt.state["loop"])
            resume["optimizer"] = ckpt.optimizer_state()
            resume["ref_logps"] = None
            result["train_metrics"] = [m for m in result["train_metrics"] if m["step"] <= resume["stage_step"]]
            logger.info("%s: resumed at step %d from %s", name, resume["stage_step"], ckpt.path)
        else:
            if any(p["step"] > 0 for p in result["points"]):
                raise SystemExit(f"{out_path} has trained points but {ckpt_dir} no checkpoint; move one away")
            result["train_metrics"] = []
        start_step = resume["stage_step"] if resume else 0
        segment: dict[str, Any] = {
            "from_step": start_step,
            "to_step": start_step,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_start": round(os.getloadavg()[0], 2),
            "seconds": 0.0,
            "cpu_seconds": 0.0,
            "eval_seconds": 0.0,
            "library": library_provenance(),
        }
        result["timing"]["segments"].append(segment)
        clock = {"t": time.monotonic(), "cpu": time.process_time()}

        def evaluate(step: int) -> None:
            state = lora_state(model)
            digest = adapter_hash(state)
            if step in done:  # reached again after a restart: the trajectory must be the same
                if done[step]["adapter_sha256"] != digest:
                    logger.warning("%s step %d: adapter hash %s differs from stored %s (not bit-identical)",
                                   name, step, digest, done[step]["adapter_sha256"])  # fmt: skip
                    result.setdefault("hash_mismatches", []).append(step)
                return
            e0 = time.monotonic()
            pol = self.logps(test.examples, reference=False)
            seconds = time.monotonic() - e0
            segment["eval_seconds"] = round(segment["eval_seconds"] + seconds, 1)
            point = {
                "step": step,
                "pairs_seen": step * st["batch_size"],
                "adapter_sha256": digest,
                "eval_seconds": round(seconds, 2),
                "load_average": round(os.getloadavg()[0], 2),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "policy_chosen": pol["chosen"],
                "policy_rejected": pol["rejected"],
            }
            if step == 0:
                point["max_abs_policy_minus_reference"] = max(
                    abs(a - b)
                    for a, b in zip(
                        pol["chosen"] + pol["rejected"],
                        result["items"]["ref_chosen"] + result["items"]["ref_rejected"],
                        strict=True,
                    )
                )
            result["points"].append(point)
            done[step] = point
            result["summary"] = summarize(result)
            row = next(r for r in result["summary"] if r["step"] == step)
            logger.info(
                "%s step %d: pref_acc %.1f [%.1f, %.1f] p=%.3g | lik_acc %.1f (base %+.1f, p=%.3g) | eval %.0fs",
                name,
                step,
                row["pref_acc"]["acc"],
                row["pref_acc"]["ci_low"],
                row["pref_acc"]["ci_high"],
                row["pref_acc"]["vs_half"]["p"],
                row["lik_acc"]["acc"],
                row["lik_acc"]["vs_base"]["diff"],
                row["lik_acc"]["vs_base"]["p"],
                seconds,
            )

        def persist(step: int) -> None:
            """Write the results file (atomically) with this invocation's time so far."""
            segment.update(
                to_step=step,
                seconds=round(time.monotonic() - clock["t"], 1),
                cpu_seconds=round(time.process_time() - clock["cpu"], 1),
                load_end=round(os.getloadavg()[0], 2),
            )
            write_json(out_path, result)

        if 0 in points and 0 not in done:
            evaluate(0)
            persist(0)

        def save_checkpoint(loop_state: dict, loop_tensors: dict, optimizer_state: dict) -> None:
            step = loop_state["stage_step"]
            if step in points:
                evaluate(step)
            persist(step)  # before the checkpoint: a point evaluated here is never lost (a rerun re-checks it)
            checkpointer.save({"settings": st, "loop": loop_state}, {"adapter": lora_state(model)}, optimizer_state)
            logger.info("%s: checkpoint at step %d (%.0f s since start)", name, step, time.monotonic() - t0)
            if stop_at is not None and step >= stop_at:
                raise SystemExit(f"--stop-at {stop_at}: stopped after the checkpoint at step {step}")

        def write_metrics(record: dict[str, Any]) -> None:
            keep = ("step", "loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate")
            result["train_metrics"].append({k: record[k] for k in keep if k in record})
            if record["step"] % st["save_every"] == 0:
                recent = result["train_metrics"][-st["save_every"] :]
                logger.info(
                    "%s step %d: train loss %.4f (mean of last %d), reward acc %.2f, lr %.2e",
                    name,
                    record["step"],
                    sum(m["loss"] for m in recent) / len(recent),
                    len(recent),
                    sum(m.get("rewards/accuracies", math.nan) for m in recent) / len(recent),
                    record["learning_rate"],
                )

        def commit(checkpoint: Any) -> None:  # the loop's StageContext API (LoopCheckpoint)
            save_checkpoint(checkpoint.state, checkpoint.tensors, checkpoint.optimizer)

        if hasattr(loop, "StageContext"):
            services: Any = loop.StageContext(
                model=self.model,
                tokenizer=self.tokenizer,
                accelerator=self.acc,
                train=self.cfg.train,
                data=self.cfg.data,
                loss=self.loss,
                plugins=[],
                metrics=write_metrics,
                commit=commit,
                method_name="seqft",
            )
            services.steps.value = start_step
        else:  # the LoopServices API (lifealign up to commit cee87f3)
            services = loop.LoopServices(
                accelerator=self.acc,
                tokenizer=self.tokenizer,
                train_cfg=self.cfg.train,
                plugins=[],
                write_metrics=write_metrics,
                save_checkpoint=save_checkpoint,
                method_name="seqft",
                global_step=start_step,
            )
        plan = loop.StagePlan(index, task, "pref", self.loss, st["lr"], 1.0, st["steps"])
        ctx = PluginContext(model=model, tokenizer=self.tokenizer, task=task, task_index=index, seen_tasks=[task])
        result_stage = loop.train_task(self.model, train.examples, plan, services, ctx, resume=resume)
        evaluate(st["steps"])
        result["finished"] = True
        result["stage"] = {"steps": result_stage.steps, "nonfinite_skipped": result_stage.nonfinite_skipped}
        persist(st["steps"])
        logger.info("%s: finished in %.0f s (this invocation)", name, time.monotonic() - t0)


# ----- the report --------------------------------------------------------------------------------------------------
def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}"


def _ci(a: dict[str, float]) -> str:
    return f"{a['acc']:.1f} [{a['ci_low']:.1f}, {a['ci_high']:.1f}]"


def _p_cell(t: dict[str, Any], up: bool) -> str:
    if "p_holm" not in t:
        return "–"
    return f"{fmt_p(t['p'])} / {fmt_p(t['p_holm'])}" + (" *" if t["p_holm"] < ALPHA and up else "")


def task_table(result: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    st = result["settings"]
    window_n = st["save_every"]
    lines = [
        "| step | pairs seen | pref_acc [95% CI] | p sign (raw / Holm) | lik_acc [95% CI] | Δ vs untrained [95% CI] "
        f"| p McNemar (raw / Holm) | lik/tok [95% CI] | Δ [95% CI] | p (raw / Holm) | train loss (last {window_n}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    metrics = {m["step"]: m for m in result["train_metrics"]}
    for r in rows:
        pa, la, lt = r["pref_acc"], r["lik_acc"], r["lik_acc_tok"]
        window = [metrics[s]["loss"] for s in range(max(1, r["step"] - window_n + 1), r["step"] + 1) if s in metrics]
        loss = f"{sum(window) / len(window):.3f}" if window else "–"
        pref = "50 (all ties)" if pa["vs_half"]["ties"] == r["n"] else _ci(pa)
        cells = [
            str(r["step"]),
            str(r["pairs_seen"]),
            pref,
            _p_cell(pa["vs_half"], pa["vs_half"]["wins"] > pa["vs_half"]["losses"]),
            _ci(la),
            f"{la['vs_base']['diff']:+.1f} [{la['vs_base']['diff_ci_low']:+.1f}, {la['vs_base']['diff_ci_high']:+.1f}]",
            _p_cell(la["vs_base"], la["vs_base"]["diff"] > 0),
            _ci(lt),
            f"{lt['vs_base']['diff']:+.1f} [{lt['vs_base']['diff_ci_low']:+.1f}, {lt['vs_base']['diff_ci_high']:+.1f}]",
            _p_cell(lt["vs_base"], lt["vs_base"]["diff"] > 0),
            loss,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(found: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if len(found) > 1 else 1
    nrows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.0 * cols, 4.0 * nrows), squeeze=False)
    for ax, (name, result) in zip(axes.flat, found, strict=False):
        rows = summarize(result)
        steps = [r["step"] for r in rows]
        for key, label, style in (
            ("pref_acc", "pref_acc (implicit reward; 50 = untrained)", "o-"),
            ("lik_acc", "lik_acc: log π(c) > log π(r)", "s--"),
            ("lik_acc_tok", "lik_acc per token", "^:"),
        ):
            acc = [r[key]["acc"] for r in rows]
            low = [0.0 if key == "pref_acc" and r["step"] == 0 else a - r[key]["ci_low"] for a, r in zip(acc, rows)]
            high = [0.0 if key == "pref_acc" and r["step"] == 0 else r[key]["ci_high"] - a for a, r in zip(acc, rows)]
            ax.errorbar(steps, acc, yerr=[low, high], fmt=style, capsize=3, markersize=4, label=label)
        ax.axhline(50, color="grey", linewidth=0.8)
        ax.set_xscale("symlog", linthresh=8, linscale=0.5)
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps], fontsize=7)
        ax.set_xlim(-1, max(steps) * 1.15 + 1)
        ax.set_xlabel(f"optimizer steps ({result['settings']['batch_size']} pairs each)")
        ax.set_ylabel("held-out accuracy (%), 95% Wilson CI")
        state = "" if result.get("finished") else ", running"
        ax.set_title(f"{name} (n = {rows[0]['n']} held-out pairs{state})", fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(found) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results_dir: Path, tasks: list[str]) -> Path:
    """``summary.md`` (a table per task, first significant step) and ``learnability.png`` from the results."""
    found = [
        (t, json.loads((results_dir / f"{t}.json").read_text())) for t in tasks if (results_dir / f"{t}.json").exists()
    ]
    if not found:
        raise SystemExit(f"no results in {results_dir}")
    st = found[0][1]["settings"]
    train_data = (
        "the whole train.json" if st["max_train"] is None else f"the first {st['max_train']} pairs of train.json"
    )
    tqa = "all" if st.get("held_out_truthfulqa") is None else f"the first {st['held_out_truthfulqa']}"
    lines = [
        "# Learnability probe: SeqFT (DPO) held-out preference accuracy against optimizer steps",
        "",
        "Generated by `python bench/learnability.py --report` from the per-task `.json` files beside this one (raw",
        "per-pair log-probs at every evaluation point; every number here can be recomputed from them).",
        "",
        f"Settings: {st['model']} + a fresh LoRA adapter per task (r {st['lora_r']}, alpha {st['lora_alpha']}, "
        f"q_proj/v_proj, the same initial adapter for every task); DPO β {st['beta']}, reference = base model "
        f"(adapter disabled, recomputed per batch); the project's loop (`train_task`): one stage of {st['steps']} "
        f"AdamW steps of {st['batch_size']} pairs, lr {st['lr']}, cosine schedule to 0 with "
        f"{int(0.1 * st['steps'])} warm-up steps, grad-norm clip 1.0, seed {st['seed']}; {st['precision']} autocast "
        f"for training and evaluation; max_length {st['max_length']}, max_prompt_length {st['max_prompt_length']} "
        f"(as configs/real-stream.yaml); train data: {train_data} after the loaders' skips, shuffled by the loop; "
        f"held-out: the first {st['held_out']} pairs of test.json after the loaders' skips (TruthfulQA: {tqa}); one "
        "torch thread; one seed. A point at step s lies inside one run of "
        f"{st['steps']} steps (its learning rate follows that run's schedule), not at the end of an s-step run.",
        "",
        "Columns: `pref_acc` = implicit-reward win rate (ties ½), 95 % Wilson interval, p of the exact two-sided "
        "sign test against ½ (the untrained adapter ties on every pair: 50 by construction); `lik_acc` = rate of "
        "log π(chosen) > log π(rejected) (summed log-probs), Δ = paired difference from the untrained model on the "
        "same pairs [95 % CI], p of the exact two-sided McNemar test; `lik/tok` = the same per token. p-values are "
        "Holm-adjusted over the task's evaluation points (one family per task and test); * = significant at 0.05 "
        "and in the chosen response's favour.",
        "",
    ]
    firsts = []
    total_wall = total_cpu = 0.0
    for name, result in found:
        rows = summarize(result)
        seconds = sum(s.get("seconds", 0.0) for s in result["timing"]["segments"])
        cpu = sum(s.get("cpu_seconds", 0.0) for s in result["timing"]["segments"])
        ref = result["timing"].get("reference_eval_seconds", 0.0)
        total_wall += seconds + ref
        total_cpu += cpu
        loads = [s[k] for s in result["timing"]["segments"] for k in ("load_start", "load_end") if k in s]
        status = "finished" if result.get("finished") else f"in progress (last evaluated step {rows[-1]['step']})"
        zero = next((p for p in result["points"] if p["step"] == 0), {})
        check = zero.get("max_abs_policy_minus_reference")
        lines += [
            f"## {name}",
            "",
            f"{result['data']['held_out_pairs']} held-out pairs, {result['data']['train_pairs']} train pairs; "
            f"{status}; {seconds + ref:.0f} s wall ({cpu:.0f} s CPU after the reference pass) over "
            f"{len(result['timing']['segments'])} invocation(s), load average {min(loads, default=0):.1f}–"
            f"{max(loads, default=0):.1f}."
            + (
                f" Step 0 check: max |log π − log π_ref| = {check:g} (policy = reference)." if check is not None else ""
            ),
            "",
            *task_table(result, rows),
            "",
        ]
        firsts.append(
            (
                name,
                first_significant(rows, "pref_acc", "vs_half"),
                first_significant(rows, "lik_acc", "vs_base"),
                first_significant(rows, "lik_acc_tok", "vs_base"),
                rows[-1]["step"],
                result.get("finished", False),
            )
        )
    lines += [
        "## First evaluation point significantly above the untrained model (Holm-adjusted p < 0.05)",
        "",
        "| task | pref_acc (sign test vs 50) | lik_acc (McNemar) | lik/tok (McNemar) | steps run |",
        "|---|---|---|---|---|",
    ]
    for name, f_pref, f_lik, f_tok, last, finished in firsts:

        def cell(s: int | None, last: int = last) -> str:
            return f"step {s} ({s * st['batch_size']} pairs)" if s is not None else f"not within {last} steps"

        lines.append(
            f"| {name} | {cell(f_pref)} | {cell(f_lik)} | {cell(f_tok)} | {last}{'' if finished else ' (running)'} |"
        )
    lines += [
        "",
        f"Time recorded in the results: {total_wall:.0f} s wall, {total_cpu:.0f} s CPU (one thread; time lost to an "
        "interruption after the last committed checkpoint is not counted).",
        "",
        "![curves](learnability.png)",
        "",
    ]
    plot(found, results_dir / "learnability.png")
    out = results_dir / "summary.md"
    out.write_text("\n".join(lines))
    return out


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=TASKS, choices=TASKS)
    parser.add_argument("--steps", type=int, default=384, help="optimizer steps T of the one stage per task")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every K steps (default: the ladder)")
    parser.add_argument("--held-out", type=int, default=200, help="held-out pairs per task (TruthfulQA: all 83)")
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run into bench/out/learnability-quick")
    parser.add_argument("--report", action="store_true", help="write summary.md and the figure from the results")
    parser.add_argument("--results", type=Path, default=None, help="results folder (default bench/results/...)")
    parser.add_argument("--work", type=Path, default=None, help="checkpoint folder (default bench/out/...)")
    parser.add_argument("--stop-at", type=int, default=None, help="exit after the checkpoint at this step (tests)")
    args = parser.parse_args()
    results_dir = args.results or (QUICK_RESULTS if args.quick else RESULTS)
    if args.report:
        print(report(results_dir, args.tasks).read_text())
        return 0

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    save_every = 2 if args.quick else 8
    steps = 4 if args.quick else args.steps
    settings = {
        "model": "smollm2-135m-instruct",
        "lora_r": 8,
        "lora_alpha": 16,
        "beta": 0.1,
        "lr": 2e-4,
        "batch_size": 4,
        "steps": steps,
        "save_every": save_every,
        "eval_points": eval_points(steps, 2 if args.quick else args.eval_every, save_every),
        "held_out": 8 if args.quick else args.held_out,
        "held_out_truthfulqa": 8 if args.quick else None,
        "max_train": 64 if args.quick else None,
        "max_length": 128,
        "max_prompt_length": 80,
        "precision": "bf16",
        "seed": 42,
        "eval_batch": 8,
        "threads": 1,
    }
    if args.quick:
        settings["quick"] = True
    work_dir = args.work or (QUICK_WORK if args.quick else WORK)
    results_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    sys.path.insert(0, str(REPO / "bench"))
    from _common import machine_report

    logger.info("%s", machine_report())
    logger.info("settings: %s", json.dumps(settings))
    logger.info("lifealign imported from %s", library_provenance())
    started = time.monotonic()
    probe = Probe(settings)
    for name in args.tasks:
        probe.run_task(TASKS.index(name), name, results_dir, work_dir, args.stop_at)
    logger.info("all tasks done in %.0f s (this invocation)", time.monotonic() - started)
    report(results_dir, args.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
