"""The sweep figures: perplexity, zero-shot mean and the three speed-ups against the achieved ratio.

Every method keeps its style (``prune.styles``); the paper's figures are hollow markers of the same style; the
dense model is a horizontal reference line (speed-ups: 1x) and the ideal speed-up (dense parameters over the
row's) a dashed grey line. One legend per figure, outside the axes. Perplexity keeps its informative range:
values above the cut (``PlotOptions``) are drawn in a shaded "off scale" strip at the top with their value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402

from prune.store import atomic_target  # noqa: E402
from prune.styles import DENSE, DENSE_STYLE, Style, legend_order, styles_for  # noqa: E402

X = "x"
IDEAL = "speed/ideal_speedup"
FORMATS = ("png", "pdf")  # a raster for READMEs and W&B, a vector copy for papers
METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None}}  # same data, same bytes: no diff noise
# Wide layout (README, W&B, a paper's full width): a one-panel figure is 5.8 x 3.6 inches, fonts 8-9 pt.
RC = {"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8, "axes.labelsize": 9}
PANEL_WIDTH_IN, LEGEND_WIDTH_IN, HEIGHT_IN = 3.2, 2.6, 3.6
LEGEND_ROW_PT = 14  # height of one legend entry at 8 pt, to know when a second column is needed
# Column layout (one column of a two-column paper, printed at 100%): 3.4 inches wide, fonts 6.5-7 pt.
COLUMN_RC = {"font.size": 7, "axes.titlesize": 7, "legend.fontsize": 6.5, "axes.labelsize": 7,
             "xtick.labelsize": 6.5, "ytick.labelsize": 6.5, "lines.markersize": 4}
COLUMN_WIDTH_IN, COLUMN_PANEL_HEIGHT_IN, COLUMN_LEGEND_ROW_PT = 3.4, 2.3, 10
# Sideways shift between methods' error bars at one ratio, so that each stays visible; at most DODGE_SPAN_PT
# between the first method's and the last's, so that no point strays far from its ratio.
DODGE_PT, DODGE_SPAN_PT = 2.0, 24.0
THIN_MARKERS = ("*", "+", "x", "|")
OFF_SCALE_STEP_EM = 1.0  # off-scale values at one ratio stand side by side, a font size apart
OFF_SCALE_STRIP_PT = 40.0  # height of the off-scale strip: a marker and a number written upwards


@dataclass(frozen=True)
class Panel:
    """One axes: a metric of the points, its axis label, log scale, its 95% margin column, speed-up axes."""

    key: str
    label: str
    log: bool = False
    margin: str | None = None
    speed: bool = False


@dataclass(frozen=True)
class Figure:
    """One file: its stem, its title, its panels side by side (sharing the y axis)."""

    stem: str
    title: str
    panels: tuple[Panel, ...]


FIGURES = (
    Figure("ppl_vs_ratio", "WikiText-2 perplexity",
           (Panel("ppl/wikitext2", "WikiText-2 perplexity", log=True),)),
    Figure("zeroshot_vs_ratio", "zero-shot mean accuracy",
           (Panel("zs/mean", "zero-shot mean accuracy (%)", margin="zs/mean_stderr"),)),
    Figure("speedup_vs_ratio", "speed-up over the dense model, per speed protocol",
           (Panel("speed/prefill_speedup", "prefill speed-up (x dense)", speed=True),
            Panel("speed/decode_speedup", "decode speed-up (x dense)", speed=True),
            Panel("speed/throughput_speedup", "throughput speed-up (x dense)", speed=True))),
)


@dataclass(frozen=True)
class PlotOptions:
    """The perplexity cut: values above ``ppl_max``, or else above ``ppl_cut`` times the dense perplexity,
    are drawn off scale (no dense perplexity and no ``ppl_max``: no cut). ``column``: the paper-column
    layout (3.4 inches wide, panels stacked, legend below; files ``<stem>_column.*``) instead of the wide
    one (legend on the right)."""

    ppl_cut: float = 100.0
    ppl_max: float | None = None
    column: bool = False


@dataclass
class Legend:
    """What the figure's legend needs: the methods drawn and which reference marks appeared."""

    methods: set[str]
    marks: dict[str, Any]


