"""The run recipe, top to bottom: load -> calibrate -> plan -> surgery -> [RFT] -> evaluate -> record.

RFT (recovery fine-tuning, ``rft=lora|lora_llm_pruner|lora_trsp|full``, `prune.rft`) trains the pruned
model after surgery; its metrics are today's keys, the model before RFT is evaluated too (``pre_rft/<key>``,
``rft.eval_before``) and its cost is recorded (``time/rft_s``, ``mem/rft_peak_gb``, ``rft/tokens``, GPU-hours
on GPU). ``rft=none`` (the default) changes nothing.

`run` is what ``run.py`` calls for every Hydra cell. ``results.json`` in the cell's directory is written
last and atomically; a cell whose ``results.json`` exists is skipped unless ``force=true``, and only if it
ran the same configuration (its ``config_digest``, `prune.results.config_digest`): another one is refused.
One process at a time works in a cell's directory (`prune.store.directory_lock`; a second one waits up to
``PRUNE_CELL_LOCK_WAIT_S`` seconds, default ``LOCK_WAIT_S``, then refuses). The experiment logger never
decides a cell's fate (`prune.tracking.guarded`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from prune import plots, provenance, results, rft, tracking
from prune.data.calibration import build_calibration
from prune.eval.memory import PeakMemory
from prune.eval.params import count_params, removed_fraction, sparsity
from prune.models import surgery
from prune.models.adapter import ModelAdapter, adapter_for
from prune.models.load import LoadedModel, load_model_and_tokenizer
from prune.store import atomic_target, digest, directory_lock
from prune.types import PrunePlan
from prune.validate import check_config, check_loaded_model

log = logging.getLogger(__name__)

# How long a second process on a busy cell waits for the first before refusing: long enough for a preempted
# job's dying process to let go, far shorter than a cell. PRUNE_CELL_LOCK_WAIT_S in the environment wins.
LOCK_WAIT_S = 30.0


def run(cfg: DictConfig) -> float | None:
    """Prune and evaluate one cell, holding its directory's lock; returns the headline metric (WikiText-2
    PPL) for sweepers. Bad values fail first (`prune.validate.check_config`), before the lock and the skip."""
    check_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with _cell_lock(run_dir):
        return _run_cell(cfg, run_dir)


def _cell_lock(run_dir: Path) -> AbstractContextManager[None]:
    """The cell directory's lock. The processes of one ``accelerate launch`` (torchrun sets ``RANK``) are one
    cell: rank 0 holds the lock for them all, the others would only wait for their own rank 0."""
    if int(os.environ.get("RANK", "0")) != 0:
        return nullcontext()
    return directory_lock(run_dir, wait_s=float(os.environ.get("PRUNE_CELL_LOCK_WAIT_S", LOCK_WAIT_S)))


def _run_cell(cfg: DictConfig, run_dir: Path) -> float | None:
    """The cell under its lock: skip it (finished, same configuration), refuse it (finished, another
    configuration), or prune, evaluate and record it."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the summary
    done = run_dir / results.RESULTS
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    if done.exists() and not cfg.force:
        finished = json.loads(done.read_text())
        results.check_same_cell(finished, config, done)
        if not cfg.save or (run_dir / "model").is_dir():
            print(f"skip: {done} exists (force=true to redo)")
            return finished["metrics"].get("ppl/wikitext2")
    method = instantiate(cfg.method)
    choices = dict(HydraConfig.get().runtime.choices)
    logger = _make_logger(cfg, choices, run_dir)
    exit_code, loaded = 1, None
    try:
        set_seed(cfg.seed)
        set_determinism(bool(cfg.deterministic))
        started = time.perf_counter()
        loaded = load_model_and_tokenizer(cfg.model)
        check_loaded_model(cfg, loaded.model, method.needs_calibration)
        adapter = adapter_for(loaded.model)
        evaluators = selected_evaluators(cfg.eval)
        dense_metrics = _dense_metrics(loaded, evaluators, cfg)
        calib = build_calibration(loaded.tokenizer, **cfg.calib) if method.needs_calibration else None
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            plan = method.prune(adapter, calib, cfg.ratio)
            surgery.apply(adapter, plan)
            prune_s = time.perf_counter() - t0
        metrics: dict[str, Any] = count_params(adapter)
        metrics |= removed_fraction(dense_metrics, metrics)
        metrics |= sparsity(adapter)  # zeros (a unit apart): sparse methods remove nothing
        metrics |= {"layers/total": adapter.num_layers(), "layers/removed": len(plan.drop_layers),
                    "time/prune_s": prune_s, "mem/prune_peak_gb": peak.peak_gb}
        rft_options = rft.parse_options(cfg.get("rft"))
        recovered = _recover(cfg, rft_options, loaded, adapter, evaluators, plan, run_dir)
        if plan.is_empty() and rft_options.kind == "none":  # the dense model: reuse its cached evaluation
            metrics |= {k: v for k, v in dense_metrics.items() if not k.startswith("params/")}
        else:
            for evaluator in evaluators.values():
                metrics |= evaluator(loaded.model, loaded.tokenizer)
        metrics |= results.derived_metrics(dense_metrics, metrics, prune_s)
        metrics |= recovered.metrics
        if cfg.save:
            _save_model(loaded, run_dir / "model")
            _save_compressed(adapter, plan, run_dir)
        plan_json = plan.save(run_dir)  # prune_plan.json, and prune_plan.safetensors if it has tensors
        record = {
            "status": "complete", "wall_s": time.perf_counter() - started, "metrics": metrics,
            "dense_metrics": dense_metrics, "plan": plan_json,
            "quality_flags": plan.info.get("quality_flags", []),
            **({"rft": recovered.info} if recovered.info else {}),
            "metric_config": {k: e.describe() for k, e in evaluators.items()}
            | {"mem": peak.kind, "dense_speed": cfg.dense_speed},
            "config": config, "config_digest": results.config_digest(config), "choices": choices,
            "provenance": provenance.manifest() | {"model": loaded.provenance,
                                                   "calibration": calib.info if calib else None},
        }
        results.write_json_atomic(done, record)
        plot_files = plots.write_plots(Path(cfg.paths.outputs_root) / cfg.experiment_name)
        _log_run(logger, record, run_dir, plot_files)
        print("\n".join(results.summary_lines(record) + _rft_lines(record)) + f"\nresults: {done}")
        exit_code = 0
        return metrics.get("ppl/wikitext2")
    finally:
        logger.finish(exit_code)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _recover(cfg: DictConfig, options: rft.RftOptions, loaded: LoadedModel, adapter: ModelAdapter,
             evaluators: dict[str, Any], plan: PrunePlan, run_dir: Path) -> rft.RftResult:
    """The RFT stage: the pruned model's metrics before it (``pre_rft/<key>``, when ``rft.eval_before``),
    then the training (`prune.rft.recover`, in place), whose cost metrics it returns with them."""
    if options.kind == "none":
        return rft.RftResult({}, {})
    before: dict[str, Any] = {}
    t0 = time.perf_counter()
    if options.eval_before:
        for evaluator in evaluators.values():
            before |= evaluator(loaded.model, loaded.tokenizer)
    eval_before_s = time.perf_counter() - t0
    # the checkpoint key: a checkpoint of another model or plan is never resumed
    identity = {"model": loaded.key, "plan": digest(plan.to_json())}
    preset = OmegaConf.select(cfg, "model.preset.name", default=None)
    result = rft.recover(adapter, loaded.tokenizer, options, checkpoint_dir=run_dir, identity=identity,
                         preset=preset)
    pre = {f"pre_rft/{k}": v for k, v in before.items()}
    if options.eval_before:
        pre["time/rft_eval_before_s"] = eval_before_s
    return rft.RftResult(pre | result.metrics, result.info)


