"""Paper tables from a sweep's ``results.json`` files, with the papers' numbers and the differences beside ours.

    python run.py experiment=table2 scale=reference              # the sweep (resumable)
    python -m prune.tables table2 scale=reference                # its table (seconds; any time, done or not)
    python -m prune.tables table2 scale=paper --report           # a W&B report of the sweep (online only)

The arguments after the table name are the sweep's own Hydra overrides: the experiment config
(``conf/experiment/<table>.yaml``) is composed with them to find the grid (``hydra.sweeper.params`` plus any
sweep on the command line) and the sweep directory (``outputs/<table>/<scale>/``). Every grid cell is looked up
by its config values among the finished cells there; the missing ones are listed, and the table holds the
rest. The column spec of each table is ``TABLES`` below; the papers' numbers are
``experiments/<table>/expected.csv`` (paper, table, model, method, ratio, metric, value, note), with values
in the units the table shows (accuracies in %) and ``method`` a row label of ours.

Rows: ``ours`` (one per grid cell; the dense model once), then for each paper figure of that method (the
nearest ratio of ours) a ``paper`` row and a ``diff`` row (ours - paper). Paper figures of methods that are
not in the grid follow as ``paper`` rows at the end. A cell's row label is its method, plus the ``method.*``
grid keys whose value is not the first in the grid (``blockpruner[search=false]``).

Written to ``experiments/<table>/results/<scale>/`` (scales with ``publish: true``) or ``<sweep dir>/table/``:
``table.md``, ``table.csv`` (full precision), ``table.tex``, the sweep's plots (PNG) and ``meta.json``; the
same table goes to a summary run of the sweep's W&B group when the logger is ``wandb``.

``Progress`` is a Hydra callback (``hydra.callbacks`` in the experiment configs) that prints one line per
cell: ``[k/N] <cell>: done | skipped (finished) | FAILED``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from prune.errors import PruneError
from prune.paths import PACKAGE_ROOT
from prune.sweep import ERROR_FILE, failed_cells

REPO = PACKAGE_ROOT.parent
EXPERIMENTS = REPO / "experiments"


@dataclass(frozen=True)
class Column:
    """One table column: a metric of ``results.json`` times ``scale``, shown with ``digits`` decimals."""

    label: str
    key: str
    scale: float = 1.0
    digits: int = 2


@dataclass(frozen=True)
class TableSpec:
    """A table: its title, its columns, and the W&B report's bar charts ``(summary metric, title)``."""

    title: str
    columns: tuple[Column, ...]
    bars: tuple[tuple[str, str], ...] = (("ppl/wikitext2", "WikiText-2 perplexity"),
                                         ("zs/mean", "zero-shot mean"))


REMOVED = Column("removed %", "params/removed_frac", 100)
PPL = Column("PPL", "ppl/wikitext2")
PPL4096 = Column("PPL seq4096", "ppl/wikitext2/seq4096")  # DISP-LLM's convention (paper scale computes both)
TASKS = tuple(Column(label, f"zs/{task}/{metric}", 100) for label, task, metric in [
    ("PIQA", "piqa", "acc_norm"), ("Wino", "winogrande", "acc"), ("HS", "hellaswag", "acc_norm"),
    ("ARC-e", "arc_easy", "acc_norm"), ("ARC-c", "arc_challenge", "acc_norm")])
AVG = Column("Avg", "zs/mean", 100)
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
# Half-width of the 95% interval of the zero-shot mean over the items evaluated, in points: no paper reports it,
# and at a CPU preset's 100 items per task it is ~4 points, the size of many differences between methods.
AVG_MARGIN = Column("±95%", "zs/mean_stderr", 100 * Z95, digits=1)

