"""Paper tables from a sweep's ``results.json`` files, with the papers' numbers and the differences beside
ours.

    python run.py experiment=table2 scale=reference              # the sweep (resumable)
    python -m prune.tables table2 scale=reference                # its table (seconds; any time, done or not)
    python -m prune.tables table2 scale=paper --report           # a W&B report of the sweep (online only)

The arguments after the table name are the sweep's own Hydra overrides: the experiment config
(``conf/experiment/<table>.yaml``) is composed with them to find the grid (``hydra.sweeper.params`` plus any
sweep on the command line) and the sweep directory (``outputs/<table>/<scale>/``). Every grid cell is looked
up by its config values among the finished cells there; the missing ones are listed, and the table holds the
rest. The column spec of each table is ``TABLES`` (``specs.py``); the papers' numbers are
``experiments/<table>/expected.csv`` (paper, table, model, method, ratio, metric, value, note), with values
in the units the table shows (accuracies in %) and ``method`` a row label of ours.

Rows: ``ours`` (one per grid cell; the dense model once), then for each paper figure of that method (the
nearest ratio of ours) a ``paper`` row and a ``diff`` row (ours - paper). Paper figures of methods that are
not in the grid follow as ``paper`` rows at the end. A cell's row label is its method, plus the ``method.*``
grid keys whose value is not the first in the grid (``blockpruner[search=false]``).

Written to ``experiments/<table>/results/<scale>/`` (scales with ``publish: true``) or ``<sweep dir>/table/``:
``table.md``, ``table.csv`` (full precision), ``table.tex``, the sweep's plots (PNG) and ``meta.json``; the
same table goes to a summary run of the sweep's W&B group when the logger is ``wandb``.

The package, one module per job:

- ``specs``: what each table shows (``TABLES``: title, columns, report charts);
- ``grid``: the sweep (experiment config + overrides), its grid as Hydra builds it, cells matched to results;
- ``frame``: the comparison frame (ours, paper, diff rows): pure functions;
- ``render``: Markdown / CSV / LaTeX, the plots beside them, the W&B summary run;
- ``pipeline``: ``aggregate``, one table from its sweep to its files;
- ``wandb_report``: the W&B report; ``cli``: the command line (``__main__`` runs it).

The per-cell progress line of a sweep is ``prune.sweep.Progress`` (a Hydra callback, next to ``FailedCells``).
"""

from __future__ import annotations

from prune.sweep import Progress  # its old place here still works for configs that name it
from prune.tables.cli import main
from prune.tables.frame import build_table
from prune.tables.grid import (
    EXPERIMENTS,
    REPO,
    compose_experiment,
    grid_cells,
    grid_params,
    match_cells,
    row_label,
)
from prune.tables.pipeline import aggregate, load_expected
from prune.tables.specs import AVG, AVG_MARGIN, PPL, PPL4096, REMOVED, TABLES, TASKS, Column, TableSpec
from prune.tables.wandb_report import report

__all__ = [
    "AVG", "AVG_MARGIN", "EXPERIMENTS", "PPL", "PPL4096", "REMOVED", "REPO", "TABLES", "TASKS", "Column",
    "Progress", "TableSpec", "aggregate", "build_table", "compose_experiment", "grid_cells", "grid_params",
    "load_expected", "main", "match_cells", "report", "row_label",
]
