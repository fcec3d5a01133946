"""The provenance manifest written into every ``results.json``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "lm_eval", "hydra-core", "omegaconf", "wandb", "datasets", "gguf", "accelerate")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(status) if status is not None else None}


# Taken when the package is imported, not when a result is written: a sweep that runs for hours imports its
# code once, and commits made while it runs must not be credited with its results.
_GIT_AT_IMPORT = _git_state()


def manifest() -> dict[str, Any]:
    """Git state of the code this process imported; package versions and the machine at the time of the call."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **_GIT_AT_IMPORT,
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
    }