def write_figures(points: Any, out: Path, name: str, options: PlotOptions = PlotOptions()) -> list[Path]:
    """Draw every figure that has data into `out` (PNG and PDF); returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_column" if options.column else ""
    written = []
    for figure, fig in draw_figures(points, name, options):
        for fmt in FORMATS:
            # atomically: the cells of a parallel sweep redraw the same files at once
            with atomic_target(out / f"{figure.stem}{suffix}.{fmt}") as tmp:
                fig.savefig(tmp, dpi=200, format=fmt, metadata=METADATA[fmt])
        plt.close(fig)
        written.append(out / f"{figure.stem}{suffix}.png")
    return written


def draw_figures(points: Any, name: str,
                 options: PlotOptions = PlotOptions()) -> Iterator[tuple[Figure, Any]]:
    """Each figure of ``FIGURES`` that the points have data for, with its matplotlib figure (left open)."""
    styles = styles_for(points["method"])
    for figure in FIGURES:
        panels = [p for p in figure.panels if p.key in points.columns and points[p.key].notna().any()]
        if panels:
            with plt.rc_context(COLUMN_RC if options.column else RC):  # sizes are fixed as texts are made
                fig = draw_figure(points, figure, panels, styles, f"{name}\n{figure.title}", options)
            yield figure, fig


def draw_figure(points: Any, figure: Figure, panels: list[Panel], styles: dict[str, Style], title: str,
                options: PlotOptions) -> Any:
    """The figure: its panels sharing the y axis, one legend outside all of them."""
    n = len(panels)
    shape, size = ((n, 1), (COLUMN_WIDTH_IN, COLUMN_PANEL_HEIGHT_IN * n)) if options.column else \
        ((1, n), (PANEL_WIDTH_IN * n + LEGEND_WIDTH_IN, HEIGHT_IN))
    fig, grid = plt.subplots(*shape, figsize=size, sharex=True, sharey=True, squeeze=False,
                             layout="constrained")
    axes = list(grid.flat)
    legend = Legend(methods=set(), marks={})
    y_ranges = []
    for ax, panel in zip(axes, panels):
        y_ranges.append(draw_panel(ax, points, panel, styles, legend, options))
        ax.set_title(panel.label if n > 1 else "")
    y_ranges = [r for r in y_ranges if r is not None]
    if y_ranges:  # the panels share their y axis: the range that holds all of them
        axes[0].set_ylim(min(r[0] for r in y_ranges), max(r[1] for r in y_ranges))
    for ax in axes if options.column else axes[:1]:
        ax.set_ylabel(panels[0].label if n == 1 else "speed-up (x dense)")
    if options.column:  # stacked: the x axis is named once, at the bottom
        for ax in axes[:-1]:
            ax.set_xlabel("")
    else:
        for ax in axes[1:]:
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(title, fontsize=plt.rcParams["axes.titlesize"], x=0.01, ha="left")  # left: short lines
    handles = [Line2D([], [], color=styles[m].color, marker=styles[m].marker, linestyle=styles[m].linestyle,
                      markersize=marker_size(styles[m].marker), label=m)
               for m in sorted(legend.methods, key=legend_order)]
    handles += list(legend.marks.values())
    (_column_legend if options.column else _side_legend)(fig, handles, size)
    return fig


def _side_legend(fig: Any, handles: list[Any], size: tuple[float, float]) -> None:
    """Right of the panels, in as many columns as its entries need; the figure widens to keep the panels'
    width."""
    rows = max(1, int(HEIGHT_IN * 72 * 0.85 // LEGEND_ROW_PT))
    columns = math.ceil(len(handles) / rows)
    fig.legend(handles=handles, loc="outside right upper", ncols=columns, frameon=False)
    fig.set_size_inches(size[0] + (columns - 1) * LEGEND_WIDTH_IN, size[1])


def _column_legend(fig: Any, handles: list[Any], size: tuple[float, float]) -> None:
    """Below the panels in two columns; the figure grows taller by its rows."""
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    rows = math.ceil(len(handles) / 2)
    fig.set_size_inches(size[0], size[1] + rows * COLUMN_LEGEND_ROW_PT / 72 + 0.2)


def draw_panel(ax: Any, points: Any, panel: Panel, styles: dict[str, Style], legend: Legend,
               options: PlotOptions) -> tuple[float, float] | None:
    """One metric against the achieved ratio: reference lines, our curves, the papers' hollow markers.
    Returns the y range it needs."""
    has = points[points[panel.key].notna()]
    ours, paper = has[has["kind"] == "ours"], has[has["kind"] == "paper"]
    reference = _reference(ax, ours, panel, legend)
    if panel.speed:
        _ideal(ax, points[points["kind"] == "ours"], legend)
    cut = _cut(panel, reference, options)
    off = _curves(ax, ours[ours["method"] != DENSE], panel, styles, cut, legend)
    _paper(ax, paper, panel, styles, legend)
    if panel.margin and not _has_margin(ours, panel) and len(ours):  # said in the legend, off the data
        legend.marks["no margin"] = Line2D([], [], linestyle="none",
                                           label="no 95% intervals:\nno zs/mean_stderr")
    ax.set_xlabel("parameters removed (%)")
    ax.grid(alpha=0.3)
    if panel.log:
        ax.set_yscale("log")
    strip = OFF_SCALE_STRIP_PT / (72 * (COLUMN_PANEL_HEIGHT_IN if options.column else HEIGHT_IN) * 0.7) \
        if off else 0.0  # the strip's share of the axes' height: room for a marker and its number
    y_range = _limits(ax, panel, _shown(has, panel, reference, cut), [*points[X].dropna()], cut, strip)
    if off and cut is not None and y_range is not None:
        ax.set_ylim(*y_range)  # the strip is drawn up to the top of the axes
        _off_scale(ax, off, cut, legend)
    return y_range


def _reference(ax: Any, ours: Any, panel: Panel, legend: Legend) -> float | None:
    """The dense model's value as a horizontal line (a speed-up: 1); returns it (None: no dense row)."""
    dense = ours[ours["method"] == DENSE][panel.key]
    reference = 1.0 if panel.speed else (float(dense.iloc[0]) if len(dense) else None)
    if reference is not None:
        ax.axhline(reference, color=DENSE_STYLE.color, linewidth=1.0, alpha=0.6, zorder=1)
        legend.marks["dense"] = Line2D([], [], color=DENSE_STYLE.color, alpha=0.6, label="dense")
    return reference


