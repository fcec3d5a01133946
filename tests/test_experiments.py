"""Paper-table experiments: every experiment composes at every scale, the grids list every method, the
aggregation (prune.tables) matches the cells' results.json, `make reproduce-table2 SCALE=smoke` runs and
resumes, W&B summary/report behave, and the submitit launcher runs cells."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from prune import tables, tracking
from tests.conftest import CONF, REPO

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SCALES = sorted(p.stem for p in (CONF / "scale").glob("*.yaml"))
NOT_COMPARED = {"plan"}  # replays a saved plan: a tool, not a method of the tables
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem not in NOT_COMPARED)
EXPECTED_COLUMNS = ["paper", "table", "model", "method", "ratio", "metric", "value", "note"]


def compose_full(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def grid_of(cfg) -> dict:
    params = cfg.hydra.sweeper.get("params") or {}
    return tables.grid_params({k: str(v) for k, v in params.items()}, [])


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_at_every_scale(experiment: str, scale: str) -> None:
    cfg = compose_full(f"experiment={experiment}", f"scale={scale}")
    assert cfg.experiment_name == experiment and cfg.scale.name == scale
    assert Path(cfg.hydra.sweep.dir) == Path(cfg.paths.outputs_root) / experiment / scale
    for name, node in cfg.eval.items():  # every evaluator builds (no partial nodes from the scale)
        if node is not None:
            assert hasattr(instantiate(node), "describe"), name
    for cell in tables.grid_cells(grid_of(cfg)):
        assert cell.get("method", cfg.hydra.runtime.choices.method) in METHODS
    if scale == "paper":
        assert cfg.model.name == "llama2_7b" and cfg.model.preset is None
    elif scale == "reference":
        assert cfg.model.name == "smollm2_135m" and cfg.model.preset.ppl_windows == 6
    else:
        assert cfg.model.random_config is not None and cfg.logger.kind == "none"


def test_a_table_run_with_eval_ppl_runs_only_perplexity() -> None:
    """The table's zero-shot settings stay behind when eval=ppl selects no zero-shot evaluator."""
    from prune.runner import selected_evaluators

    cfg = compose_full("experiment=table2", "scale=smoke", "eval=ppl")
    assert "zeroshot" in cfg.eval and list(selected_evaluators(cfg.eval)) == ["ppl"]


def test_paper_is_the_default_scale_of_a_table() -> None:
    for table in tables.TABLES:
        assert compose_full(f"experiment={table}").scale.name == "paper"


@pytest.mark.parametrize("table", ["table1", "table2"])
def test_main_grids_list_every_method(table: str) -> None:
    """A new conf/method/<name>.yaml must be added to the grid (one word in hydra.sweeper.params.method)."""
    grid = grid_of(compose_full(f"experiment={table}"))
    assert sorted(grid["method"]) == METHODS