TABLES: dict[str, TableSpec] = {
    "table1": TableSpec("Table 1: main comparison at about 21% (WikiText-2 PPL, zero-shot accuracy %)",
                        (REMOVED, PPL, PPL4096, *TASKS, AVG, AVG_MARGIN)),
    "table2": TableSpec(
        "Table 2: efficiency at 20% and 50% (perplexity, zero-shot mean, speed, pruning cost)",
        (REMOVED, PPL, PPL4096, Column("ZS avg", "zs/mean", 100), AVG_MARGIN,
         Column("tok/s", "speed/throughput_tok_s", digits=1),
         Column("latency ms", "speed/prefill_ms", digits=1), Column("decode ms", "speed/decode_ms", digits=1),
         Column("throughput x", "speed/throughput_speedup"), Column("latency x", "speed/prefill_speedup"),
         Column("decode x", "speed/decode_speedup"), Column("ideal x", "speed/ideal_speedup"),
         Column("prune s", "time/prune_s", digits=1), Column("prune GB", "mem/prune_peak_gb"),
         Column("GPU-h", "cost/gpu_hours", digits=3)),
        bars=(("ppl/wikitext2", "WikiText-2 perplexity"), ("zs/mean", "zero-shot mean"),
              ("speed/throughput_speedup", "throughput speed-up"),
              ("speed/prefill_speedup", "latency speed-up"), ("speed/ideal_speedup", "ideal speed-up"),
              ("time/prune_s", "pruning time (s)"))),
    "blockpruner_table2": TableSpec("BlockPruner Table 2: ablation (full, - search, - block)",
                                    (REMOVED, PPL, AVG, AVG_MARGIN,
                                     Column("layers removed", "layers/removed", digits=0))),
}


# ------------------------------------------------------------------------------------------------ the grid


def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _values(override: Any) -> list[Any]:
    return list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]


def grid_params(sweeper_params: dict[str, Any] | None, cli_overrides: list[str]) -> dict[str, list[Any]]:
    """The sweep grid as key -> typed values, as Hydra's basic sweeper builds it: ``hydra.sweeper.params``, then
    the command line (a sweep adds a key; any value of a key of the grid replaces its values)."""
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


def _cell_values(record: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """A record's value of each grid key: a config group's choice (method, calib, ...), else the config's."""
    config, choices = OmegaConf.create(record["config"]), record.get("choices", {})
    return {k: choices[k] if k in choices else OmegaConf.select(config, k, default=None) for k in keys}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a).lower() == str(b).lower()