def _curves(ax: Any, curves: Any, panel: Panel, styles: dict[str, Style], cut: float | None,
            legend: Legend) -> list[tuple[float, float, Style]]:
    """Each method's curve; returns the values above the cut as (x, y, style)."""
    methods = sorted(set(curves["method"]), key=legend_order)
    dodge = min(DODGE_PT, DODGE_SPAN_PT / max(1, len(methods) - 1)) if _has_margin(curves, panel) else 0.0
    off = []
    for i, method in enumerate(methods):
        s = series(curves[curves["method"] == method], panel)
        _curve(ax, method, s, styles[method], cut, (i - (len(methods) - 1) / 2) * dodge, legend)
        if cut is not None:
            off += [(x, y, styles[method]) for x, y in zip(s["x"], s["y"]) if y > cut]
    legend.methods.update(methods)
    return off


def _shown(has: Any, panel: Panel, reference: float | None, cut: float | None) -> list[float]:
    """The values the y axis must hold: every point under the cut, its 95% interval, the reference."""
    values = [*has[panel.key], *([reference] if reference is not None else [])]
    if panel.margin and panel.margin in has.columns:
        margin = has[panel.margin].fillna(0.0)
        values += [*(has[panel.key] - margin), *(has[panel.key] + margin)]
    return [v for v in values if v == v and (cut is None or v <= cut)]


