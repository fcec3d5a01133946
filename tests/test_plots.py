"""The sweep figures (prune.plots) of a synthetic sweep with more methods than matplotlib's colour cycle:
one style per method, legends outside the axes, off-scale perplexity drawn and labelled, 95% intervals and
seed bands, the papers' figures as hollow markers; and the W&B fields a dashboard groups by."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib.pyplot as plt
import pytest

from prune import plots
from prune.plots.draw import FIGURES, PlotOptions, draw_figures, off_scale_text
from prune.plots.points import from_cells, read_table
from prune.styles import METHOD_STYLES, styles_for

REPO = Path(__file__).resolve().parents[1]
COMING = ["slicegpt", "llm_pruner", "flap", "wanda_sp", "wanda", "sparsegpt", "magnitude"]
# 17 methods of the style table, two a new method would bring before its row, two ablation variants
METHODS = [m for m in METHOD_STYLES if m != "dense"] + ["newcomer_a", "newcomer_b"]
FULL = {"search": True, "unit": "block"}  # BlockPruner's settings; the first cell of it is the full method
VARIANTS = {"blockpruner[search=false]": FULL | {"search": False},
            "blockpruner[unit=layer]": FULL | {"unit": "layer"}}
HUGE = 1.7e11  # LaCo's perplexity at 20% on the reference sweep: far off any useful scale
DENSE = {"params/total": 1000, "ppl/wikitext2": 20.0, "zs/mean": 0.46}


def _metrics(i: int, ratio: float, seed: int) -> dict[str, float]:
    return {"params/removed_frac": ratio * (0.9 + 0.01 * i),
            "ppl/wikitext2": 30.0 * (1 + i) * (1 + ratio) + seed,
            "zs/mean": 0.44 - 0.005 * i - 0.1 * ratio + 0.01 * seed, "zs/mean_stderr": 0.02,
            "speed/prefill_speedup": 1 + ratio * (1 + 0.02 * i), "speed/decode_speedup": 1 + 0.8 * ratio,
            "speed/throughput_speedup": 1 + 0.9 * ratio - 0.01 * i, "speed/ideal_speedup": 1 / (1 - ratio)}


def _record(method: str, settings: dict[str, Any], ratio: float, seed: int,
            metrics: dict[str, float]) -> dict[str, Any]:
    return {"status": "complete", "metrics": metrics, "dense_metrics": DENSE,
            "plan": {"method": method, "drop_layers": []},
            "config": {"ratio": ratio, "seed": seed, "method": {"_target_": "x", "seed": seed, **settings}}}


def synthetic_sweep(root: Path) -> int:
    """Cells of 23 labels at two ratios (one method with three seeds, LaCo off scale); returns the label
    count."""
    records = [_record("dense", {}, 0.0, 0, DENSE | {"params/removed_frac": 0.0})]
    labels = METHODS + list(VARIANTS)
    for i, label in enumerate(labels):
        method = label.split("[")[0]
        settings = VARIANTS.get(label, FULL if method == "blockpruner" else {})
        for ratio in (0.2, 0.5):
            for seed in ((0, 1, 2) if method == "sleb" else (0,)):
                metrics = _metrics(i, ratio, seed)
                if method == "laco":
                    metrics["ppl/wikitext2"] = HUGE
                records.append(_record(method, settings, ratio, seed, metrics))
    for n, record in enumerate(records):
        (root / f"cell{n:03d}").mkdir(parents=True)
        (root / f"cell{n:03d}" / "results.json").write_text(json.dumps(record))
    return len(labels)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("sweep")
    return root, synthetic_sweep(root)


@pytest.fixture(scope="module", params=[False, True], ids=["wide", "column"])
def figures(sweep: tuple[Path, int], request: pytest.FixtureRequest) -> dict[str, Any]:
    """The synthetic sweep's figures, drawn (so that their boxes are known), in each layout."""
    points = from_cells(plots.load_cells(sweep[0]))
    options = PlotOptions(column=request.param)
    figs = {figure.stem: fig for figure, fig in draw_figures(points, "synthetic", options)}
    for fig in figs.values():
        fig.canvas.draw()
    yield figs
    for fig in figs.values():
        plt.close(fig)


def test_styles_are_distinct_and_fixed() -> None:
    names = list(METHOD_STYLES) + COMING + [f"unknown{i}" for i in range(10)] + list(VARIANTS)
    styles = styles_for(names)
    assert len({(s.color, s.marker, s.linestyle) for s in styles.values()}) == len(set(names))
    assert len({s.color for s in METHOD_STYLES.values()}) == len(METHOD_STYLES)  # colours alone tell apart
    assert set(COMING) <= set(METHOD_STYLES) and len(METHOD_STYLES) >= 18
    assert styles_for(["sleb"])["sleb"] == styles["sleb"] == METHOD_STYLES["sleb"]  # the same in any figure
    variant = styles["blockpruner[search=false]"]  # its method's marker, a colour of its own, dashed
    assert (variant.marker, variant.linestyle) == (METHOD_STYLES["blockpruner"].marker, "--")
    assert variant.color not in {s.color for s in METHOD_STYLES.values()}


def test_cells_labelled_like_the_tables(sweep: tuple[Path, int]) -> None:
    points = from_cells(plots.load_cells(sweep[0]))
    labels = set(points["method"])
    assert len(labels - {"dense"}) == sweep[1] > 20
    assert {"blockpruner", *VARIANTS} <= labels


