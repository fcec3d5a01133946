"""Sweep plots from the cells' ``results.json`` files: perplexity, zero-shot mean and speed-up against the
achieved ratio, one line per method. Written as PNG files into the experiment directory after every run
(so a sweep's plots are always current) and logged to W&B as images by the runner.

    python -m prune.plots outputs/<experiment_name>      # redraw by hand
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from prune import quality  # noqa: E402

# (file stem, y metric, y label, log scale)
PLOTS = [
    ("ppl_vs_ratio", "ppl/wikitext2", "WikiText-2 perplexity", True),
    ("zeroshot_vs_ratio", "zs/mean", "zero-shot mean accuracy", False),
    ("speedup_vs_ratio", "speed/prefill_speedup", "prefill speed-up (x dense)", False),
]


def load_cells(root: Path) -> list[dict[str, Any]]:
    """Every finished cell directly under `root` (one level of run directories)."""
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/results.json"))]


def _series(cells: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for cell in cells:
        m = cell["metrics"]
        if metric in m and m[metric] == m[metric]:  # skip NaN
            label = f"{cell['plan']['method']} {quality.mark(cell)}".rstrip()  # flagged cells: own series
            series[label].append((100 * m["params/removed_frac"], float(m[metric])))
    return {k: sorted(v) for k, v in series.items()}


def write_plots(root: Path) -> list[Path]:
    """Draw every plot that has data; returns the PNG paths written."""
    cells = load_cells(root)
    written: list[Path] = []
    for stem, metric, label, log_scale in PLOTS:
        series = _series(cells, metric)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, points in sorted(series.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=method)
        if stem == "speedup_vs_ratio":
            ideal = _series(cells, "speed/ideal_speedup")
            pts = sorted({p for v in ideal.values() for p in v})
            if pts:
                ax.plot(*zip(*pts), linestyle="--", color="gray", label="ideal (params)")
            decode = _series(cells, "speed/decode_speedup")
            for method, points in sorted(decode.items()):
                ax.plot(*zip(*points), marker="x", linestyle=":", label=f"{method} (decode)")
        ax.set_xlabel("parameters removed (%)")
        ax.set_ylabel(label)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{root.name}: {label}")
        fig.tight_layout()
        path = root / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_plots(Path(sys.argv[1])):
        print(p)
