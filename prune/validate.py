"""Config-level checks of a run's values: bad input fails here, as a `PruneError`, before anything loads.

Values are checked where they enter. The method and evaluator options enter through their constructors
(`prune.options.Options`), the model's keys through `prune.models.load`; this module covers what no
constructor sees: the top-level keys (``ratio``, ``seed``, ...), ``calib.*`` (read by
`prune.data.calibration.build_calibration` only after the model has loaded), option names that a
constructor without ``**options`` would reject with a bare TypeError, and, once the model is loaded, the
values that depend on it (``calib.seqlen`` against the model's positions).

`check_config` runs first in `prune.runner.run`, so every caller of the runner gets it;
`check_loaded_model` runs in the runner right after the model loads.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from hydra.utils import get_object
from omegaconf import DictConfig

from prune.errors import PruneError
from prune.models.load import model_source, resolve_device, resolve_dtype
from prune.options import Options, bounded

SEED_MAX = 2**32 - 1  # numpy's seed range; transformers.set_seed seeds numpy too
# Keys Hydra's instantiate reads itself; they are never constructor arguments.
_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


@dataclasses.dataclass(frozen=True)
class RunOptions(Options):
    """The top-level keys of ``conf/config.yaml`` that change what a cell computes."""

    ratio: float = 0.0
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    force: bool = False
    save: bool = False
    dense_reference: bool = True
    # Where a cell's dense speed figures come from: measured once per model and eval config and cached
    # (cheap, but on a shared machine the baseline drifts between cells hours apart), or measured again in the
    # cell itself, right before pruning, on the same machine state as the pruned model measured minutes later.
    dense_speed: Literal["cached", "per_cell"] = "cached"
    deterministic: bool = False

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PruneError(f"ratio={self.ratio} is outside [0, 1); pass e.g. ratio=0.25")

    def error(self, name: str, problem: str) -> PruneError:
        # Top-level keys have no prefix, and are named as on the command line (no quotes).
        return PruneError(f"{name}={getattr(self, name)} {problem}")


@dataclasses.dataclass(frozen=True)
class CalibOptions(Options):
    """The numeric and choice keys of a ``conf/calib`` node; dataset, split and style names are checked
    where the calibration set is built."""

    prefix: ClassVar[str] = "calib"
    nsamples: int = bounded(128, ge=1)
    seqlen: int = bounded(2048, ge=1)
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    group_lines: int = bounded(50, ge=1)
    source: Literal["auto", "hub", "bundled"] = "auto"


def check_config(cfg: DictConfig) -> None:
    """Raise a `PruneError` naming the key and its fix for the first bad value of a run config."""
    _check_fields(RunOptions, cfg)
    if cfg.get("calib") is not None:
        _check_fields(CalibOptions, cfg.calib)
    _check_model(cfg.model)
    if cfg.get("paths") is not None:
        _check_writable(cfg.paths.outputs_root)
    _check_option_names(cfg.method, "method")
    _check_rft(cfg.get("rft"))
    for name, node in (cfg.get("eval") or {}).items():
        if isinstance(node, DictConfig):
            _check_option_names(node, f"eval.{name}")


def _check_rft(node: Any) -> None:
    """``rft.*``: option names, values and ranges (`prune.rft.RftOptions`; rank 0, an unknown target role),
    and a Hub-only dataset with no stand-in while offline: all before anything loads or trains."""
    from prune import rft  # heavy imports (peft) stay inside prune.rft's functions

    rft.check_data_available(rft.parse_options(node))


def check_loaded_model(cfg: DictConfig, model: Any, needs_calibration: bool) -> None:
    """The values that only the loaded model can judge: calibration windows longer than its positions."""
    max_positions = _max_positions(model)
    seqlen = cfg.calib.get("seqlen") if cfg.get("calib") is not None else None
    if needs_calibration and max_positions and seqlen and seqlen > max_positions:
        raise PruneError(f"calib.seqlen={seqlen} is longer than the model's {max_positions} positions "
                         f"(max_position_embeddings); pass calib.seqlen={min(2048, max_positions)} or less")


def _check_fields(options: type[Options], node: DictConfig) -> None:
    """Build `options` from the node's keys it declares (the node may hold others, e.g. ``calib.dataset``)."""
    names = {f.name for f in dataclasses.fields(options)}
    options(**{name: node[name] for name in names if name in node})


def _check_model(model: DictConfig) -> None:
    device = resolve_device(str(model.device))
    resolve_dtype(str(model.dtype), device)
    model_source(model)


def _check_writable(outputs_root: str) -> None:
    """Results, plots and W&B files go under ``paths.outputs_root``: fail now, not after the run."""
    root = Path(str(outputs_root))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PruneError(f"paths.outputs_root={root} cannot be created ({err.strerror or err}); pass a "
                         "writable folder") from err
    if not os.access(root, os.W_OK):
        raise PruneError(f"paths.outputs_root={root} is not writable; pass a writable folder")


def _check_option_names(node: DictConfig, where: str) -> None:
    """Names the constructor does not take are an error naming the ones it does (constructors with
    ``**options`` check their names themselves, through `Options.parse`)."""
    target = node.get("_target_")
    if not target:
        return
    try:
        parameters = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return  # instantiate reports a target it cannot find
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(node) - _HYDRA_KEYS - set(parameters))
    if unknown:
        options = f"the options are {', '.join(parameters)}" if parameters else "it takes none"
        raise PruneError(f"{where}.{unknown[0]} is not an option of {target}; {options}")


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
