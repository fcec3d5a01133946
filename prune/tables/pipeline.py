"""One table from its sweep: compose the sweep, match its cells, build the frame, render, write and log it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from prune.sweep import failed_cells
from prune.tables import render
from prune.tables.frame import EXPECTED_COLUMNS, build_table
from prune.tables.grid import EXPERIMENTS, Matched, Sweep, load_sweep, match_grid
from prune.tables.specs import spec_of


def load_expected(table: str) -> Any:
    """``experiments/<table>/expected.csv`` as a DataFrame (no rows when the file does not exist)."""
    import pandas as pd

    path = EXPERIMENTS / table / "expected.csv"
    if not path.is_file():
        return pd.DataFrame(columns=EXPECTED_COLUMNS)
    df = pd.read_csv(path, skipinitialspace=True)
    df["note"] = df["note"].fillna("") if "note" in df else ""
    return df


def _print_progress(sweep: Sweep, matched: Matched, failed: dict[str, str]) -> None:
    print(f"{sweep.table} [{sweep.scale.get('name', 'no scale')}]: {len(matched.done)}/{len(matched.pairs)} "
          f"cells done in {sweep.directory}")
    for name in matched.missing:
        print(f"  missing: {name}")
    for cell, error in failed.items():
        print(f"  failed: {cell}: {error}")


def _meta(sweep: Sweep, matched: Matched, failed: dict[str, str], model: str) -> dict[str, Any]:
    """``meta.json``: what the table was built from, when, and at which commit."""
    from prune import provenance

    git = provenance.manifest()
    return {
        "experiment": sweep.table, "scale": sweep.scale, "model": model, "sweep_dir": str(sweep.directory),
        "cells": len(matched.pairs), "cells_done": len(matched.done), "cells_missing": matched.missing,
        "cells_failed": failed,
        "cells_wall_s": round(sum(r.get("wall_s", 0.0) for r in matched.done), 1),
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git["git_commit"], "git_dirty": git["git_dirty"],
        "command": f"python -m prune.tables {sweep.table} " + " ".join(sweep.overrides),
    }


def aggregate(table: str, overrides: list[str], results_dir: Path | None = None,
              log: bool = True) -> dict[str, Any]:
    """Build, print and write one table (and log it to W&B when ``log``); returns its meta (``meta.json``)."""
    from prune import plots

    spec = spec_of(table)
    sweep = load_sweep(table, overrides)
    records = plots.load_cells(sweep.directory) if sweep.directory.is_dir() else []
    matched = match_grid(sweep.cells, records)
    failed = failed_cells(sweep.directory) if sweep.directory.is_dir() else {}
    _print_progress(sweep, matched, failed)

    df = build_table(spec, sweep.labels, matched.pairs, load_expected(table))
    shown, notes = render.display_frame(df, spec)
    model = matched.done[0]["config"]["model"]["name"] if matched.done else sweep.config.model.name
    markdown = render.markdown(render.header(spec, sweep, matched, model, failed), shown, notes)
    out = results_dir or sweep.table_dir
    render.write_tables(out, df, markdown, render.latex(spec, sweep, model, shown, notes))
    name = f"{sweep.table} [{sweep.scale.get('name', '-')}]"
    images = render.draw_plots(df, out, name) if matched.done else {}
    meta = _meta(sweep, matched, failed, model)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(markdown)
    print(f"written: {out}/table.md, table.csv, table.tex, meta.json" + (", plots" if images else ""))
    if log and matched.done:
        render.log_summary(sweep, meta, shown, out, images)
    return meta