def _has_margin(rows: Any, panel: Panel) -> bool:
    return bool(panel.margin and panel.margin in rows.columns and rows[panel.margin].notna().any())


def series(rows: Any, panel: Panel) -> Any:
    """One method's points by ratio, from ``prune.seeds.spread`` over the cells that differ only in their
    seed: x, y (mean), lo/hi (the seeds' range), n, margin (mean 95% half-width, when recorded)."""
    import pandas as pd

    from prune.seeds import spread

    out = []
    for _, cells in rows.groupby("ratio", dropna=False):
        s = spread([float(v) for v in cells[panel.key]])
        margin = cells[panel.margin].mean() if panel.margin and panel.margin in cells.columns else math.nan
        out.append({"x": cells[X].mean(), "y": s["mean"], "lo": s["min"], "hi": s["max"], "n": s["n"],
                    "margin": margin})
    frame = pd.DataFrame(out, columns=["x", "y", "lo", "hi", "n", "margin"])
    return frame.sort_values("x", ignore_index=True)


def _cut(panel: Panel, reference: float | None, options: PlotOptions) -> float | None:
    if not panel.log:
        return None
    if options.ppl_max is not None:
        return options.ppl_max
    return options.ppl_cut * reference if reference else None


def _curve(ax: Any, label: str, s: Any, style: Style, cut: float | None, dodge_pt: float,
           legend: Legend) -> None:
    """A method's line (off-scale values held at the cut), its markers, its seed band and 95% bars."""
    y_line = s["y"]
    if cut is not None:  # into the strip from the last value on scale; between two off-scale values, nothing
        off = s["y"] > cut
        y_line = s["y"].clip(upper=cut).where(~off | ~off.shift(1, fill_value=True)
                                               | ~off.shift(-1, fill_value=True))
    shift = ax.transData + ScaledTranslation(dodge_pt / 72, 0, ax.figure.dpi_scale_trans)
    ax.plot(s["x"], y_line, color=style.color, linestyle=style.linestyle, linewidth=1.4, zorder=3,
            transform=shift)
    inside = s if cut is None else s[s["y"] <= cut]
    ax.plot(inside["x"], inside["y"], color=style.color, marker=style.marker, linestyle="none",
            markersize=marker_size(style.marker), zorder=4, transform=shift, gid=f"method:{label}")
    if (s["n"] > 1).any():
        ax.fill_between(s["x"], s["lo"], s["hi"], color=style.color, alpha=0.15, linewidth=0, zorder=2,
                        gid="seed-band")
        legend.marks["band"] = Patch(color="grey", alpha=0.3, label="seed range (min-max)")
    if s["margin"].notna().any():
        ax.errorbar(s["x"], s["y"], yerr=s["margin"], fmt="none", ecolor=style.color, elinewidth=0.9,
                    capsize=2.5, zorder=3, transform=shift)
        legend.marks["margin"] = Line2D([], [], color="grey", marker="|", markersize=10, linestyle="none",
                                        label="95% interval (items)")


def marker_size(marker: str) -> float:
    """The layout's marker size; thin-armed markers (a star) a third larger, to look as large as the rest."""
    return plt.rcParams["lines.markersize"] * (1.35 if marker in THIN_MARKERS else 1.0)


def _paper(ax: Any, paper: Any, panel: Panel, styles: dict[str, Style], legend: Legend) -> None:
    """The papers' figures: hollow markers of the method's style, no line (other models, other setups)."""
    for method, rows in paper.groupby("method"):
        style = styles[method]
        size = (marker_size(style.marker) + 1) ** 2  # a little larger than ours: hollow reads lighter
        ax.scatter(rows[X], rows[panel.key], marker=style.marker, s=size, facecolors="none",
                   edgecolors=style.color, linewidths=1.3, zorder=5, gid=f"paper:{method}")
        if method != DENSE:
            legend.methods.add(method)
    if len(paper):
        legend.marks["paper"] = Line2D([], [], color="grey", marker="o", markerfacecolor="none",
                                       linestyle="none", label="paper (hollow)")