@pytest.mark.parametrize("table", sorted(tables.TABLES))
def test_each_table_has_config_readme_and_expected_numbers(table: str) -> None:
    assert (CONF / "experiment" / f"{table}.yaml").is_file()
    folder = REPO / "experiments" / table
    assert (folder / "README.md").is_file()
    with open(folder / "expected.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == EXPECTED_COLUMNS and len(rows) > 1
    keys = {c.key for c in tables.TABLES[table].columns}
    for row in rows[1:]:
        record = dict(zip(EXPECTED_COLUMNS, row))
        assert record["metric"] in keys, f"{table}: {record['metric']} is not a column of the table"
        assert 0.0 <= float(record["ratio"]) < 1.0 and math.isfinite(float(record["value"]))


def test_slurm_launcher_defaults_compose() -> None:
    launcher = compose_full("experiment=table2", "hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.timeout_min >= 60
    joblib = pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    assert joblib is not None
    assert compose_full("hydra/launcher=joblib").hydra.launcher._target_.endswith("JoblibLauncher")


def _record(method: str, ratio: float, ppl: float, zs: float, search: bool = True) -> dict:
    return {"choices": {"method": method},
            "config": {"ratio": ratio, "model": {"name": "m"}, "method": {"search": search}},
            "metrics": {"ppl/wikitext2": ppl, "zs/mean": zs, "params/removed_frac": ratio,
                        "layers/removed": 1},
            "provenance": {"created_at": "2026-01-01T00:00:00"}}


def test_table_places_paper_numbers_and_differences_beside_ours() -> None:
    import pandas as pd

    grid = {"method": ["blockpruner"], "method.search": [True, False], "ratio": [0.21]}
    cells = tables.grid_cells(grid)
    records = [_record("blockpruner", 0.21, 10.0, 0.61),
               _record("blockpruner", 0.21, 12.0, 0.50, search=False)]
    matched = tables.match_cells(cells, records)
    assert matched == records
    expected = pd.DataFrame([["P", "T2", "m7", "blockpruner[search=false]", 0.2095, "zs/mean", 55.89, "n"],
                             ["P", "T1", "m7", "slicegpt", 0.2145, "zs/mean", 57.83, ""]],
                            columns=EXPECTED_COLUMNS)
    df = tables.build_table(tables.TABLES["blockpruner_table2"], grid, list(zip(cells, matched)), expected)
    assert list(df["kind"]) == ["ours", "ours", "paper", "diff", "paper"]
    assert list(df["method"][:2]) == ["blockpruner", "blockpruner[search=false]"]
    assert df["Avg"][1] == pytest.approx(50.0) and df["Avg"][2] == 55.89
    assert df["Avg"][3] == pytest.approx(50 - 55.89)  # ours - paper
    assert df["source"][4].endswith("(not in the grid)")
    assert tables.match_cells([{"method": "dense", "ratio": 0.5}], records) == [None]


def test_rft_table_names_the_recovery_variant_and_places_the_papers_rft_figures() -> None:
    """experiment=rft: rows of the rft=lora_trsp cells are ``<method>[rft=lora_trsp]`` (the grid's first
    value, rft=none, is the plain method), beside the papers' figures with the same RFT flag."""
    import pandas as pd

    grid = {"method": ["shortgpt", "elder"], "rft": ["none", "lora_trsp"], "ratio": [0.25]}
    cells = tables.grid_cells(grid)
    records = []
    for cell in cells:
        record = _record(cell["method"], 0.25, 30.0 if cell["rft"] == "none" else 20.0, 0.4)
        record["choices"]["rft"] = cell["rft"]
        if cell["rft"] != "none":
            record["metrics"] |= {"pre_rft/ppl/wikitext2": 30.0, "time/rft_s": 60.0, "rft/tokens": 20480}
        records.append(record)
    matched = tables.match_cells(cells, records)
    assert matched == records
    expected = tables.load_expected("rft")
    df = tables.build_table(tables.TABLES["rft"], grid, list(zip(cells, matched)), expected)
    ours = df[df["kind"] == "ours"]
    assert list(ours["method"]) == ["shortgpt", "shortgpt[rft=lora_trsp]", "elder", "elder[rft=lora_trsp]"]
    assert list(ours["PPL pre-RFT"])[1] == 30.0 and list(ours["RFT tokens"])[1] == 20480
    papers = df[(df["kind"] == "paper") & (df["method"] == "shortgpt[rft=lora_trsp]")]
    assert list(papers["PPL"]) == [8.89]  # TRSP's ShortGPT with LoRA RFT, not BlockPruner's without
    assert isinstance(expected, pd.DataFrame)


def test_table_lists_the_cells_that_failed(tmp_path: Path, capsys) -> None:
    """A cell with bad input leaves error.txt (prune/sweep.py); the table names it and its error."""
    cell = tmp_path / "outputs" / "table2" / "smoke" / "method=disp,ratio=0.2"
    cell.mkdir(parents=True)
    (cell / "error.txt").write_text("error: ratio=0.2 of all parameters is unreachable\n")
    meta = tables.aggregate("table2", ["scale=smoke", f"paths.outputs_root={tmp_path}/outputs"],
                            results_dir=tmp_path / "table", log=False)
    assert meta["cells_done"] == 0
    assert meta["cells_failed"] == {
        "method=disp,ratio=0.2": "error: ratio=0.2 of all parameters is unreachable"}
    assert "Failed cells" in (tmp_path / "table" / "table.md").read_text()
    assert "failed: method=disp,ratio=0.2: error: ratio=0.2" in capsys.readouterr().out


def test_speedups_are_taken_against_the_tables_dense_row() -> None:
    import pandas as pd

    grid = {"method": ["dense", "shortgpt"], "ratio": [0.5]}
    cells = tables.grid_cells(grid)
    dense, pruned = _record("dense", 0.5, 10.0, 0.6), _record("shortgpt", 0.5, 20.0, 0.5)
    dense["metrics"] |= {"speed/prefill_ms": 100.0, "speed/throughput_tok_s": 50.0}
    # measured against a stale dense cache entry (prefill 150 ms) when the cell ran
    pruned["metrics"] |= {"speed/prefill_ms": 60.0, "speed/throughput_tok_s": 80.0,
                          "speed/prefill_speedup": 2.5}
    expected = pd.DataFrame([], columns=EXPECTED_COLUMNS)
    df = tables.build_table(tables.TABLES["table2"], grid, list(zip(cells, [dense, pruned])), expected)
    assert list(df["latency x"]) == pytest.approx([1.0, 100 / 60])
    assert list(df["throughput x"]) == pytest.approx([1.0, 80 / 50])


def test_preset_line_prints_method_blocks_as_dotted_keys() -> None:
    from prune.tables.render import preset_line

    def line(preset: dict | None) -> str:
        return preset_line({"config": {"model": {"preset": preset}}})

    flat = {"name": "cpu", "ppl_windows": 6, "calib_nsamples": 8, "zs_limit": 100, "disp_steps": 200,
            "speed": {"prefill_len": 512, "decode_iters": 5}}
    assert line(flat) == ("preset `cpu`: ppl_windows=6, calib_nsamples=8, zs_limit=100, disp_steps=200; "
                          "speed prefill_len=512, decode_iters=5")
    nested = {"name": "cpu", "ppl_windows": 6, "disp": {"steps": 200, "nsamples": None},
              "search": {"sequences": 4}, "speed": {"prefill_len": 512}}
    assert line(nested) == ("preset `cpu`: ppl_windows=6, disp.steps=200, disp.nsamples=None, "
                            "search.sequences=4; speed prefill_len=512")
    assert line(None) == "no preset (the papers' full protocols)"
    assert preset_line(None) == ""


def test_config_content_that_is_not_a_mapping_is_the_users_error() -> None:
    from omegaconf import OmegaConf

    from prune.errors import PruneError
    from prune.sweep import Progress
    from prune.tables.grid import mapping

    with pytest.raises(PruneError, match=r"hydra.sweeper.params must be a mapping, got \[1, 2\]"):
        mapping(OmegaConf.create([1, 2]), "hydra.sweeper.params")
    with pytest.raises(PruneError, match="scale must be a mapping, got 'smoke'"):
        mapping("smoke", "scale")
    assert mapping(None, "scale") == {} and mapping(OmegaConf.create({"a": 1}), "scale") == {"a": 1}
    assert tables.Progress is Progress  # configs that still name prune.tables.Progress keep working


def _smoke_env(tmp: Path) -> dict:
    cache = os.environ.get("PRUNE_TEST_CACHE") or str(tmp.parent / "cache")
    return {**os.environ, "WANDB_MODE": "disabled", "PRUNE_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smoke_table2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, float]:
    """`make reproduce-table2 SCALE=smoke` into a temporary outputs root (run once for this module)."""
    out = tmp_path_factory.mktemp("reproduce")
    started = time.perf_counter()
    proc = _make_smoke(out)
    return out, proc, time.perf_counter() - started


def _make_smoke(out: Path) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cmd = ["make", "--no-print-directory", "-o", ".venv/.installed-stamp", "reproduce-table2", "SCALE=smoke",
           f"PY={sys.executable}", f"ARGS=paths.outputs_root={out}/outputs logger=none"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_smoke_env(out), timeout=600)


def test_reproduce_table2_smoke_matches_the_cells(smoke_table2) -> None:
    out, proc, took = smoke_table2
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = out / "outputs" / "table2" / "smoke"
    n = len(tables.grid_cells(grid_of(compose_full("experiment=table2", "scale=smoke"))))
    progress = [line for line in proc.stdout.splitlines() if f"/{n}] " in line and line.endswith(" s")]
    assert len(progress) == n  # one progress line per cell
    files = sorted(sweep.glob("*/results.json"))
    assert len(files) == n
    table = sweep / "table"
    assert {"table.md", "table.csv", "table.tex", "meta.json"} <= {p.name for p in table.iterdir()}
    with open(table / "table.csv") as f:
        ours = {f"{r['method']}@{float(r['ratio']):g}": r for r in csv.DictReader(f) if r["kind"] == "ours"}
    assert len(ours) == n - 1  # the dense model once
    spec = tables.TABLES["table2"]
    for path in files:
        record = json.loads(path.read_text())
        method, ratio = record["choices"]["method"], record["config"]["ratio"]
        if method == "dense" and ratio != 0.2:
            continue  # the table shows the dense model once: the grid's first cell
        row = ours[f"{method}@{ratio if method != 'dense' else 0:g}"]
        for col in spec.columns:
            value = record["metrics"].get(col.key)
            if isinstance(value, (int, float)) and col.label in row:
                assert float(row[col.label]) == pytest.approx(value * col.scale, rel=1e-9), (
                    method, col.label)
    meta = json.loads((table / "meta.json").read_text())
    assert meta["cells_done"] == n and meta["cells_missing"] == []
    assert "| method" in (table / "table.md").read_text()
    print(f"make reproduce-table2 SCALE=smoke: {took:.0f} s")


def test_reproduce_table2_smoke_rerun_recomputes_nothing(smoke_table2) -> None:
    out, first, _ = smoke_table2
    assert first.returncode == 0
    started = time.perf_counter()
    again = _make_smoke(out)
    took = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [line for line in again.stdout.splitlines() if line.startswith("[") and line.endswith(" s")]
    assert lines and all("skipped (results.json exists)" in line for line in lines)
    assert took < 60, f"re-run took {took:.0f} s"


def test_summary_run_logs_the_table_offline(smoke_table2, tmp_path: Path) -> None:
    out, proc, _ = smoke_table2
    assert proc.returncode == 0
    cmd = [sys.executable, "-m", "prune.tables", "table2", "scale=smoke", f"paths.outputs_root={out}/outputs",
           "logger=wandb", "--out", str(tmp_path / "table")]
    agg = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**_smoke_env(out), "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert agg.returncode == 0, agg.stderr[-3000:]
    assert "W&B summary run: group table2-smoke (offline)" in agg.stdout
    assert (tmp_path / "table" / "table.csv").is_file()
    runs = list((out / "outputs" / "table2" / "smoke" / "_summary" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_sweep_group_names_one_group_per_scale() -> None:
    assert tracking.sweep_group("table2", {"scale": {"name": "reference"}}) == "table2-reference"
    assert tracking.sweep_group("adhoc", {}) == "adhoc"


def test_report_fails_with_one_line_naming_the_fix(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": ""}
    cmd = [sys.executable, "-m", "prune.tables", "table2", "scale=smoke", f"paths.outputs_root={tmp_path}",
           "--report"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("pip install" in errors[0] or "wandb login" in errors[0])


def test_submitit_local_runs_each_cell_in_its_own_process(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "run.py"), "-m", "hydra/launcher=submitit_local",
           "method=dense,shortgpt", "ratio=0.25", "eval=ppl", "debug=tiny",
           f"paths.outputs_root={tmp_path}/outputs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_smoke_env(tmp_path),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = sorted((tmp_path / "outputs" / "adhoc").glob("*/results.json"))
    assert [p.parent.name for p in cells] == ["debug=tiny,eval=ppl,method=dense,ratio=0.25",
                                              "debug=tiny,eval=ppl,method=shortgpt,ratio=0.25"]
    assert list((tmp_path / "outputs" / "adhoc" / ".submitit").iterdir())  # the jobs' submitit folders
