"""ELDeR under ``accelerate launch`` (data parallel): same global batch, same selection as one process?

    python -m prune.bench.elder_accelerate [processes=1,2] [hydra overrides ...]
    python -m prune.bench.elder_accelerate processes=1,2 model=tiny_llama ratio=0.5

For each process count the driver runs this module as a worker: one process directly, N processes through
``accelerate launch --multi_gpu --num_processes N`` (on a machine without GPUs ``ACCELERATE_USE_CPU=true``
makes that N CPU processes on the gloo backend; see docs/accelerate.md). Every worker prunes the same model
with the same calibration windows and ``method.grad_accum`` micro-batches per step split across processes,
and rank 0 writes the plan. The driver prints one JSON object: per process count the selected layers, the
per-round scales, the stage losses and a weight checksum after stage 2, plus the largest differences.
Defaults: ``method=elder ratio=0.25`` with a short CPU schedule (overridable).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULTS = ["method=elder", "ratio=0.25", "logger=none", "method.progress=false",
            "method.seqlen=256", "method.batch_size=1", "method.grad_accum=2",
            "method.stage1_steps_per_round=2", "method.stage2_steps=2"]


def worker(out: Path, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import set_seed

    import prune  # noqa: F401  (resolvers)
    from prune.data.calibration import build_calibration
    from prune.models.adapter import adapter_for
    from prune.models.load import load_model_and_tokenizer
    from prune.paths import PACKAGE_ROOT

    with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    set_seed(cfg.seed)
    loaded = load_model_and_tokenizer(cfg.model)
    calib = build_calibration(loaded.tokenizer, **cfg.calib)
    method = instantiate(cfg.method)
    t0 = time.perf_counter()
    plan = method.prune(adapter_for(loaded.model), calib, cfg.ratio)
    wall = time.perf_counter() - t0
    if plan.info.get("processes", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    checksum = sum(p.detach().double().abs().sum().item() for p in loaded.model.parameters())
    s2 = plan.info.get("stage2_curves", {})
    out.write_text(json.dumps({
        "processes": plan.info.get("processes", 1), "drop_layers": plan.drop_layers,
        "selection_order": plan.info.get("selection_order"), "global_batch": plan.info.get("global_batch"),
        "round_scales": [r["scales"] for r in plan.info.get("rounds", [])],
        "stage1_ce": plan.info.get("stage1_curves", {}).get("ce"), "stage2_ce": s2.get("ce"),
        "stage2_reg": s2.get("reg"), "weight_abs_sum": checksum, "prune_s": wall,
        "time_stage1_s": plan.info.get("time_stage1_s"), "time_stage2_s": plan.info.get("time_stage2_s"),
    }))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(n: int, out: Path, overrides: list[str]) -> None:
    me = [sys.executable, "-m", "prune.bench.elder_accelerate", "worker", f"out={out}", *overrides]
    if n == 1:
        cmd, env = me, dict(os.environ)
    else:
        import torch

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "prune.bench.elder_accelerate", "worker",
               f"out={out}", *overrides]
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"  # N CPU processes, gloo backend
        env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run(cmd, env=env, check=True)


def _max_diff(a: Any, b: Any) -> float:
    if a is None or b is None:
        return 0.0
    if isinstance(a, list):
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return abs(float(a) - float(b))


def main(argv: list[str]) -> dict[str, Any]:
    if argv and argv[0] == "worker":
        out = Path(argv[1].split("=", 1)[1])
        worker(out, argv[2:])
        return {}
    counts = [1, 2]
    overrides = []
    for a in argv:
        if a.startswith("processes="):
            counts = [int(x) for x in a.split("=", 1)[1].split(",")]
        else:
            overrides.append(a)
    overrides = DEFAULTS + overrides  # later overrides win
    results: dict[str, Any] = {"overrides": overrides, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = Path(tmp) / f"n{n}.json"
            _launch(n, out, overrides)
            results["runs"][n] = json.loads(out.read_text())
    runs = list(results["runs"].values())
    ref = runs[0]
    results["same_selection"] = all(r["selection_order"] == ref["selection_order"] for r in runs)
    results["max_scale_diff"] = max(_max_diff(r["round_scales"], ref["round_scales"]) for r in runs)
    results["max_stage2_ce_diff"] = max(_max_diff(r["stage2_ce"], ref["stage2_ce"]) for r in runs)
    results["max_weight_checksum_rel_diff"] = max(
        abs(r["weight_abs_sum"] - ref["weight_abs_sum"]) / ref["weight_abs_sum"] for r in runs)
    return results


if __name__ == "__main__":
    result = main(sys.argv[1:])
    if result:
        print(json.dumps(result, indent=2))