def match_cells(cells: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """For each grid cell, the newest finished record whose config has the cell's values (else None)."""
    keys = {k for cell in cells for k in cell}
    values = [_cell_values(r, keys) for r in records]
    out: list[dict[str, Any] | None] = []
    for cell in cells:
        hits = [r for r, v in zip(records, values) if all(_same(v[k], want) for k, want in cell.items())]
        out.append(max(hits, key=lambda r: r.get("provenance", {}).get("created_at", "")) if hits else None)
    return out


def row_label(cell: dict[str, Any], grid: dict[str, list[Any]]) -> str:
    """The method, plus each ``method.*`` grid key whose value is not the grid's first (the full method)."""
    method = str(cell.get("method", "?"))
    variant = [f"{k.removeprefix('method.')}={_fmt_value(v)}" for k, v in cell.items()
               if k.startswith("method.") and not _same(v, grid[k][0])]
    return f"{method}[{','.join(variant)}]" if variant else method


def _fmt_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# ----------------------------------------------------------------------------------------------- the table


def load_expected(table: str) -> Any:
    """``experiments/<table>/expected.csv`` as a DataFrame (no rows when the file does not exist)."""
    import pandas as pd

    path = EXPERIMENTS / table / "expected.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["paper", "table", "model", "method", "ratio", "metric", "value", "note"])
    df = pd.read_csv(path, skipinitialspace=True)
    df["note"] = df["note"].fillna("") if "note" in df else ""
    return df


def _row(kind: str, label: str, ratio: float, source: str, values: dict[str, float],
         note: str = "") -> dict[str, Any]:
    return {"kind": kind, "method": label, "ratio": ratio, "source": source, "note": note, **values}


def _paper_values(spec: TableSpec, group: Any, ratio: float) -> dict[str, float]:
    by_key = {c.key: c.label for c in spec.columns}
    values = {by_key[m]: float(v) for m, v in zip(group["metric"], group["value"]) if m in by_key}
    return {REMOVED.label: 100 * ratio} | values if REMOVED in spec.columns else values


def _note(group: Any) -> str:
    return "; ".join(n for n in dict.fromkeys(group["note"]) if n)


def _dense_metrics(matched: list[tuple[dict[str, Any], dict | None]], grid: dict[str, list[Any]]
                   ) -> dict[str, float] | None:
    """The metrics of the sweep's dense row, if it has one (the first finished dense cell)."""
    return next((record["metrics"] for cell, record in matched if record and row_label(cell, grid) == "dense"),
                None)


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


def build_table(spec: TableSpec, grid: dict[str, list[Any]], matched: list[tuple[dict[str, Any], dict | None]],
                expected: Any) -> Any:
    """The table as a DataFrame: ``ours`` rows in grid order, each followed by its ``paper`` and ``diff`` rows.

    Columns: kind (ours | paper | diff), method (row label), ratio (ours: the cell's; paper: the paper's, as a
    fraction), source, note (the paper figure's note from expected.csv), then one per ``spec`` column in its
    display unit; columns without any value are dropped.
    """
    import pandas as pd

    dense = _dense_metrics(matched, grid)
    ours: list[dict[str, Any]] = []
    for cell, record in matched:
        label = row_label(cell, grid)
        if label == "dense" and any(r["method"] == "dense" for r in ours):
            continue  # the ratio does not apply to the dense model: one row
        metrics = _against(record["metrics"], dense) if record else {}
        values = {c.label: float(metrics[c.key]) * c.scale if isinstance(metrics.get(c.key), (int, float))
                  else math.nan for c in spec.columns}
        source = "ours" if record else "ours (missing)"
        ratio = 0.0 if label == "dense" else float(cell.get("ratio", 0.0))
        ours.append(_row("ours", label, ratio, source, values))
    rows: list[dict[str, Any]] = []
    used: set[int] = set()
    for row in ours:
        rows.append(row)
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
    rest = expected.drop(index=list(used))
    keys = ["paper", "table", "model", "method", "ratio"]
    for (paper, tbl, model, method, ratio), group in rest.groupby(keys, sort=False):
        rows.append(_row("paper", method, float(ratio), f"{paper} {tbl}, {model} (not in the grid)",
                         _paper_values(spec, group, float(ratio)), _note(group)))
    columns = ["kind", "method", "ratio", "source", "note", *(c.label for c in spec.columns)]
    df = pd.DataFrame(rows, columns=columns)
    return df.dropna(axis=1, how="all")  # columns nobody measured at this scale (e.g. GPU-h on a CPU)


def _formatted(df: Any, spec: TableSpec) -> tuple[Any, list[str]]:
    """Strings for Markdown/LaTeX (rounded, blank for NaN, signed differences; method named on its first row)
    and the notes, numbered: a paper row's source ends with ``[n]``."""
    out = df.copy()
    digits = {c.label: c.digits for c in spec.columns}
    for col in out.columns:
        if col in digits:
            out[col] = [("" if not isinstance(v, (int, float)) or math.isnan(v) else
                         f"{v:+.{digits[col]}f}" if kind == "diff" else f"{v:.{digits[col]}f}")
                        for v, kind in zip(df[col], df["kind"])]
    out["ratio"] = ["" if kind == "diff" else f"{r:g}" for r, kind in zip(df["ratio"], df["kind"])]
    out["method"] = [m if kind == "ours" or src.endswith("(not in the grid)") else ""
                     for m, kind, src in zip(df["method"], df["kind"], df["source"])]
    notes: list[str] = []
    for i, note in enumerate(df["note"]):
        if note:
            if note not in notes:
                notes.append(note)
            out.loc[out.index[i], "source"] = f"{out['source'].iloc[i]} [{notes.index(note) + 1}]"
    return out.drop(columns=["kind", "note"]), notes


# ------------------------------------------------------------------------------------------------ aggregate


def compose_experiment(table: str, overrides: list[str]) -> DictConfig:
    """The experiment config (Hydra config included) composed with the overrides that are not sweeps."""
    from hydra import compose, initialize_config_dir

    import prune  # noqa: F401  (the ${dirname:} resolver)

    plain = [o for o, p in zip(overrides, _parser().parse_overrides(overrides)) if not p.is_sweep_override()]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={table}", *plain],
                       return_hydra_config=True)