def test_every_method_drawn_in_its_own_style(figures: dict[str, Any], sweep: tuple[Path, int]) -> None:
    for stem, fig in figures.items():
        for ax in fig.axes:
            drawn = {line.get_gid().removeprefix("method:"): (line.get_color(), line.get_marker())
                     for line in ax.get_lines() if (line.get_gid() or "").startswith("method:")}
            if stem != "ppl_vs_ratio":  # there LaCo is off scale: its markers are the strip's
                assert len(drawn) == sweep[1], stem
            assert len(set(drawn.values())) == len(drawn), f"{stem}: two methods share a style"


def test_legends_lie_outside_the_axes(figures: dict[str, Any]) -> None:
    assert set(figures) == {f.stem for f in FIGURES}
    assert len(figures["speedup_vs_ratio"].axes) == 3  # prefill, decode, throughput: one panel each
    for stem, fig in figures.items():
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), stem
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), f"{stem}: legend over the data"
            assert ax.get_legend() is None


def test_off_scale_values_drawn_and_labelled(figures: dict[str, Any]) -> None:
    (ax,) = figures["ppl_vs_ratio"].axes
    marks = [line for line in ax.get_lines() if line.get_gid() == "off-scale"]
    labels = [t.get_text() for t in ax.texts if t.get_gid() == "off-scale-label"]
    assert len(marks) == 2 and labels == [off_scale_text(HUGE)] * 2 == ["1.7e11"] * 2
    bottom, top = ax.get_ylim()
    assert all(bottom < line.get_ydata()[0] < top for line in marks)  # inside the axes, in the strip
    cut = 100 * DENSE["ppl/wikitext2"]  # the default cut: 100x the dense perplexity
    share = math.log(cut / bottom) / math.log(top / bottom)  # of the axes' height, below the cut
    assert 0.5 < share < 0.9 and top < 1e6  # most of the axis for the values on scale, not up to 1e11
    assert off_scale_text(2534.4) == "2,534"


def test_uncertainty_intervals_and_seed_bands(figures: dict[str, Any]) -> None:
    (ax,) = figures["zeroshot_vs_ratio"].axes
    assert len(ax.containers) >= 20  # one set of 95% error bars per method
    bands = [c for c in ax.collections if c.get_gid() == "seed-band"]
    assert len(bands) == 1  # SLEB, the one method with three seeds


def test_table_figures_with_hollow_paper_markers(tmp_path: Path) -> None:
    table = REPO / "experiments" / "table2" / "results" / "reference" / "table.csv"
    points = read_table(table)
    assert {"ours", "paper"} == set(points["kind"])
    figs = dict(draw_figures(points, "table2"))
    try:
        papers = [c for ax in figs[FIGURES[0]].axes for c in ax.collections
                  if (c.get_gid() or "").startswith("paper:")]
        assert papers and all(c.get_facecolors().size == 0 or c.get_facecolors()[:, 3].max() == 0
                              for c in papers)
    finally:
        for fig in figs.values():
            plt.close(fig)
    assert plots.main(["--from-table", str(table), "--out", str(tmp_path)]) == 0
    assert plots.main(["--from-table", str(table), "--out", str(tmp_path), "--column"]) == 0
    for stem in ("ppl_vs_ratio", "zeroshot_vs_ratio", "speedup_vs_ratio"):
        for name in (stem, f"{stem}_column"):
            assert (tmp_path / f"{name}.png").stat().st_size > 0 and (tmp_path / f"{name}.pdf").is_file()


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plots.main([]) == 2
    assert plots.main([str(tmp_path), "--ppl-cut", "0.5"]) == 2
    assert plots.main(["--from-table", str(tmp_path / "none.csv")]) == 2
    assert "error:" in capsys.readouterr().err
    assert plots.write_plots(tmp_path) == []  # no cells: nothing drawn


def test_write_plots_into_the_sweep(sweep: tuple[Path, int]) -> None:
    written = plots.write_plots(sweep[0])
    assert [p.name for p in written] == [f"{f.stem}.png" for f in FIGURES]
    assert all(p.with_suffix(".pdf").is_file() for p in written)


class _Recorder:
    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        update = lambda values, allow_val_change: self.config.update(values)  # noqa: E731  (W&B's signature)
        self.run = SimpleNamespace(config=SimpleNamespace(update=update))

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.metrics |= metrics

    def log_table(self, *args: Any) -> None:
        pass

    def log_file(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_images(self, images: dict[str, Path]) -> None:
        self.images = images


def test_run_logs_fields_wandb_groups_by(tmp_path: Path) -> None:
    from prune import runner

    record = _record("sleb", {}, 0.25, 0, _metrics(0, 0.25, 0))
    record["plan"]["drop_layers"] = [3]
    (tmp_path / "prune_plan.json").write_text("{}")
    logger = _Recorder()
    runner._log_run(logger, record, tmp_path, [tmp_path / "ppl_vs_ratio.png"])
    fields = {"cell/method": "sleb", "cell/ratio": 0.25, "cell/achieved_ratio": 0.25 * 0.9}
    assert {k: logger.metrics[k] for k in fields} == fields == logger.config
    assert logger.metrics["ppl/wikitext2"] == record["metrics"]["ppl/wikitext2"]
    assert set(logger.images) == {"plots/ppl_vs_ratio"}
