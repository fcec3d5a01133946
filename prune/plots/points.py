"""What the figures draw, as one DataFrame whatever it came from: a sweep's ``results.json`` files or a
table's ``table.csv`` (which also holds the papers' figures).

Columns: ``kind`` (``ours`` | ``paper``), ``method`` (row label), ``ratio`` (the asked-for ratio), ``x`` (the
achieved ratio: parameters removed, %), ``seed`` (cells only), then one column per metric key of
``results.json`` (``ppl/wikitext2``, ``zs/mean``, ...) in the unit the tables show (accuracies in %, the
``zs/mean_stderr`` column as the half-width of the 95% interval in points).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prune import quality
from prune.errors import PruneError
from prune.tables.specs import REMOVED, TABLES, Column

# Every table column by its label and by its metric key: the figures' metrics are table columns.
COLUMNS_BY_LABEL: dict[str, Column] = {c.label: c for spec in TABLES.values() for c in spec.columns}
COLUMNS_BY_KEY: dict[str, Column] = {c.key: c for c in COLUMNS_BY_LABEL.values()}


def load_cells(root: Path) -> list[dict[str, Any]]:
    """Every finished cell directly under `root` (one level of run directories)."""
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/results.json"))]


def _method_settings(record: dict[str, Any]) -> dict[str, str]:
    settings = record.get("config", {}).get("method") or {}
    return {k: json.dumps(v) for k, v in settings.items() if k not in ("_target_", "seed")}


def cell_labels(records: list[dict[str, Any]]) -> list[str]:
    """Each cell's row label as the tables write it: its method, plus each method setting whose value differs
    from the method's first cell (the grid's first, the full method): ``blockpruner[search=false]``; a cell
    flagged as not converged is its own series, with its mark: ``disp †untrained`` (`prune.quality`)."""
    methods = [r["plan"]["method"] for r in records]
    first: dict[str, dict[str, str]] = {}
    for method, record in zip(methods, records):
        first.setdefault(method, _method_settings(record))
    labels = []
    for method, record in zip(methods, records):
        mine = _method_settings(record)
        variant = ",".join(f"{k}={_text(v)}" for k, v in mine.items() if first[method].get(k) != v)
        label = f"{method}[{variant}]" if variant else method
        labels.append(f"{label} {quality.mark(record)}".rstrip())
    return labels


def _text(encoded: str) -> str:
    """A setting's value as Hydra writes it on the command line (``false``, ``layer``)."""
    value = json.loads(encoded)
    return value if isinstance(value, str) else json.dumps(value)


def from_cells(records: list[dict[str, Any]]) -> Any:
    """The points of a sweep's cells; the dense model is added from the cells' dense reference when no cell
    is the dense model itself."""
    import pandas as pd

    rows = []
    for label, record in zip(cell_labels(records), records):
        metrics = record["metrics"]
        row = {"kind": "ours", "method": label, "ratio": record.get("config", {}).get("ratio", float("nan")),
               "seed": record.get("config", {}).get("seed")}
        rows.append(row | _scaled(metrics))
    if records and not any(r["method"] == "dense" for r in rows):
        dense = records[0].get("dense_metrics") or {}
        if "ppl/wikitext2" in dense or "zs/mean" in dense:
            rows.append({"kind": "ours", "method": "dense", "ratio": 0.0, "seed": None}
                        | _scaled(dense | {REMOVED.key: 0.0}))
    return _finish(pd.DataFrame(rows))


def _scaled(metrics: dict[str, Any]) -> dict[str, float]:
    out = {c.key: float(metrics[c.key]) * c.scale for c in COLUMNS_BY_KEY.values()
           if isinstance(metrics.get(c.key), (int, float))}
    return {("x" if k == REMOVED.key else k): v for k, v in out.items()}


def from_table(frame: Any) -> Any:
    """The points of a table frame (``build_table``'s, or ``table.csv`` read back): its ``ours`` and
    ``paper`` rows; ``diff`` rows are left out."""
    df = frame[frame["kind"].isin(["ours", "paper"])]
    if "source" in df.columns:  # flagged rows (source ``ours †untrained``) are their own marked series
        marks = df["source"].fillna("").str.extract(r"(†.*)$", expand=False).fillna("")
        df = df.assign(method=(df["method"].astype(str) + " " + marks).str.rstrip())
    renamed = {label: ("x" if c.key == REMOVED.key else c.key) for label, c in COLUMNS_BY_LABEL.items()}
    keep = ["kind", "method", "ratio", *(label for label in renamed if label in df.columns)]
    return _finish(df[keep].rename(columns=renamed).assign(seed=None))


def read_table(path: Path) -> Any:
    """``table.csv`` of ``python -m prune.tables`` as points."""
    import pandas as pd

    if not path.is_file():
        raise PruneError(f"no table at {path}; pass a table.csv written by python -m prune.tables")
    frame = pd.read_csv(path)
    missing = {"kind", "method", "ratio", REMOVED.label} - set(frame.columns)
    if missing:
        raise PruneError(f"{path} is not a table of python -m prune.tables (no column {sorted(missing)})")
    return from_table(frame)


def _finish(df: Any) -> Any:
    if "x" not in df.columns:
        df = df.assign(x=float("nan"))
    df = df.copy()
    df.loc[df["method"] == "dense", "x"] = 0.0  # the dense model removes nothing, whatever its ratio
    return df.reset_index(drop=True)