def _ideal(ax: Any, ours: Any, legend: Legend) -> None:
    """The speed-up the parameters removed would give alone: one dashed curve from the dense point."""
    if IDEAL not in ours.columns or not ours[IDEAL].notna().any():
        return
    pts = sorted({(0.0, 1.0), *ours[ours[IDEAL].notna()][[X, IDEAL]].itertuples(index=False, name=None)})
    ax.plot(*zip(*pts), color="grey", linestyle="--", linewidth=1.2, zorder=2)
    legend.marks["ideal"] = Line2D([], [], color="grey", linestyle="--", label="ideal (params removed)")


def _limits(ax: Any, panel: Panel, shown: list[float], xs: list[float], cut: float | None,
            strip: float) -> tuple[float, float] | None:
    """The x limits (set here: curves shifted sideways are not autoscaled) and the y range the values shown
    need, with the top `strip` share of the height above the cut for the off-scale values."""
    ax.set_xlim(min(xs) - 2.0, max(xs) * 1.05 + 2.0)
    if not shown:
        return None
    low, high = min(shown), max(shown)
    if panel.log:
        low, high = low / 1.4, high * 1.4
        if strip and cut is not None:
            high = cut * (cut / low) ** (strip / (1 - strip))
    else:
        pad = 0.08 * (high - low or abs(high) or 1.0)
        low, high = low - pad, high + pad
    return low, high


def _off_scale(ax: Any, off: list[tuple[float, float, Style]], cut: float, legend: Legend) -> None:
    """Each value above the cut: an upward triangle in the shaded strip above it, with the value written
    above; values at the same ratio side by side, largest first."""
    bottom, top = ax.get_ylim()
    ax.set_yticks([t for t in ax.get_yticks() if bottom <= t <= cut])  # no scale in the strip: no ticks
    ax.set_yticks([t for t in ax.get_yticks(minor=True) if bottom <= t <= cut], minor=True)
    ax.set_ylim(bottom, top)
    ax.axhspan(cut, top, color="0.92", zorder=0)
    ax.axhline(cut, color="0.6", linewidth=0.8, linestyle=":", zorder=1)
    ax.annotate(f"off scale above {cut:,.0f}", (0.01, cut), xycoords=("axes fraction", "data"),
                xytext=(0, -2), textcoords="offset points", va="top", fontsize=6, color="0.35")
    y_mark = cut * (top / cut) ** 0.15
    by_x: dict[float, list[tuple[float, Style]]] = {}
    for x, y, style in off:
        by_x.setdefault(round(x, 1), []).append((y, style))
    for x, group in by_x.items():
        group.sort(key=lambda item: -item[0])
        for i, (y, style) in enumerate(group):
            dx = (i - (len(group) - 1) / 2) * OFF_SCALE_STEP_EM * plt.rcParams["font.size"]
            offset = ScaledTranslation(dx / 72, 0, ax.figure.dpi_scale_trans)
            ax.plot([x], [y_mark], marker="^", color=style.color, linestyle="none", zorder=6,
                    transform=ax.transData + offset, gid="off-scale")
            ax.annotate(off_scale_text(y), (x, y_mark), xytext=(dx, 5), textcoords="offset points",
                        rotation=90, ha="center", va="bottom", fontsize=6, color=style.color,
                        gid="off-scale-label", annotation_clip=False)
    legend.marks["off"] = Line2D([], [], color="grey", marker="^", linestyle="none",
                                 label="off scale (value written)")


def off_scale_text(value: float) -> str:
    """A value in a few characters: 2,534 / 1.7e11."""
    if value < 1e5:
        return f"{value:,.0f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"
