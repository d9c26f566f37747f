"""The newer rivals (LwF, I-LoRA/EMA, continual LoRA merging) through the command line on the shipped tiny stream:
each completes, is killed with SIGKILL mid-stage and resumes to the same adapter and scores, and appears in
scores.json and report.md under its name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_lifealign

PLUGINS = {
    "lwf": "[{name: lwf, lam: 1.0, temperature: 2.0}]",
    "ema": "[{name: replay, buffer_size: 100, fraction: 0.2}, {name: ema, decay: 0.25, lam: 1.0}]",
    "merge": "[{name: merge, method: ties, density: 0.2}]",
}


def _run(name: str, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    overrides = [f"method.name={name}", "method.loss={name: dpo, beta: 0.1}", f"method.plugins={PLUGINS[name]}"]
    return run_lifealign(
        ["run", "configs/tiny-stream.yaml", "--out", str(out), *extra, *overrides], fault=fault, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_new_baseline_completes_resumes_after_sigkill_and_is_reported(tmp_path, name):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    done = _run(name, ref)
    assert done.returncode == 0, done.stderr[-3000:]
    crash = _run(name, killed, fault="kill:point=step,task=1,stage=pref,step=3")
    assert crash.returncode == -9, crash.stderr[-3000:]
    resumed = _run(name, killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scores = json.loads((ref / "scores.json").read_text())
    assert json.loads((killed / "scores.json").read_text()) == scores
    assert name in json.dumps(scores)
    assert name in (ref / "report.md").read_text()