def _preset_line(record: dict[str, Any] | None) -> str:
    if not record:
        return ""
    preset = record["config"]["model"].get("preset")
    if not preset:
        return "no preset (the papers' full protocols)"
    flat = {k: v for k, v in preset.items() if k != "name" and not isinstance(v, dict)}
    speed = preset.get("speed") or {}
    text = f"preset `{preset.get('name')}`: " + ", ".join(f"{k}={v}" for k, v in flat.items())
    return text + ("; speed " + ", ".join(f"{k}={v}" for k, v in speed.items()) if speed else "")


def _header(spec: TableSpec, table: str, scale: dict[str, Any], model: str, first: dict[str, Any] | None,
            grid: dict[str, list[Any]], done: int, missing: list[str],
            failed: dict[str, str] | None = None) -> list[str]:
    """The Markdown lines above the table: scale, model and preset, grid and progress, how to read it."""
    lines = [
        f"# {spec.title}",
        "",
        f"Scale **{scale.get('name', '-')}**: {scale.get('description', '')}. Model `{model}`; "
        f"{_preset_line(first)}.",
        f"Cells: {done}/{done + len(missing)} done (grid: "
        + "; ".join(f"{k} = {', '.join(_fmt_value(v) for v in vs)}" for k, vs in grid.items()) + ").",
        "Rows: ours, then each paper figure of that method (nearest ratio) and the difference ours - paper. "
        "Accuracies in %, `removed %` = parameters removed (embeddings included). "
        f"Paper numbers and their sources: `experiments/{table}/expected.csv`.",
    ]
    if AVG_MARGIN in spec.columns:
        lines.append(f"`{AVG_MARGIN.label}`: half-width of the 95% interval of the zero-shot mean, from the "
                     "binomial standard error over the items evaluated (lm-eval's), in points.")
    if any(c.key.endswith("_speedup") for c in spec.columns):
        lines.append("Speed-ups (`x` columns) are the dense row's time over the row's (throughput: the row's over "
                     "the dense row's), so they agree with the times shown.")
    if scale.get("name") != "paper":
        lines.append("Ours is a different model from the papers' here: compare trends, not values.")
    if missing:
        lines.append("Missing cells: " + "; ".join(missing) + ".")
    if failed:
        lines.append("Failed cells (their `error.txt` in the sweep directory): "
                     + "; ".join(f"`{cell}`: {error}" for cell, error in failed.items()))
    return lines


