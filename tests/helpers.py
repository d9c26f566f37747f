"""Shared builders for loop/runner tests: small configs on the tiny model and the synthetic suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lifealign.config import RunConfig, config_from_dict

SYNTHETIC_TASKS = ("arithmetic", "capitals", "support", "safety")


def synthetic_tasks(n_tasks: int = 2, max_train: int = 16, max_test: int = 8) -> list[dict[str, Any]]:
    """Task entries for the first ``n_tasks`` synthetic tasks, each training and testing on its own generator."""
    return [
        {"name": n, "train": f"synthetic:{n}", "test": f"synthetic:{n}", "max_train": max_train, "max_test": max_test}
        for n in SYNTHETIC_TASKS[:n_tasks]
    ]


def tiny_config(tmp_path, n_tasks: int = 2, **sections: Any) -> RunConfig:
    """A tiny-model stream over the first ``n_tasks`` synthetic tasks; ``sections`` override top-level keys."""
    data: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "tiny"},
        "data": {"max_length": 96, "max_prompt_length": 48},
        "tasks": synthetic_tasks(n_tasks),
        "method": {"name": "seqft", "loss": {"name": "dpo", "beta": 0.1}},
        "train": {"lr": 1e-3, "max_steps": 4, "batch_size": 4, "save_every": 2, "progress": False},
        "eval": {"scorers": ["pref_acc"], "max_examples": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


def perturb_lora_b(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every ``lora_B`` N(0, std²) values (peft starts it at 0, which makes the adapter a no-op)."""
    from lifealign.models.lora import lora_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora_parameters(model).items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


REPO = Path(__file__).resolve().parents[1]


def run_lifealign(args: list[str], fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m lifealign ARGS`` from the repository root, offline, with ``LIFEALIGN_FAULT`` set to ``fault`` only."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LIFEALIGN_FAULT", None)
    if fault:
        env["LIFEALIGN_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "lifealign", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
