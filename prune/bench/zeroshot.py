"""Zero-shot evaluation time: stock lm-eval's own path against ours, same task and items, one process.

    python -m prune.bench.zeroshot                              # embedded model, PIQA, 300 items
    python -m prune.bench.zeroshot task=arc_easy limit=200 stock_batch=8 model=tiny_llama
    python -m prune.bench.zeroshot batches=8,16,32,64           # ours only, at several batch sizes

Stock: ``lm_eval.simple_evaluate(model="hf", model_args=pretrained=<dir>)`` on the model saved to a
temporary directory (what a user of lm-eval runs), at ``stock_batch`` (``auto``: lm-eval's own search for
the largest batch that fits, which on a CPU settles on its 64-item ceiling). Ours: `ZeroShotEvaluator` on
the in-memory model at its default batch size (``auto``: lm-eval's search on GPU, `CPU_BATCH_SIZE` on a
CPU). Both read the bundled copy of the task (offline). Prints both times, their ratio (stock / ours: > 1
means ours is faster) and both accuracies, which must be identical. Goal: ratio >= 1.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Any

import torch
from hydra import compose, initialize_config_dir

import prune  # noqa: F401  (resolvers)
from prune.eval.zeroshot import TASKS, TASKS_DIR, ZeroShotEvaluator, quiet_custom_dataset_hint
from prune.models.load import load_model_and_tokenizer
from prune.paths import PACKAGE_ROOT


def _batch(value: str) -> int | str:
    return value if value == "auto" else int(value)


def stock_lm_eval(model_dir: str, task: str, limit: int, batch: int | str) -> tuple[float, float]:
    """(seconds, primary accuracy) of lm-eval's stock path loading the saved model itself."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    spec = TASKS[task]
    t0 = time.perf_counter()
    with quiet_custom_dataset_hint():
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": model_dir, "dtype": "float32"},
            tasks=[spec.lm_eval_name("bundled")], limit=limit, batch_size=batch, bootstrap_iters=0,
            device="cuda" if torch.cuda.is_available() else "cpu",
            task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False), log_samples=False)
    seconds = time.perf_counter() - t0
    return seconds, float(out["results"][spec.lm_eval_name("bundled")][f"{spec.primary},none"])


def ours(model: Any, tokenizer: Any, task: str, limit: int, batch: int | str) -> tuple[float, float]:
    """(seconds, primary accuracy) of `ZeroShotEvaluator` on the in-memory model."""
    evaluator = ZeroShotEvaluator(tasks=[task], source="bundled", limit=limit, batch_size=batch)
    t0 = time.perf_counter()
    metrics = evaluator(model, tokenizer)
    return time.perf_counter() - t0, metrics[f"zs/{task}/{TASKS[task].primary}"]


def main(argv: list[str]) -> dict[str, Any]:
    opts = dict(a.split("=", 1) for a in argv)
    task, limit = opts.pop("task", "piqa"), int(opts.pop("limit", 300))
    stock_batch, our_batch = _batch(opts.pop("stock_batch", "auto")), _batch(opts.pop("batch", "auto"))
    sweep = [_batch(b) for b in opts.pop("batches").split(",")] if "batches" in opts else None
    with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{k}={v}" for k, v in opts.items()])
    loaded = load_model_and_tokenizer(cfg.model)
    report: dict[str, Any] = {"model": cfg.model.name, "task": task, "items": limit,
                              "threads": torch.get_num_threads(),
                              "device": str(next(loaded.model.parameters()).device)}
    if sweep:
        runs = {b: ours(loaded.model, loaded.tokenizer, task, limit, b) for b in sweep}
        report["ours"] = {str(b): {"s": round(s, 1), "acc": acc} for b, (s, acc) in runs.items()}
        return report
    with tempfile.TemporaryDirectory() as model_dir:
        loaded.model.save_pretrained(model_dir)
        loaded.tokenizer.save_pretrained(model_dir)
        stock_s, stock_acc = stock_lm_eval(model_dir, task, limit, stock_batch)
    our_s, our_acc = ours(loaded.model, loaded.tokenizer, task, limit, our_batch)
    report |= {"stock": {"batch": stock_batch, "s": round(stock_s, 1), "acc": stock_acc},
               "ours": {"batch": our_batch, "s": round(our_s, 1), "acc": our_acc},
               "ratio_stock_over_ours": round(stock_s / our_s, 2), "same_accuracy": stock_acc == our_acc}
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
