"""A W&B report of a table's sweep (online only): the aggregated table and the table's bar charts."""

from __future__ import annotations

from prune.tables.grid import load_sweep
from prune.tables.specs import TABLES


def report(table: str, overrides: list[str]) -> str:
    """A W&B report of the sweep's group (online only), with the aggregated table; returns its URL."""
    from prune import tracking

    sweep = load_sweep(table, overrides)
    md = sweep.table_dir / "table.md"
    missing = f"(no aggregated table yet: python -m prune.tables {table})"
    markdown = md.read_text() if md.is_file() else missing
    spec = TABLES[table]
    logger = sweep.config.logger
    return tracking.build_report(logger.get("project", "llm-prune"), logger.get("entity"),
                                 tracking.sweep_group(table, {"scale": sweep.scale}),
                                 f"{spec.title} [{sweep.scale.get('name', '-')}]", markdown, list(spec.bars))
