"""Perplexity-evaluation throughput against a bare forward pass of the same model on the same tokens.

    python -m prune.bench.ppl_speed                       # embedded model, 3 windows of 2048 tokens
    python -m prune.bench.ppl_speed model=tiny_llama windows=2

The evaluator's path (decoder + sliced LM head + cross-entropy) is timed against ``model(input_ids)`` (which
builds the full logits and no loss), alternating the two for ``repeats`` rounds; medians are reported.
Goal: ratio (evaluator tok/s / forward tok/s) >= 0.9.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_dir

import prune  # noqa: F401  (resolvers)
from prune.data.sources import load_rows
from prune.data.tokens import encode_cached
from prune.eval.nll import sequence_nll
from prune.eval.perplexity import CONVENTIONS, windows
from prune.models.load import load_model_and_tokenizer
from prune.paths import PACKAGE_ROOT


def main(argv: list[str]) -> dict:
    opts = dict(a.split("=", 1) for a in argv)
    n_windows, repeats = int(opts.pop("windows", 3)), int(opts.pop("repeats", 3))
    with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{k}={v}" for k, v in opts.items()])
    loaded = load_model_and_tokenizer(cfg.model)
    rows, source = load_rows("wikitext2", "test")
    ids = encode_cached(loaded.tokenizer, "\n\n".join(rows))
    batch = torch.stack(windows(ids, CONVENTIONS["seq2048"])[:n_windows])
    device = next(loaded.model.parameters()).device

    def evaluator_pass() -> None:
        for w in batch:
            sequence_nll(loaded.model, w[None].to(device))

    def forward_pass() -> None:
        for w in batch:
            loaded.model(w[None].to(device), use_cache=False)

    timings: dict[str, list[float]] = {"evaluator": [], "forward": []}
    with torch.inference_mode():
        forward_pass()  # warm-up
        for _ in range(repeats):
            for name, fn in (("evaluator", evaluator_pass), ("forward", forward_pass)):
                t0 = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - t0)
    tokens = batch.numel()
    tok_s = {k: tokens / statistics.median(v) for k, v in timings.items()}
    return {
        "model": cfg.model.name, "data": source, "windows": n_windows, "seqlen": 2048, "tokens": tokens,
        "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
        "evaluator_tok_s": round(tok_s["evaluator"], 1), "forward_tok_s": round(tok_s["forward"], 1),
        "ratio": round(tok_s["evaluator"] / tok_s["forward"], 3), "goal": ">= 0.9",
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
