"""The README's usage tour, executed: every ``lifealign`` command of its tour runs, in order, sized down with
overrides on the tiny model (fewer steps, pairs and bootstrap replicates; ``runs/`` in a temporary folder).

The two commands of the quick start (``make demo``, ``make test``) are not run here: ``make test`` is what runs this
test, and ``make demo`` is timed in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from lifealign.cli.main import main
from lifealign.config import load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SIZED = ["model.name_or_path=tiny", "data.max_length=96", "data.max_prompt_length=48", "train.max_steps=1"]
SIZED += ["sft.max_steps=1", "eval.max_examples=4", "eval.generation_examples=2", "eval.max_new_tokens=4"]
SIZED += ["eval.n_boot=100", "eval.drift=false", "unlearn.inner_max_steps=1", "unlearn.rounds=1"]


def tour_commands() -> list[str]:
    """The ``lifealign ...`` lines of the README's "Usage tour" code block, comments removed."""
    section = README.read_text().split("## Usage tour", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("lifealign ")]


def sized_down(command: str, runs: Path) -> list[str]:
    """``argv`` for ``main``: ``runs/`` under ``runs``, the tiny model, and small sizes for every task."""
    argv = shlex.split(command)[1:]
    argv = [str(runs / a[len("runs/") :]) if a.startswith("runs/") else a for a in argv]
    argv = ["tiny" if a == "smollm2-135m-instruct" else a for a in argv]
    config = next((a for a in argv if a.endswith(".yaml")), None)
    if config is None or argv[0] == "data":
        return argv
    cfg = load_config(REPO / config, [a for a in argv if "=" in a and not a.startswith("-")])
    sizes = [f"tasks.{i}.max_train=8" for i in range(len(cfg.tasks))] + [
        f"tasks.{i}.max_test=4" for i in range(len(cfg.tasks))
    ]
    if len(cfg.methods) > 3:  # a comparison of every baseline: three of its methods show the same machinery
        keep = [m.model_dump(mode="json") for m in cfg.methods if m.name in ("seqft", "er", "lifealign")]
        sizes.append(f"methods={json.dumps(keep)}")
    at = argv.index(config) + 1  # right after the config: a trailing `--resume` takes an optional value
    return [*argv[:at], *SIZED, *sizes, *argv[at:]]


def test_the_tour_lists_the_commands_a_new_user_needs():
    subcommands = {shlex.split(c)[1] for c in tour_commands()}
    assert {"train", "eval", "run", "report", "data", "unlearn"} <= subcommands


@pytest.mark.slow
def test_every_command_of_the_readme_tour_works(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the shipped configs name data paths relative to the repository
    runs = tmp_path / "runs"
    for command in tour_commands():
        AcceleratorState._reset_state(reset_partial_state=True)  # each command is its own process in a shell
        argv = sized_down(command, runs)
        assert main(argv) == 0, f"{command}\n{capsys.readouterr().err}"
    out = capsys.readouterr().out
    assert re.search(r"\| TruthfulQA \| 4 \|", out)  # eval prints the pairs behind its scores
    assert (runs / "tiny-seeds" / "seed-3" / "scores.json").exists() and (runs / "compare" / "report.md").exists()
    extended = load_config(runs / "tiny" / "config.yaml")
    assert [t.name for t in extended.tasks][-1] == "safety"  # the appended task joined the finished stream
