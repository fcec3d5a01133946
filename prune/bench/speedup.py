"""Measured prefill / decode / throughput speed-ups of a pruned model against its dense model, beside the
ideal (parameter-proportional) speed-up.

    python -m prune.bench.speedup                              # embedded model, ShortGPT at 50% of layers
    python -m prune.bench.speedup method=last_layers ratio=0.25 rounds=3
    python -m prune.bench.speedup model=llama2_7b_shape method=last_layers  # GPU, random weights

Dense and pruned copies live in one process and are measured alternately for ``rounds`` rounds (medians),
so drift of a shared machine hits both alike. The speed protocol is the model's preset
(``model.preset.speed``) or the papers' (SLEB/TRSP prefill 1x2048, BlockPruner decode 128 tokens) when the
model has no preset.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import prune  # noqa: F401  (resolvers)
from prune.data.calibration import build_calibration
from prune.eval.params import count_params
from prune.eval.speed import ideal_speedup, speedups
from prune.models import surgery
from prune.models.adapter import adapter_for
from prune.models.load import load_model_and_tokenizer
from prune.paths import PACKAGE_ROOT

DEFAULTS = {"method": "shortgpt", "ratio": "0.5", "calib.nsamples": "2", "logger": "none"}


def main(argv: list[str]) -> dict:
    opts = dict(a.split("=", 1) for a in argv)
    rounds = int(opts.pop("rounds", 3))
    overrides = {**DEFAULTS, **opts}
    with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{k}={v}" for k, v in overrides.items()])
    loaded = load_model_and_tokenizer(cfg.model)
    dense = loaded.model
    pruned = copy.deepcopy(dense)
    adapter = adapter_for(pruned)
    method = instantiate(cfg.method)
    calib = build_calibration(loaded.tokenizer, **cfg.calib) if method.needs_calibration else None
    plan = method.prune(adapter, calib, cfg.ratio)
    surgery.apply(adapter, plan)
    evaluator = instantiate(cfg.eval.speed)
    runs: dict[str, list[dict[str, float]]] = {"dense": [], "pruned": []}
    for _ in range(rounds):
        for name, model in (("dense", dense), ("pruned", pruned)):
            runs[name].append(evaluator(model, loaded.tokenizer))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    params_dense, params_pruned = (count_params(a)["params/total"] for a in (adapter_for(dense), adapter))
    ideal = ideal_speedup(params_dense, params_pruned)
    measured = speedups(med["dense"], med["pruned"])
    return {
        "model": cfg.model.name, "method": plan.method, "ratio": cfg.ratio,
        "removed_layers": plan.drop_layers,
        "speed_protocol": OmegaConf.to_container(cfg.eval.speed, resolve=True), "rounds": rounds,
        "threads": torch.get_num_threads(), "dense": med["dense"], "pruned": med["pruned"],
        "speedups": measured, "ideal_speedup": round(ideal, 3),
        "fraction_of_ideal": {k: round(v / ideal, 3) for k, v in measured.items()},
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
