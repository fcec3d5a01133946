"""The command line: ``python -m prune.tables <table> [overrides] [--out DIR] [--report]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import prune.tables
from prune.errors import PruneError
from prune.tables.pipeline import aggregate
from prune.tables.specs import TABLES
from prune.tables.wandb_report import report


def main(argv: list[str] | None = None) -> int:
    description = (prune.tables.__doc__ or "").split("\n\n")[0]
    ap = argparse.ArgumentParser(prog="python -m prune.tables", description=description)
    ap.add_argument("table", choices=sorted(TABLES))
    ap.add_argument("overrides", nargs="*", help="the sweep's Hydra overrides, e.g. scale=reference")
    ap.add_argument("--out", type=Path, default=None, help="write the table here instead")
    ap.add_argument("--report", action="store_true", help="build a W&B report of the sweep (online only)")
    args = ap.parse_args(argv)
    try:
        if args.report:
            print(f"W&B report: {report(args.table, args.overrides)}")
        else:
            aggregate(args.table, args.overrides, args.out)
    except PruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

