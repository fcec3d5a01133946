"""The sweep behind a table: the experiment config composed with the sweep's overrides, its grid rebuilt as
Hydra's basic sweeper builds it, and each grid cell matched to the newest finished cell that ran it."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prune.errors import PruneError
from prune.paths import PACKAGE_ROOT

REPO = PACKAGE_ROOT.parent
EXPERIMENTS = REPO / "experiments"


def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _values(override: Any) -> list[Any]:
    return list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]


def grid_params(sweeper_params: dict[str, Any] | None, cli_overrides: list[str]) -> dict[str, list[Any]]:
    """The sweep grid as key -> typed values, as Hydra's basic sweeper builds it: ``hydra.sweeper.params``,
    then the command line (a sweep adds a key; any value of a key of the grid replaces its values)."""
    parser = _parser()
    grid = {k: _values(parser.parse_override(f"{k}={v}")) for k, v in (sweeper_params or {}).items()}
    for override in parser.parse_overrides(cli_overrides):
        key = override.get_key_element()
        if override.is_sweep_override() or key in grid:
            grid[key] = _values(override)
    return grid


def grid_cells(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def mapping(node: Any, name: str, resolve: bool = False) -> dict[str, Any]:
    """A config node as a plain dict (an absent or empty node: ``{}``); anything but a mapping is the user's
    error, named by its config key."""
    if not node:
        return {}
    value = OmegaConf.to_container(node, resolve=resolve) if isinstance(node, DictConfig) else node
    if not isinstance(value, dict):
        raise PruneError(f"{name} must be a mapping, got {value!r}")
    return {str(k): v for k, v in value.items()}


def sweep_grid(config: DictConfig, overrides: list[str]) -> dict[str, list[Any]]:
    """The grid of a composed experiment config (Hydra config included) run with these overrides."""
    return grid_params(mapping(config.hydra.sweeper.get("params"), "hydra.sweeper.params"), overrides)


def compose_experiment(table: str, overrides: list[str]) -> DictConfig:
    """The experiment config (Hydra config included) composed with the overrides that are not sweeps."""
    from hydra import compose, initialize_config_dir

    import prune  # noqa: F401  (the ${dirname:} resolver)

    plain = [o for o, p in zip(overrides, _parser().parse_overrides(overrides)) if not p.is_sweep_override()]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={table}", *plain],
                       return_hydra_config=True)


@dataclass(frozen=True)
class Sweep:
    """A table's sweep: its composed config, scale, directory and grid.

    ``grid`` is the grid that runs (the config's, with the command line's sweeps); ``labels`` is the same grid
    with the config's own values first wherever the config has the key, so that a row is named a variant
    (``blockpruner[search=false]``) against the config's full method even when the command line reorders it.
    """

    table: str
    overrides: list[str]
    config: DictConfig
    scale: dict[str, Any]
    directory: Path
    grid: dict[str, list[Any]]
    labels: dict[str, list[Any]]

    @property
    def cells(self) -> list[dict[str, Any]]:
        return grid_cells(self.grid)

    @property
    def table_dir(self) -> Path:
        """Where the table goes: ``experiments/<table>/results/<scale>/`` for a published scale, else
        ``<sweep dir>/table/``."""
        if self.scale.get("publish"):
            return EXPERIMENTS / self.table / "results" / str(self.scale.get("name"))
        return self.directory / "table"


def load_sweep(table: str, overrides: list[str]) -> Sweep:
    """The sweep of ``conf/experiment/<table>.yaml`` under the sweep's own overrides."""
    config = compose_experiment(table, overrides)
    scale = mapping(config.get("scale"), "scale", resolve=True)
    grid = sweep_grid(config, overrides)
    return Sweep(table, overrides, config, scale, Path(str(config.hydra.sweep.dir)), grid,
                 labels=grid | sweep_grid(config, []))


# ------------------------------------------------------------------------------------------- matching cells


def _cell_values(record: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """A record's value of each grid key: a config group's choice (method, calib, ...), else the config's."""
    config, choices = OmegaConf.create(record["config"]), record.get("choices", {})
    return {k: choices[k] if k in choices else OmegaConf.select(config, k, default=None) for k in keys}


def same_value(a: Any, b: Any) -> bool:
    """Grid values compare as numbers when both are (within rounding), else as case-blind text."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a).lower() == str(b).lower()


def match_cells(cells: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """For each grid cell, the newest finished record whose config has the cell's values (else None)."""
    keys = {k for cell in cells for k in cell}
    values = [_cell_values(r, keys) for r in records]
    out: list[dict[str, Any] | None] = []
    for cell in cells:
        hits = [r for r, v in zip(records, values) if all(same_value(v[k], want) for k, want in cell.items())]
        out.append(max(hits, key=lambda r: r.get("provenance", {}).get("created_at", "")) if hits else None)
    return out


@dataclass(frozen=True)
class Matched:
    """Each grid cell, in grid order, with the record that ran it (None: not run or not finished)."""

    pairs: list[tuple[dict[str, Any], dict[str, Any] | None]]

    @property
    def done(self) -> list[dict[str, Any]]:
        return [record for _, record in self.pairs if record]

    @property
    def missing(self) -> list[str]:
        """The cells without a record, each named ``key=value,...``."""
        return [cell_name(cell) for cell, record in self.pairs if not record]


def match_grid(cells: list[dict[str, Any]], records: list[dict[str, Any]]) -> Matched:
    return Matched(list(zip(cells, match_cells(cells, records))))


def fmt_value(v: Any) -> str:
    """A grid value as the command line writes it (booleans lower case)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def cell_name(cell: dict[str, Any]) -> str:
    return ",".join(f"{k}={fmt_value(v)}" for k, v in cell.items())


# Config groups besides the method whose grid choice names a row variant: ``shortgpt[rft=lora_trsp]``.
LABELLED_GROUPS = ("rft",)


def row_label(cell: dict[str, Any], grid: dict[str, list[Any]]) -> str:
    """The method, plus each ``method.*`` grid key (and `LABELLED_GROUPS` key) whose value is not the grid's
    first (the full method, no recovery fine-tuning)."""
    method = str(cell.get("method", "?"))
    variant = [f"{k.removeprefix('method.')}={fmt_value(v)}" for k, v in cell.items()
               if (k.startswith("method.") or k in LABELLED_GROUPS) and not same_value(v, grid[k][0])]
    return f"{method}[{','.join(variant)}]" if variant else method
