"""Run bookkeeping: the results file, the dense-reference cache and the printed summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prune import quality
from prune.errors import PruneError
from prune.paths import cache_dir
from prune.store import digest, write_json_atomic  # noqa: F401  (write_json_atomic: the runner's name)

RESULTS = "results.json"

# Top-level config keys that never change a cell's numbers, so they stay out of its identity: whether to
# redo or also save it, where it logs and writes, and the sweep's labels (the scale's own keys only name it;
# what it selects reaches the model, method and eval keys, which stay in).
NOT_IDENTITY = ("force", "save", "logger", "paths", "experiment_name", "scale")


def cell_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config less the keys that do not change the result (`NOT_IDENTITY`)."""
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY}


def config_digest(config: dict[str, Any]) -> str:
    """A cell's identity: the digest of its resolved config less `NOT_IDENTITY` (``results.json``'s
    ``config_digest``)."""
    return digest(cell_identity(config))


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ between ``old`` and ``new``, as ``key: old -> new``.

    A key that only one side has is not a difference: it was added to (or dropped from) the config files
    since the old run, and a new key's default keeps the old behaviour, like any other code change (a
    finished cell is not redone when the code changes either)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(old.keys() & new.keys(), key=str)
                for line in differing_keys(old[k], new[k], f"{prefix}{k}.")]
    # lists and tuples compare alike: the stored config went through JSON
    same = _jsonable(old) == _jsonable(new)
    return [] if same else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_same_cell(record: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse to skip (or overwrite) a finished cell that ran another configuration.

    Args:
        record: the cell's existing ``results.json``.
        config: this run's resolved config.
        path: the ``results.json`` file, for the message.

    Raises:
        PruneError: the identities differ in keys both configs have; the message names them and the fix.
    """
    if "config_digest" not in record:  # written before cells recorded their identity: skipped as always
        return
    if record["config_digest"] == config_digest(config):
        return
    changed = differing_keys(cell_identity(record.get("config", {})), cell_identity(config))
    if not changed:  # only keys added or dropped since: the same cell under today's config files
        return
    shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
    raise PruneError(f"{path} holds another configuration ({shown}); pass force=true to redo the cell "
                     "here, or give this run its own directory (hydra.run.dir=..., or hydra.sweep.dir=... "
                     "with -m)")


# Bumped whenever the evaluators add or change metric keys, so that a cached dense evaluation never lacks a
# key that the pruned cells have (2: zero-shot standard errors and item counts).
DENSE_METRICS_VERSION = 2


def dense_cache_path(model_key: str, eval_config: Any) -> Path:
    """Where the dense model's metrics under one evaluation config are cached (computed once per model)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
    key = digest({"eval": eval_config, "metrics_version": DENSE_METRICS_VERSION}, length=16)
    return cache_dir() / "dense" / f"{safe}-{key}.json"


def derived_metrics(dense: dict[str, Any], pruned: dict[str, Any], prune_s: float) -> dict[str, float]:
    """Speed-ups against the dense model, the ideal (parameter-proportional) speed-up, and GPU-hours."""
    from prune.eval.speed import ideal_speedup, speedups

    ideal = ideal_speedup(dense["params/total"], pruned["params/total"])
    out: dict[str, float] = {"speed/ideal_speedup": ideal}
    out |= speedups(dense, pruned)
    if torch.cuda.is_available():
        out["cost/gpu_hours"] = prune_s / 3600 * torch.cuda.device_count()
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _compared(key: str, dense: dict[str, Any], pruned: dict[str, Any]) -> str:
    """One metric, dense beside pruned, in aligned columns."""
    return f"{key:<28} dense {_fmt(dense.get(key, float('nan'))):>9}   pruned {_fmt(pruned[key]):>9}"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A short human-readable account of one run, for the terminal; a run whose method flagged it as not
    converged (`prune.quality`) ends with one warning line naming the fix."""
    cfg, m, dense = results["config"], results["metrics"], results.get("dense_metrics", {})
    plan = results["plan"]
    lines = [f"== {cfg['model']['name']} | {plan['method']} | ratio {cfg['ratio']} ({plan['ratio_unit']}) =="]
    if plan["drop_layers"]:
        lines.append(f"removed layers {plan['drop_layers']}")
    lines.append(
        f"params {m['params/total'] / 1e6:.2f} M "
        f"(dense {dense.get('params/total', m['params/total']) / 1e6:.2f} M): "
        f"{100 * m['params/removed_frac']:.2f}% removed, "
        f"{100 * m['params/removed_frac_non_embedding']:.2f}% of non-embedding"
    )
    if m.get("sparsity/linear", 0) > 0.001:  # zeros, a unit of their own: never counted as removed
        lines.append(f"sparsity {100 * m['sparsity/linear']:.2f}% of the decoder linears' weights zeroed; "
                     f"{m['params/nonzero'] / 1e6:.2f} M non-zero parameters "
                     f"({100 * m['params/nonzero_frac']:.2f}%)")
    described = results.get("metric_config", {}).get("ppl", {}).get("metrics", {})
    for key, spec in described.items():
        preset = f", preset {spec['preset']}" if spec.get("preset") else ""
        label = f"[{spec['convention']}, {spec['slice']}{preset}]"
        lines.append(f"{_compared(key, dense, m)}   {label}")
    shown = ("zs/mean", "zs/mean_stderr", "speed/prefill_ms", "speed/decode_ms", "speed/throughput_tok_s")
    lines += [_compared(k, dense, m) for k in shown if k in m]
    ratios = [f"{k.split('/')[1]} {m[k]:.2f}x" for k in sorted(m) if k.endswith("_speedup") and k in m]
    if any(k.startswith("speed/") and not k.endswith("ideal_speedup") for k in m):
        lines.append("speed-up vs dense: " + ", ".join(ratios))
    lines.append(f"prune time {m['time/prune_s']:.1f} s, peak memory {m['mem/prune_peak_gb']:.2f} GB")
    warning = quality.warning_line(quality.flags_of(results))
    return lines + ([warning] if warning else [])
