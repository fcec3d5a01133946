"""Speed measurement in a fresh process (``SpeedEvaluator(subprocess=True)``).

The parent saves the model (``save_pretrained``, safetensors) to a temporary directory and runs

    python -m prune.eval.speed_child --model-dir DIR --request JSON

where the request carries the protocol records (`Protocol.to_json`), warm-up, seed, device, dtype and
thread count. The child loads the model, runs `measure` and prints its metrics and environment on one line
prefixed ``PRUNE_SPEED_RESULT``; anything else on stdout (library chatter) is ignored by the parent. A fresh
process keeps the cells of a sweep from disturbing each other (allocator state, caches, memory high-water
marks).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prune.eval.speed_protocols import Measurement, Protocol, measure, model_device_dtype

log = logging.getLogger(__name__)

RESULT_PREFIX = "PRUNE_SPEED_RESULT "


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def measure_in_subprocess(model: Any, protocols: Sequence[Protocol], warmup: int, seed: int) -> Measurement:
    """`measure` run on a saved copy of ``model`` in a child process: its metrics and environment."""
    device, dtype = model_device_dtype(model)
    request = {
        "protocols": [p.to_json() for p in protocols],
        "warmup": warmup,
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        # Same thread count as the parent, so in-process and subprocess CPU numbers compare.
        "num_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(prefix="prune-speed-") as tmp:
        model.save_pretrained(tmp)
        command = [sys.executable, "-m", "prune.eval.speed_child", "--model-dir", tmp,
                   "--request", json.dumps(request)]
        proc = subprocess.run(command, capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"speed subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    log.debug("speed subprocess stderr:\n%s", proc.stderr[-4000:])
    result = _parse_child_output(proc.stdout)
    return {k: float(v) for k, v in result["metrics"].items()}, result["env"]


def _child_env() -> dict[str, str]:
    """Environment for the child: make this checkout's ``prune`` importable even if not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # .../prune/eval/speed_child.py -> repo root
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _parse_child_output(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"speed subprocess printed no result line; stdout tail:\n{stdout[-2000:]}")


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------
def _load_model(model_dir: str, device: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device.startswith("cuda"):
        kwargs["device_map"] = device  # load straight onto the GPU, not via host memory
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.to(device) if not device.startswith("cuda") else model


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: load a saved model, measure it, print one JSON result line."""
    try:
        # Registers the project's custom (pruned) model types with the Auto classes, if any.
        import prune  # noqa: F401
    except ImportError:
        pass
    parser = argparse.ArgumentParser(description="Measure inference speed of a saved causal LM.")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--request", required=True,
                        help="JSON: protocols (Protocol fields), warmup, seed, device, dtype, num_threads")
    args = parser.parse_args(argv)
    request = json.loads(args.request)

    if request.get("num_threads"):
        torch.set_num_threads(int(request["num_threads"]))
    model = _load_model(args.model_dir, request.get("device", "cpu"), request.get("dtype", "float32"))
    protocols = [Protocol.from_json(p) for p in request["protocols"]]
    metrics, env = measure(model, protocols, warmup=request["warmup"], seed=request["seed"])
    print(RESULT_PREFIX + json.dumps({"metrics": metrics, "env": env}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
