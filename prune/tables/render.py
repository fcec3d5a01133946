"""A table's comparison frame as people read it: Markdown (with a header saying what the sweep was), CSV
(full precision), LaTeX, the table's figures beside them, and a W&B summary run of the sweep's group."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prune import quality
from prune.tables.grid import Matched, Sweep, fmt_value, mapping
from prune.tables.specs import AVG_MARGIN, TableSpec

TABLE_FILES = ("table.md", "table.csv", "table.tex")
SPEED = "speed"  # the preset's speed-protocol block, printed after its other settings


def display_frame(df: Any, spec: TableSpec) -> tuple[Any, list[str]]:
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


def _dotted(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` for each setting in config order, a nested block's as ``block.key=value``."""
    out: list[str] = []
    for key, value in settings.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def preset_line(record: dict[str, Any] | None) -> str:
    """The model preset a cell ran under: its settings (a method's block as ``disp.steps=200``), then its
    speed protocol; no record: empty."""
    if not record:
        return ""
    preset = record["config"]["model"].get("preset")
    if not preset:
        return "no preset (the papers' full protocols)"
    settings = {k: v for k, v in preset.items() if k != "name"}
    speed = settings.pop(SPEED) if isinstance(settings.get(SPEED), dict) else {}
    text = f"preset `{preset.get('name')}`: " + ", ".join(_dotted(settings))
    return text + ("; speed " + ", ".join(f"{k}={v}" for k, v in speed.items()) if speed else "")


def header(spec: TableSpec, sweep: Sweep, matched: Matched, model: str, failed: dict[str, str]) -> list[str]:
    """The Markdown lines above the table: scale, model and preset, grid and progress, how to read it, and
    what the marks of flagged rows (`prune.quality`) mean."""
    done, missing = matched.done, matched.missing
    grid = "; ".join(f"{k} = {', '.join(fmt_value(v) for v in vs)}" for k, vs in sweep.grid.items())
    lines = [
        f"# {spec.title}",
        "",
        f"Scale **{sweep.scale.get('name', '-')}**: {sweep.scale.get('description', '')}. Model `{model}`; "
        f"{preset_line(done[0] if done else None)}.",
        f"Cells: {len(done)}/{len(done) + len(missing)} done (grid: {grid}).",
        "Rows: ours, then each paper figure of that method (nearest ratio) and the difference ours - paper. "
        "Accuracies in %, `removed %` = parameters removed (embeddings included). "
        f"Paper numbers and their sources: `experiments/{sweep.table}/expected.csv`.",
    ]
    if AVG_MARGIN in spec.columns:
        lines.append(f"`{AVG_MARGIN.label}`: half-width of the 95% interval of the zero-shot mean, from the "
                     "binomial standard error over the items evaluated (lm-eval's), in points.")
    if any(c.key.endswith("_speedup") for c in spec.columns):
        lines.append("Speed-ups (`x` columns) are the dense row's time over the row's (throughput: the row's "
                     "over the dense row's), so they agree with the times shown.")
    if sweep.scale.get("name") != "paper":
        lines.append("Ours is a different model from the papers' here: compare trends, not values.")
    flagged = quality.footnote(done)
    if flagged:
        lines.append(flagged)
    if missing:
        lines.append("Missing cells: " + "; ".join(missing) + ".")
    if failed:
        lines.append("Failed cells (their `error.txt` in the sweep directory): "
                     + "; ".join(f"`{cell}`: {error}" for cell, error in failed.items()))
    return lines


def markdown(header_lines: list[str], shown: Any, notes: list[str]) -> str:
    """``table.md``: the header, the table, then the numbered notes."""
    text = "\n".join(header_lines) + "\n\n" + shown.to_markdown(index=False) + "\n"
    return text + "".join(f"\n[{i}] {note}" for i, note in enumerate(notes, 1)) + ("\n" if notes else "")


def latex(spec: TableSpec, sweep: Sweep, model: str, shown: Any, notes: list[str]) -> str:
    """``table.tex``: the table with a caption and label, the notes as LaTeX comments after it."""
    caption = f"{spec.title} (scale {sweep.scale.get('name', '-')}, model {model})".replace("%", r"\%")
    table = shown.to_latex(index=False, escape=True, caption=caption.replace("_", r"\_"),
                           label=f"tab:{sweep.table}")
    return table + "".join(f"% [{i}] {note}\n" for i, note in enumerate(notes, 1))


def write_tables(out: Path, df: Any, markdown_text: str, latex_text: str) -> None:
    """``table.md``, ``table.csv`` (the frame at full precision) and ``table.tex`` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_text)
    df.to_csv(out / "table.csv", index=False)
    (out / "table.tex").write_text(latex_text)


def draw_plots(df: Any, out: Path, name: str) -> dict[str, Path]:
    """The table's figures beside it (PNG and PDF; ours and the papers' figures, ``prune.plots``):
    {figure name: its PNG}."""
    from prune import plots

    return {png.stem: png for png in plots.write_table_plots(df, out, name)}


def log_summary(sweep: Sweep, meta: dict[str, Any], shown: Any, out: Path, images: dict[str, Path]) -> None:
    """The table, its files and plots as one more run of the sweep's W&B group (logger ``wandb`` only)."""
    from prune import tracking

    logger_cfg = mapping(sweep.config.logger, "logger", resolve=True)
    scale = sweep.scale
    logged_config = {"experiment": sweep.table, "scale": scale, "meta": meta}
    mode = tracking.log_summary(logger_cfg, sweep.table, logged_config,
                                list(shown.columns), shown.astype(str).values.tolist(),
                                [out / name for name in TABLE_FILES], images, sweep.directory / "_summary")
    if mode:
        print(f"W&B summary run: group {tracking.sweep_group(sweep.table, {'scale': scale})} ({mode})")