def aggregate(table: str, overrides: list[str], results_dir: Path | None = None,
              log: bool = True) -> dict[str, Any]:
    """Build, print and write one table (and log it to W&B when ``log``); returns its meta (``meta.json``)."""
    from prune import plots, provenance, tracking

    if table not in TABLES:
        raise PruneError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    spec, cfg = TABLES[table], compose_experiment(table, overrides)
    scale = OmegaConf.to_container(cfg.scale, resolve=True) if cfg.get("scale") else {}
    assert isinstance(scale, dict)
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    grid = grid_params(params, overrides)  # type: ignore[arg-type]
    labels = grid | grid_params(params, [])  # type: ignore[arg-type]  # variants named against the config's
    cells = grid_cells(grid)
    records = plots.load_cells(sweep_dir) if sweep_dir.is_dir() else []
    found = match_cells(cells, records)
    done = [r for r in found if r]
    missing = [",".join(f"{k}={_fmt_value(v)}" for k, v in c.items()) for c, r in zip(cells, found) if not r]
    print(f"{table} [{scale.get('name', 'no scale')}]: {len(done)}/{len(cells)} cells done in {sweep_dir}")
    for name in missing:
        print(f"  missing: {name}")
    failed = failed_cells(sweep_dir) if sweep_dir.is_dir() else {}
    for cell, error in failed.items():
        print(f"  failed: {cell}: {error}")

    df = build_table(spec, labels, list(zip(cells, found)), load_expected(table))
    shown, notes = _formatted(df, spec)
    first = done[0] if done else None
    model = first["config"]["model"]["name"] if first else cfg.model.name
    markdown = "\n".join(_header(spec, table, scale, model, first, grid, len(done), missing, failed))
    markdown += "\n\n" + shown.to_markdown(index=False) + "\n"
    markdown += "".join(f"\n[{i}] {note}" for i, note in enumerate(notes, 1)) + ("\n" if notes else "")

    published = EXPERIMENTS / table / "results" / str(scale.get("name"))
    out = results_dir or (published if scale.get("publish") else sweep_dir / "table")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown)
    df.to_csv(out / "table.csv", index=False)
    caption = f"{spec.title} (scale {scale.get('name', '-')}, model {model})".replace("%", r"\%")
    latex = shown.to_latex(index=False, escape=True, caption=caption.replace("_", r"\_"), label=f"tab:{table}")
    (out / "table.tex").write_text(latex + "".join(f"% [{i}] {note}\n" for i, note in enumerate(notes, 1)))
    images = {png.stem: Path(shutil.copy2(png, out / png.name)) for png in
              (plots.write_plots(sweep_dir) if records else [])}
    git = provenance.manifest()
    meta = {
        "experiment": table, "scale": scale, "model": model, "sweep_dir": str(sweep_dir),
        "cells": len(cells), "cells_done": len(done), "cells_missing": missing, "cells_failed": failed,
        "cells_wall_s": round(sum(r.get("wall_s", 0.0) for r in done), 1),
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git["git_commit"], "git_dirty": git["git_dirty"],
        "command": f"python -m prune.tables {table} " + " ".join(overrides),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(markdown)
    print(f"written: {out}/table.md, table.csv, table.tex, meta.json" + (", plots" if images else ""))
    if log and done:
        logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
        assert isinstance(logger_cfg, dict)
        files = [out / f for f in ("table.md", "table.csv", "table.tex")]
        mode = tracking.log_summary(logger_cfg, table, {"experiment": table, "scale": scale, "meta": meta},
                                    list(shown.columns), shown.astype(str).values.tolist(), files, images,
                                    sweep_dir / "_summary")
        if mode:
            print(f"W&B summary run: group {tracking.sweep_group(table, {'scale': scale})} ({mode})")
    return meta


def report(table: str, overrides: list[str]) -> str:
    """A W&B report of the sweep's group (online only), with the aggregated table; returns its URL."""
    from prune import tracking

    cfg = compose_experiment(table, overrides)
    scale = OmegaConf.to_container(cfg.scale, resolve=True) if cfg.get("scale") else {}
    assert isinstance(scale, dict)
    published = EXPERIMENTS / table / "results" / str(scale.get("name")) / "table.md"
    md = published if scale.get("publish") else Path(str(cfg.hydra.sweep.dir)) / "table" / "table.md"
    markdown = md.read_text() if md.is_file() else f"(no aggregated table yet: python -m prune.tables {table})"
    title = f"{TABLES[table].title} [{scale.get('name', '-')}]"
    return tracking.build_report(cfg.logger.get("project", "llm-prune"), cfg.logger.get("entity"),
                                 tracking.sweep_group(table, {"scale": scale}), title, markdown,
                                 list(TABLES[table].bars))


# -------------------------------------------------------------------------------------------- sweep progress


class Progress(Callback):
    """A Hydra callback: one line per sweep cell, ``[k/N] <cell>: done in 12 s`` (or skipped / FAILED)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self._start = 0.0
        self._finished_before = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        params = OmegaConf.to_container(sweeper.params) if sweeper.get("params") else {}
        grid = grid_params(params, list(config.hydra.overrides.task))  # type: ignore[arg-type]
        self.total = len(grid_cells(grid))

    def _name(self, config: DictConfig) -> str:
        return f"[{config.hydra.job.get('num', 0) + 1}/{self.total or '?'}] {config.hydra.job.override_dirname}"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        self._finished_before = (Path(config.hydra.runtime.output_dir) / "results.json").exists()
        print(f"{self._name(config)}: {'finished before' if self._finished_before else 'running'}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        took = time.perf_counter() - self._start
        error = Path(config.hydra.runtime.output_dir) / ERROR_FILE  # bad input (prune/sweep.py)
        if job_return.status != JobStatus.COMPLETED:
            status = f"FAILED ({job_return._return_value!r})"
        elif error.exists():
            status = f"FAILED ({error.read_text().strip()})"
        elif self._finished_before and not config.get("force"):
            status = "skipped (results.json exists)"
        else:
            status = "done"
        print(f"{self._name(config)}: {status} in {took:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune.tables", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
