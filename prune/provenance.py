"""The provenance manifest written into every ``results.json``."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "lm_eval", "hydra-core", "omegaconf", "wandb", "datasets", "gguf",
            "accelerate")


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
    """Git state of the code this process imported; package versions and the machine at the time of the
    call."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **_GIT_AT_IMPORT,
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
    }


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of the weights: the config; name, shape, dtype, 64 strided values of each tensor."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "architectures")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]
