"""prune.seeds: cells that differ only in their seed are grouped and their spread is computed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from prune import seeds
from tests.test_run_smoke import run_cli

REPO = Path(__file__).resolve().parents[1]


def _cell(sweep: Path, overrides: list[str], config: dict, metrics: dict) -> None:
    cell = sweep / ",".join(overrides)
    (cell / ".hydra").mkdir(parents=True)
    (cell / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    record = {"status": "complete", "config": config, "metrics": metrics}
    (cell / "results.json").write_text(json.dumps(record))


def _config(method: str, seed: int, method_seed: int | None = None) -> dict:
    return {"seed": seed, "ratio": 0.25, "method": {"name": method, "seed": seed if method_seed is None
                                                    else method_seed}, "calib": {"seed": seed}}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    ppl = {("elder", 0): 864.0, ("elder", 1): 671.0, ("elder", 2): 2430.0,
           ("shortgpt", 0): 97.0, ("shortgpt", 1): 99.0, ("shortgpt", 2): 101.0}
    for (method, seed), value in ppl.items():
        _cell(tmp_path, [f"method={method}", "ratio=0.25", f"seed={seed}"], _config(method, seed),
              {"ppl/wikitext2": value, "zs/mean": 0.4 + seed / 100})
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "results.json").write_text(json.dumps({"status": "running"}))
    return tmp_path


def test_groups_differ_only_in_seed_and_carry_their_spread(sweep: Path) -> None:
    groups = seeds.group_by_setting(seeds.load_records(sweep))
    assert sorted(groups) == ["method=elder", "method=shortgpt"]  # ratio=0.25 is shared: not in the label
    rows = {r["setting"]: r for r in seeds.summarize(groups, ["ppl/wikitext2", "zs/mean", "time/prune_s"])}
    elder = rows["method=elder"]
    assert elder["seeds"] == [0, 1, 2] and "time/prune_s" not in elder
    ppl = elder["ppl/wikitext2"]
    assert ppl["n"] == 3 and ppl["mean"] == pytest.approx((864 + 671 + 2430) / 3)
    assert ppl["sd"] == pytest.approx(math.sqrt(((864 - 1321.6667) ** 2 + (671 - 1321.6667) ** 2
                                                 + (2430 - 1321.6667) ** 2) / 2), rel=1e-6)
    assert (ppl["median"], ppl["min"], ppl["max"]) == (864.0, 671.0, 2430.0)
    assert seeds.metrics_to_show(groups, None) == ["ppl/wikitext2", "zs/mean"]  # the defaults the cells have
    assert rows["method=shortgpt"]["ppl/wikitext2"]["sd"] == pytest.approx(2.0)
    assert rows["method=shortgpt"]["zs/mean"]["mean"] == pytest.approx(0.41)


def test_method_seed_alone_is_a_seed(tmp_path: Path) -> None:
    for s in (0, 1):
        _cell(tmp_path, ["method=elder", f"method.seed={s}"], _config("elder", 0, method_seed=s),
              {"ppl/wikitext2": 10.0 + s})
    groups = seeds.group_by_setting(seeds.load_records(tmp_path))
    assert list(groups) == ["all"]
    (row,) = seeds.summarize(groups, ["ppl/wikitext2"])
    assert row["seeds"] == [0, 1] and row["ppl/wikitext2"]["mean"] == pytest.approx(10.5)
    assert math.isnan(seeds.spread([3.0])["sd"])


def test_labels_from_the_config_where_hydra_left_no_record(tmp_path: Path) -> None:
    for i, (stage2, seed) in enumerate([(True, 0), (True, 1), (False, 0)]):
        (tmp_path / str(i)).mkdir()
        config = _config("elder", seed) | {"method": {"name": "elder", "seed": seed, "stage2": stage2}}
        (tmp_path / str(i) / "results.json").write_text(json.dumps(
            {"status": "complete", "config": config, "metrics": {"ppl/wikitext2": 5.0 + i}}))
    rows = seeds.summarize(seeds.group_by_setting(seeds.load_records(tmp_path)), ["ppl/wikitext2"])
    assert [(r["setting"], r["seeds"], r["ppl/wikitext2"]["n"]) for r in rows] == [
        ("method.stage2=True", [0, 1], 2), ("method.stage2=False", [0], 1)]
    assert "| method.stage2=False | 0 | 7 ± - [7, 7] |" in seeds.markdown(rows, ["ppl/wikitext2"])


def test_cli_prints_a_table_writes_csv_and_fails_cleanly(sweep: Path, tmp_path: Path) -> None:
    csv = tmp_path / "out.csv"
    out = subprocess.run([sys.executable, "-m", "prune.seeds", str(sweep), "--metrics", "ppl/wikitext2",
                          "--csv", str(csv)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "| method=elder | 0, 1, 2 | 1322 ± 964.7 [671, 2430] |" in out.stdout
    table = pd.read_csv(csv)
    assert list(table["setting"]) == ["method=elder", "method=shortgpt"]
    assert table.loc[1, "ppl/wikitext2/mean"] == pytest.approx(99.0)
    empty = subprocess.run([sys.executable, "-m", "prune.seeds", str(tmp_path / "nothing")],
                           capture_output=True, text=True, cwd=REPO)
    assert empty.returncode == 2 and empty.stderr.startswith("error: no finished results.json")
    typo = subprocess.run([sys.executable, "-m", "prune.seeds", str(sweep), "--metrics", "ppl/wikitxt2"],
                          capture_output=True, text=True, cwd=REPO)
    assert typo.returncode == 2 and typo.stderr == (
        "error: no cell has the metric(s) ['ppl/wikitxt2']; choose among: ppl/wikitext2, zs/mean\n")


def test_real_sweep_over_seeds(tmp_path: Path) -> None:
    """random_layers draws its layers from the seed: two seeds, two settings, real results.json files."""
    out = run_cli("-m", "debug=tiny", "method=random_layers,shortgpt", "ratio=0.5", "seed=0,1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["setting"]: r for r in seeds.summarize(
        seeds.group_by_setting(seeds.load_records(tmp_path / "outputs" / "adhoc")), ["ppl/wikitext2"])}
    assert sorted(rows) == ["method=random_layers", "method=shortgpt"]
    assert all(r["seeds"] == [0, 1] and r["ppl/wikitext2"]["n"] == 2 for r in rows.values())
