"""``lifealign`` command line: argument parsing and error reporting only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from lifealign.training.interrupt import RunInterrupted, install_stop_handlers, restore_handlers

EXIT_USAGE = 2
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 tasks.0.max_train=64")
    p.add_argument("--out", help="output folder (default: the config's output_dir)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        choices=["yes", "auto"],
        help="continue from the newest valid checkpoint (auto: start fresh when there is none)",
    )
    p.add_argument("--strict-resume", action="store_true", help="an invalid newest checkpoint is an error")
    p.add_argument("--allow-config-change", action="store_true", help="resume although the config changed")
    p.add_argument("--no-report", action="store_true", help="skip report.md and the figures")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the output folder")


def build_parser() -> argparse.ArgumentParser:
    import importlib.metadata

    try:
        version = importlib.metadata.version("lifealign")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    parser = argparse.ArgumentParser(
        prog="lifealign",
        description=__doc__,
        epilog="Dotted overrides (key.path=value) may stand anywhere after the subcommand, before or after flags.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="learn a stream of tasks with one or more methods, scoring every task")
    _add_run_args(run)
    run.add_argument("--seeds", type=_seed_list, help="run the stream once per seed, e.g. 1,2,3 (folders seed-<s>/)")
    run.add_argument(
        "--orders", type=int, help="K task orders: the config's, its named orders:, then seeded permutations"
    )
    run.add_argument(
        "--methods",
        type=_name_list,
        help="run only these of the config's methods, e.g. seqft,er (each in its own folder, resumable, addable later)",
    )
    _add_run_args(sub.add_parser("train", help="train one preference task (DPO, IPO, FPO, ...) into a run folder"))
    _add_run_args(sub.add_parser("unlearn", help="U2A: align by unlearning a selected, weighted subset of negatives"))
    ev = sub.add_parser("eval", help="score the base model or a saved adapter on the config's tasks")
    ev.add_argument("config")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--adapter", help="a peft adapter folder (e.g. RUN_DIR/adapter); default: the base model")
    ev.add_argument("--json", action="store_true")
    demo = sub.add_parser("demo", help="SeqFT vs LifeAlign on the offline synthetic suite with SmolLM2-135M")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        default="auto",
        choices=["yes", "auto"],
        help="default auto: a finished or interrupted demo in --out is continued, not redone",
    )
    demo.add_argument("--overwrite", action="store_true", help="redo the demo from scratch in --out")
    report = sub.add_parser("report", help="one table and the figures across run folders")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", help="where report.md goes (default: the first run folder)")
    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser("inspect", help="counts, skipped records by reason and length statistics")
    inspect.add_argument("path")
    inspect.add_argument("--columns", default="", help="column mapping, e.g. query=prompt,good=chosen")
    inspect.add_argument("--model", help="also count tokens with this model's tokenizer (e.g. tiny)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--methods takes comma-separated method names, e.g. seqft,er")
    return names


def _resume_flag(value: str | None) -> bool | str:
    return {"yes": True, "auto": "auto", None: False}[value]


def _cmd_run(args: argparse.Namespace, single_task: bool = False) -> int:
    from lifealign.engine.experiment import run_experiment
    from lifealign.engine.specs import load_run_config
    from lifealign.report.markdown import SCORE_METRICS, summary_table

    cfg = load_run_config(args.config, args.overrides)
    if single_task and len(cfg.tasks) != 1:
        raise ValueError(f"lifealign train takes exactly one task; the config lists {len(cfg.tasks)} (use `run`)")
    scores = run_experiment(
        cfg,
        out_dir=args.out,
        resume=_resume_flag(args.resume),
        strict_resume=args.strict_resume,
        allow_config_change=args.allow_config_change,
        report=not args.no_report,
        seeds=getattr(args, "seeds", None),
        orders=getattr(args, "orders", None),
        overwrite=args.overwrite,
        methods=getattr(args, "methods", None),
    )
    metrics = [m for m in dict.fromkeys(m for by_metric in scores.values() for m in by_metric) if m in SCORE_METRICS]
    print("\n".join(summary_table(scores, metrics, avg=len(metrics) > 1)).replace("\\_", "_"))
    print(f"\nrun folder: {Path(args.out or cfg.output_dir)}")
    return 0


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from lifealign.engine.specs import load_run_config
    from lifealign.engine.unlearn import run_unlearning
    from lifealign.report.unlearn import table_lines

    cfg = load_run_config(args.config, args.overrides)
    result = run_unlearning(cfg, out_dir=args.out, resume=_resume_flag(args.resume), overwrite=args.overwrite)
    print("\n".join(table_lines(result["table"])).replace("\\_", "_"))
    print(f"\nrun folder: {Path(args.out or cfg.output_dir)} (results.json, report.md)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lifealign.engine.experiment import evaluate_adapter
    from lifealign.engine.specs import load_run_config

    results = evaluate_adapter(load_run_config(args.config, args.overrides), args.adapter)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    metrics = list(dict.fromkeys(m for r in results.values() for m in r["scores"]))
    print("| task | pairs | " + " | ".join(metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for task, r in results.items():
        values = " | ".join(f"{r['scores'].get(m, float('nan')):.2f}" for m in metrics)
        print(f"| {task} | {max(r['n'].values(), default=0)} | {values} |")
    if not args.adapter:
        print(
            "\nbase model: pref_acc compares the model with itself (every pair ties: 50 by construction); logp_acc "
            "is log pi(chosen) > log pi(rejected), raw and per token (_norm)"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    args.config = str(DEMO_CONFIG)
    args.strict_resume = False
    args.allow_config_change = False
    args.no_report = False
    if args.overwrite:
        args.resume = None
    return _cmd_run(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from lifealign.report.markdown import write_report

    out = Path(args.out or args.run_dirs[0])
    path = write_report([Path(d) for d in args.run_dirs], out)
    print(path.read_text())
    print(f"\nreport: {path}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from lifealign.data.inspect import format_inspection, inspect_file

    columns = dict(item.split("=", 1) for item in args.columns.split(",") if "=" in item) or None
    tokenizer = None
    if args.model:
        from lifealign.config.schema import ModelSection
        from lifealign.models.load import load_model_and_tokenizer

        _, tokenizer = load_model_and_tokenizer(ModelSection(name_or_path=args.model))
    result = inspect_file(args.path, columns=columns, tokenizer=tokenizer)
    print(json.dumps(result, indent=2) if args.json else format_inspection(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    import re

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    parser = build_parser()
    # Overrides after a flag (`eval CFG --adapter DIR tasks.0.max_test=8`) are left over by argparse, whose
    # positionals are matched once; a left-over key.path=value joins the overrides, in command-line order.
    args, extra = parser.parse_known_args(argv)
    override = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")
    unknown = [a for a in extra if not (hasattr(args, "overrides") and override.match(a))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    for name in ("out", "adapter"):  # `--out=~/runs/x` reaches us unexpanded (the shell expands ~ only at a word start)
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous_handlers = install_stop_handlers()
    commands = {
        "run": _cmd_run,
        "train": lambda a: _cmd_run(a, single_task=True),
        "unlearn": _cmd_unlearn,
        "eval": _cmd_eval,
        "demo": _cmd_demo,
        "report": _cmd_report,
        "data": _cmd_data,
    }
    try:
        return commands[args.command](args)
    except RunInterrupted as exc:
        print(f"\n{exc}; resume with the same command and --resume", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "\ninterrupted; the last committed checkpoint is intact — resume with the same command and --resume",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError | FileNotFoundError) else 1
    finally:
        restore_handlers(previous_handlers)


if __name__ == "__main__":
    sys.exit(main())
