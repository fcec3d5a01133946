"""The sweep figures: perplexity, zero-shot mean (with its 95% intervals) and the prefill, decode and
throughput speed-ups against the achieved ratio, one fixed style per method (``prune.styles``). Drawn from a
sweep's ``results.json`` files into the sweep directory after every run (so they are always current, and
logged to W&B by the runner), and from a table (with the papers' figures as hollow markers) beside it by
``python -m prune.tables``. Each figure is a PNG and a PDF.

    python -m prune.plots outputs/<experiment_name>                                   # redraw a sweep's
    python -m prune.plots --from-table experiments/table2/results/reference/table.csv  # a table's, beside it
    python -m prune.plots --from-table .../table.csv --column     # 3.4 in wide for a paper column

Modules: ``points`` (the data, from cells or a table), ``draw`` (the figures).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from prune.errors import PruneError
from prune.plots.draw import FIGURES, PlotOptions, write_figures
from prune.plots.points import from_cells, from_table, load_cells, read_table

__all__ = ["FIGURES", "PlotOptions", "load_cells", "main", "write_plots", "write_table_plots"]


def write_plots(root: Path, out: Path | None = None, options: PlotOptions = PlotOptions()) -> list[Path]:
    """The figures of the sweep directory `root` (its cells' ``results.json``) into `out` (default: `root`);
    returns the PNG paths written (none without finished cells)."""
    records = load_cells(root)
    if not records:
        return []
    return write_figures(from_cells(records), out or root, root.name, options)


def write_table_plots(frame: Any, out: Path, name: str, options: PlotOptions = PlotOptions()) -> list[Path]:
    """The figures of a table frame (``build_table``'s, or ``table.csv``), the papers' figures included, in
    the wide layout (returned: its PNG paths) and the paper-column one (``<stem>_column.*``)."""
    points = from_table(frame)
    write_figures(points, out, name, replace(options, column=True))
    return write_figures(points, out, name, replace(options, column=False))


def table_name(table: Path) -> str:
    """The figures' title for a ``table.csv``: ``<table> [<scale>]`` from the ``meta.json`` beside it, else
    its directory's name."""
    meta = table.parent / "meta.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return f"{info.get('experiment', table.parent.name)} [{(info.get('scale') or {}).get('name', '-')}]"
    return table.parent.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune.plots", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, nargs="?", help="a sweep directory, e.g. outputs/<experiment>")
    ap.add_argument("--from-table", type=Path, help="draw from a table.csv of python -m prune.tables instead")
    ap.add_argument("--out", type=Path, help="write here (default: beside the sweep's cells or the table)")
    ap.add_argument("--ppl-cut", type=float, default=PlotOptions.ppl_cut,
                    help="perplexity above this many times the dense one is off scale (default: %(default)g)")
    ap.add_argument("--ppl-max", type=float, help="or above this perplexity (overrides --ppl-cut)")
    ap.add_argument("--column", action="store_true",
                    help="the paper-column layout (3.4 in wide, legend below): <stem>_column.png/.pdf")
    args = ap.parse_args(argv)
    options = PlotOptions(ppl_cut=args.ppl_cut, ppl_max=args.ppl_max, column=args.column)
    try:
        if args.ppl_cut <= 1 or (args.ppl_max is not None and args.ppl_max <= 0):
            raise PruneError("--ppl-cut must be > 1 (a multiple of the dense perplexity), --ppl-max > 0")
        if (args.sweep_dir is None) == (args.from_table is None):
            raise PruneError("pass either a sweep directory or --from-table <table.csv>")
        if args.from_table:
            table = args.from_table
            written = write_figures(read_table(table), args.out or table.parent, table_name(table), options)
        else:
            written = write_plots(args.sweep_dir, args.out, options)
    except PruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written) or "nothing to draw")
    return 0