def _rft_lines(record: dict[str, Any]) -> list[str]:
    """The RFT stage in the summary: the recipe, perplexity before and after, and what it cost."""
    info, m = record.get("rft"), record["metrics"]
    if not info:
        return []
    before, after = m.get("pre_rft/ppl/wikitext2"), m.get("ppl/wikitext2")
    ppl = f"ppl/wikitext2 {before:.4g} -> {after:.4g}, " if before is not None and after is not None else ""
    preset = f" [preset {info['preset']}]" if info.get("preset") else ""
    return [f"rft {info['recipe']}{preset}: {ppl}{info['steps']} steps, {info['tokens']} tokens, "
            f"{m['time/rft_s']:.1f} s, peak {m['mem/rft_peak_gb']:.2f} GB"]


def set_determinism(on: bool) -> None:
    """``deterministic=true``: deterministic CUDA kernels, so that same-seed GPU runs repeat (slower).
    An op with no deterministic version warns instead of failing. CUBLAS_WORKSPACE_CONFIG only takes effect
    when set before the process's first cuBLAS call, which is why it is set here, before the model loads.

    The fused attention kernels (flash, memory-efficient, cuDNN) are switched off too: their backward passes
    accumulate with atomics, and under ``warn_only`` they would only warn. On an H100, with them on, two
    same-seed ELDeR runs had stage-1 scales ~5e-4 apart; with them off, they were bit-identical
    (experiments/reference_gpu). The math kernel in their place is deterministic, slower, and keeps the
    T x T attention matrix."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    cuda = torch.backends.cuda
    for enable_fused in (cuda.enable_flash_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_cudnn_sdp):
        enable_fused(not on)


def _make_logger(cfg: DictConfig, choices: dict[str, Any], run_dir: Path) -> tracking.Logger:
    """The cell's logger, opened before the work so that training loops log live curves; its failures are
    warnings (`tracking.guarded`), and its wait for a server is bounded (`tracking.INIT_TIMEOUT_S`)."""
    if cfg.logger is None or cfg.logger.get("kind") == "none":
        return tracking.NullLogger()
    name = f"{cfg.model.name}-{choices.get('method')}-r{cfg.ratio}"
    tags = [f"{group}:{choice}" for group, choice in choices.items()
            if choice and not group.startswith("hydra") and group != "logger"]
    return tracking.guarded(lambda: tracking.WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.get("entity"), mode=cfg.logger.mode,
        group=cfg.experiment_name, name=name, tags=tags,
        config=OmegaConf.to_container(cfg, resolve=True), run_dir=run_dir,  # type: ignore[arg-type]
    ))


def _dense_metrics(loaded: LoadedModel, evaluators: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """The dense reference; with dense_speed=per_cell its speed comes from this cell, before surgery."""
    dense, evaluated_now = _dense_reference(loaded, evaluators, cfg)
    if cfg.dense_speed != "per_cell" or "speed" not in evaluators:
        return dense
    if evaluated_now:  # the reference was just measured in this process: measuring again adds nothing
        log.info("the dense model's speed in this cell: the dense evaluation just run (dense_speed=per_cell)")
        return dense
    log.info("measuring the dense model's speed in this cell (dense_speed=per_cell)")
    return dense | evaluators["speed"](loaded.model, loaded.tokenizer)


def _dense_reference(loaded: LoadedModel, evaluators: dict[str, Any],
                     cfg: DictConfig) -> tuple[dict[str, Any], bool]:
    """The dense model's parameter counts and (cached per model and eval config) evaluation metrics, and
    whether they were evaluated now rather than read from the cache."""
    dense: dict[str, Any] = count_params(adapter_for(loaded.model))
    if not cfg.dense_reference or not evaluators:
        return dense, False
    path = results.dense_cache_path(loaded.key, OmegaConf.to_container(cfg.eval, resolve=True))
    if path.is_file() and not cfg.force:
        return dense | json.loads(path.read_text())["metrics"], False
    log.info("evaluating the dense model once (cached at %s)", path)
    metrics: dict[str, Any] = {}
    for evaluator in evaluators.values():
        metrics |= evaluator(loaded.model, loaded.tokenizer)
    results.write_json_atomic(path, {"metrics": metrics, "model": loaded.provenance})
    return dense | metrics, True


def selected_evaluators(eval_cfg: DictConfig) -> dict[str, Any]:
    """The evaluators the eval config selects. An entry without ``_target_`` holds settings of an evaluator
    the config does not select (``experiment=table2 eval=ppl``: the table's zero-shot tasks): none to run."""
    return {name: instantiate(node) for name, node in eval_cfg.items()
            if name != "name" and isinstance(node, DictConfig) and "_target_" in node}


def _save_model(loaded: LoadedModel, target: Path) -> None:
    """save_pretrained (safetensors) into a temporary directory of this process, then rename into place."""
    with atomic_target(target) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)


