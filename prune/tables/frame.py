"""The comparison frame of a table: our rows, each followed by the papers' figures for it and the differences.
Pure functions over records and DataFrames: no files, no printing."""

from __future__ import annotations

import math
from typing import Any

from prune import quality
from prune.tables.grid import row_label
from prune.tables.specs import REMOVED, TableSpec

EXPECTED_COLUMNS = ["paper", "table", "model", "method", "ratio", "metric", "value", "note"]
Pairs = list[tuple[dict[str, Any], dict[str, Any] | None]]  # each grid cell with its record (None: missing)


def _row(kind: str, label: str, ratio: float, source: str, values: dict[str, float],
         note: str = "") -> dict[str, Any]:
    return {"kind": kind, "method": label, "ratio": ratio, "source": source, "note": note, **values}


def _paper_values(spec: TableSpec, group: Any, ratio: float) -> dict[str, float]:
    by_key = {c.key: c.label for c in spec.columns}
    values = {by_key[m]: float(v) for m, v in zip(group["metric"], group["value"]) if m in by_key}
    return {REMOVED.label: 100 * ratio} | values if REMOVED in spec.columns else values


def _note(group: Any) -> str:
    return "; ".join(n for n in dict.fromkeys(group["note"]) if n)


def _dense_metrics(matched: Pairs, grid: dict[str, list[Any]]) -> dict[str, float] | None:
    """The metrics of the sweep's dense row, if it has one (the first finished dense cell)."""
    dense = (record["metrics"] for cell, record in matched if record and row_label(cell, grid) == "dense")
    return next(dense, None)


def _against(metrics: dict[str, Any], dense: dict[str, float] | None) -> dict[str, Any]:
    """The cell's metrics with its speed-ups taken against the table's own dense row.

    A cell's ``results.json`` holds speed-ups against the dense figures cached when it ran; recomputing them
    from the dense row shown in the same table keeps every speed-up consistent with the times printed beside
    it (and lets a re-measured dense row, after its cache entry is deleted, fix all of them at once).
    """
    from prune.eval.speed import speedups

    if dense is None:
        return metrics
    return {**metrics, **speedups(dense, metrics)}


def _ours(spec: TableSpec, grid: dict[str, list[Any]], matched: Pairs) -> list[dict[str, Any]]:
    """One ``ours`` row per grid cell in grid order (the dense model once: the ratio does not apply to it). A
    cell whose method flagged it as not converged carries the flags' marks in its source (``ours
    †untrained``; the header's footnote explains them)."""
    dense = _dense_metrics(matched, grid)
    ours: list[dict[str, Any]] = []
    for cell, record in matched:
        label = row_label(cell, grid)
        if label == "dense" and any(r["method"] == "dense" for r in ours):
            continue
        metrics = _against(record["metrics"], dense) if record else {}
        values = {c.label: float(metrics[c.key]) * c.scale if isinstance(metrics.get(c.key), (int, float))
                  else math.nan for c in spec.columns}
        source = f"ours {quality.mark(record)}".rstrip() if record else "ours (missing)"
        ratio = 0.0 if label == "dense" else float(cell.get("ratio", 0.0))
        ours.append(_row("ours", label, ratio, source, values))
    return ours


def _papers_beside(row: dict[str, Any], ours: list[dict[str, Any]], spec: TableSpec, expected: Any,
                   used: set[int]) -> list[dict[str, Any]]:
    """The ``paper`` and ``diff`` rows of one of our rows: each paper figure of its method whose ratio is
    nearer to this row's than to any other row of the method. Adds the expected.csv rows it shows to
    `used`."""
    rows: list[dict[str, Any]] = []
    same_method = [r for r in ours if r["method"] == row["method"]]
    mine = expected[expected["method"] == row["method"]]
    for (paper, tbl, model, ratio), group in mine.groupby(["paper", "table", "model", "ratio"], sort=False):
        if min(same_method, key=lambda r: abs(r["ratio"] - float(ratio))) is not row:
            continue  # this paper figure belongs to another ratio of ours
        used.update(group.index)
        values = _paper_values(spec, group, float(ratio))
        source = f"{paper} {tbl}, {model}"
        rows.append(_row("paper", row["method"], float(ratio), source, values, _note(group)))
        diff = {k: row[k] - v for k, v in values.items() if k != REMOVED.label and not math.isnan(row[k])}
        if diff:
            rows.append(_row("diff", row["method"], row["ratio"], f"ours - {paper} {tbl}", diff))
    return rows


def _papers_not_in_grid(spec: TableSpec, rest: Any) -> list[dict[str, Any]]:
    """``paper`` rows for the expected.csv figures that no row of ours took (methods not in the grid)."""
    rows = []
    keys = ["paper", "table", "model", "method", "ratio"]
    for (paper, tbl, model, method, ratio), group in rest.groupby(keys, sort=False):
        rows.append(_row("paper", method, float(ratio), f"{paper} {tbl}, {model} (not in the grid)",
                         _paper_values(spec, group, float(ratio)), _note(group)))
    return rows


def build_table(spec: TableSpec, grid: dict[str, list[Any]], matched: Pairs, expected: Any) -> Any:
    """The table as a DataFrame: ``ours`` rows in grid order, each followed by its ``paper`` and ``diff``
    rows.

    Columns: kind (ours | paper | diff), method (row label), ratio (ours: the cell's; paper: the paper's, as a
    fraction), source, note (the paper figure's note from expected.csv), then one per ``spec`` column in its
    display unit; columns without any value are dropped.
    """
    import pandas as pd

    ours = _ours(spec, grid, matched)
    rows: list[dict[str, Any]] = []
    used: set[int] = set()
    for row in ours:
        rows.append(row)
        rows.extend(_papers_beside(row, ours, spec, expected, used))
    rows.extend(_papers_not_in_grid(spec, expected.drop(index=list(used))))
    columns = ["kind", "method", "ratio", "source", "note", *(c.label for c in spec.columns)]
    df = pd.DataFrame(rows, columns=columns)
    return df.dropna(axis=1, how="all")  # columns nobody measured at this scale (e.g. GPU-h on a CPU)
