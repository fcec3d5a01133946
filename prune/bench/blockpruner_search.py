"""BlockPruner search: the fast implementation against the plain one (the official loop) on the same data.

    python -m prune.bench.blockpruner_search                          # embedded model, preset below
    python -m prune.bench.blockpruner_search threads=2                # every core of a 2-core machine
    python -m prune.bench.blockpruner_search sequences=4 seqlen=128 steps=12 threads=1
    python -m prune.bench.blockpruner_search model=tiny_llama steps=4

Preset (default): the reference model (SmolLM2-135M, 30 layers = 60 blocks), the first ``sequences``
``seqlen``-token chunks of the BlockPruner Alpaca calibration stream (rows sampled with seed 42,
"\\n\\n"-joined), and ``steps`` greedy steps (24 = 40% of the 60 blocks), ``threads`` threads (default 1;
the fast search gains more from more threads: its stacked layer calls are larger). Both searches run
without the order cache, one after the other in this process, with the same batch size and thread count; the
JSON reports both wall times, the evaluations each made (the fast one counts stopped ones too), the
decoder-layer x sequence forwards each ran, the ratios, and whether the two removal orders and per-step PPLs
are identical. Goal: speed-up >= 4x, identical selection.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import torch
from hydra import compose, initialize_config_dir

import prune  # noqa: F401  (resolvers)
from prune.data.calibration import CalibrationSet, build_calibration
from prune.data.tokens import tensor_hash
from prune.methods.blockpruner import BlockPruner
from prune.models.adapter import adapter_for
from prune.models.load import load_model_and_tokenizer
from prune.paths import PACKAGE_ROOT

DEFAULTS = {"sequences": 2, "seqlen": 64, "steps": 24, "rows": 64, "batch_size": 1, "threads": 1}


def main(argv: list[str]) -> dict:
    opts = dict(a.split("=", 1) for a in argv)
    p = {k: int(opts.pop(k, v)) for k, v in DEFAULTS.items()}
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{k}={v}" for k, v in opts.items()])
    loaded = load_model_and_tokenizer(cfg.model)
    full = build_calibration(loaded.tokenizer, dataset="alpaca", split="train", style="row_chunks",
                             nsamples=p["rows"], seqlen=p["seqlen"], seed=42)
    if len(full) < p["sequences"]:
        raise SystemExit(f"{p['rows']} rows give {len(full)} chunks; raise rows=")
    ids, mask = full.input_ids[: p["sequences"]], full.target_mask[: p["sequences"]]
    calib = CalibrationSet(ids, mask, full.info | {"sequences": len(ids), "tokens_hash": tensor_hash(ids)})
    adapter = adapter_for(loaded.model)
    runs = {}
    for impl in ("plain", "fast"):
        method = BlockPruner(search_impl=impl, num_blocks=p["steps"], batch_size=p["batch_size"], cache=False)
        t0 = time.perf_counter()
        plan = method.prune(adapter, calib, 0.0)
        runs[impl] = {"wall_s": time.perf_counter() - t0, "plan": plan}
    plain, fast = runs["plain"], runs["fast"]
    fs, ps = fast["plan"].info["search_total"], plain["plan"].info["search_total"]
    blocks_total = 2 * adapter.num_layers()
    return {
        "model": cfg.model.name, "device": str(next(loaded.model.parameters()).device),
        "threads": torch.get_num_threads(),
        "preset": f"{len(ids)} x {p['seqlen']}-token Alpaca chunks (BlockPruner row_chunks, seed 42, source "
                  f"{full.info['source']}), {p['steps']} greedy steps = {p['steps'] / blocks_total:.0%} of "
                  f"{blocks_total} blocks, batch_size {p['batch_size']}",
        "plain_wall_s": round(plain["wall_s"], 2), "fast_wall_s": round(fast["wall_s"], 2),
        "speedup": round(plain["wall_s"] / fast["wall_s"], 2),
        "plain_evaluations": ps["evaluations"],
        "fast_evaluations": fs["evaluations"], "fast_evaluations_completed": fs["completed"],
        "fast_evaluations_stopped_early": fs["aborted"],
        "fast_evaluations_stopped_before_any_full_head": fs["bound_stops"],
        "fast_evaluations_with_a_full_head": fs["full_heads"],
        "plain_layer_sequence_passes": ps["layer_passes"],
        "fast_layer_sequence_passes": fs["layer_passes"] + fs["cache_layer_passes"],
        "layer_pass_ratio": round(ps["layer_passes"] / (fs["layer_passes"] + fs["cache_layer_passes"]), 2),
        "identical_selection": plain["plan"].info["removal_order"] == fast["plan"].info["removal_order"],
        "identical_step_ppl": plain["plan"].info["step_ppl"] == fast["plan"].info["step_ppl"],
        "removal_order": fast["plan"].info["removal_order"],
        "step_ppl": [round(x, 3) for x in fast["plan"].info["step_ppl"]],
        "dense_calib_ppl": fast["plan"].info["dense_calib_ppl"],
        "goal": "speedup >= 4, identical_selection",
    }


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", stream=sys.stderr)  # per-step progress on stderr
    logging.getLogger("prune.methods.greedy").setLevel(logging.INFO)  # the search logs its steps
    print(json.dumps(main(sys.argv[1:]), indent=2))