def _save_compressed(adapter: Any, plan: Any, run_dir: Path) -> None:
    """An N:M-sparse plan also gets ``model_compressed/``, the compressed-tensors checkpoint vLLM serves
    (`prune.models.sparse_export`); the dense ``model/`` is the one that loads anywhere."""
    from prune.models.sparse_export import n_m_structure, save_compressed

    if n_m_structure(plan) is not None:
        with atomic_target(run_dir / "model_compressed") as tmp:
            save_compressed(adapter, plan, run_dir / "model", tmp)


def _log_run(logger: tracking.Logger, record: dict[str, Any], run_dir: Path, plot_files: list[Path]) -> None:
    """The cell's metrics, plan and the sweep's figures. ``cell/method`` (the method with the cell's
    ``method.*`` overrides and RFT recipe: ``blockpruner[search=false]``, ``shortgpt[rft=lora]``),
    ``cell/ratio`` and ``cell/achieved_ratio`` (parameters removed, a fraction) go into the summary and the
    run config too, so that a W&B panel can plot any metric against the achieved ratio, grouped by method
    (README, "W&B dashboard")."""
    flat = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))}
    flat |= {f"dense/{k}": v for k, v in record["dense_metrics"].items() if isinstance(v, (int, float))}
    variant = tracking.method_overrides()
    recipe = record.get("choices", {}).get("rft")
    if recipe not in (None, "none"):  # as the tables label it: shortgpt[rft=lora_trsp]
        variant = [*variant, f"rft={recipe}"]
    method = record["plan"]["method"] + (f"[{','.join(variant)}]" if variant else "")
    cell = {"cell/method": method, "cell/ratio": record["config"]["ratio"],
            "cell/achieved_ratio": record["metrics"].get("params/removed_frac")}
    logger.log_metrics(flat | cell)  # type: ignore[arg-type]  # W&B summaries take strings too
    run = getattr(logger, "run", None)  # a W&B logger: its config is what W&B's "Group by" offers
    if run is not None:
        run.config.update(cell, allow_val_change=True)
    plan = record["plan"]
    if plan["drop_layers"]:
        logger.log_table("plan/removed_layers", ["layer"], [[i] for i in plan["drop_layers"]])
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"plan-{run_dir.name}")[:120]  # W&B artifact name rules
    logger.log_file(run_dir / "prune_plan.json", name=safe_name, kind="prune_plan")
    logger.log_images({f"plots/{p.stem}": p for p in plot_files})
