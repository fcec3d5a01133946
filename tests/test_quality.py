"""Quality flags (prune/quality.py): a method that did not do its job says so in its plan, results.json, the
run's summary and the tables built from it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from prune import quality, tables
from prune.data.calibration import CalibrationSet
from prune.methods.elder import Elder, unsettled_rounds
from prune.methods.greedy import MIN_SEARCH_TOKENS, few_tokens_flags
from prune.models.adapter import adapter_for
from prune.results import summary_lines
from tests.test_elder import FAST, _greedy_calibration
from tests.test_run_smoke import run_cli


def test_an_under_budget_disp_run_is_flagged_warned_and_marked_in_its_table(tmp_path: Path) -> None:
    """5 hypernetwork steps cannot train the gates to the ratio: results.json carries ``untrained`` with
    its fix, the summary prints one warning line naming it, and the table marks the row with a footnote."""
    cell = tmp_path / "outputs" / "table2" / "smoke" / "method=disp,ratio=0.2"
    out = run_cli("debug=tiny", "method=disp", "ratio=0.2", "method.ratio_params=linear", "method.steps=5",
                  "method.seqlen=32", "method.checkpoint=false", f"hydra.run.dir='{cell}'", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((cell / "results.json").read_text())
    assert record["plan"]["info"]["reached_target"] is False
    assert [f["flag"] for f in record["quality_flags"]] == ["untrained"]
    assert record["quality_flags"][0]["fix"].startswith("method.steps=1000 (starts over: about ")
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning: not a converged")]
    assert len(warnings) == 1 and "untrained" in warnings[0] and "method.steps=1000" in warnings[0]

    meta = tables.aggregate("table2", ["scale=smoke", f"paths.outputs_root={tmp_path}/outputs"],
                            results_dir=tmp_path / "table", log=False)
    assert meta["cells_done"] == 1
    text = (tmp_path / "table" / "table.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| disp "))
    assert "ours †untrained" in row
    assert "`†untrained`: the hypernetwork's sampled masks ended away from the target ratio" in text


def test_a_trained_run_carries_no_flag_and_no_warning() -> None:
    record = {"config": {"model": {"name": "m"}, "ratio": 0.2},
              "plan": {"method": "shortgpt", "ratio_unit": "layers", "drop_layers": [1]},
              "metrics": {"params/total": 1e6, "params/removed_frac": 0.1,
                          "params/removed_frac_non_embedding": 0.2, "time/prune_s": 1.0,
                          "mem/prune_peak_gb": 0.1},
              "quality_flags": []}
    assert not any(line.startswith("warning") for line in summary_lines(record))
    assert quality.mark(record) == "" and quality.footnote([record, {}]) is None
    flagged = record | {"quality_flags": [quality.raised(quality.UNSETTLED, "moved", "method.x=1 (1 min)")]}
    assert summary_lines(flagged)[-1] == ("warning: not a converged result (unsettled: moved); fix: "
                                          "method.x=1 (1 min)")
    assert quality.mark(flagged) == "†unsettled"


def _curves(rounds: list[list[list[float]]]) -> dict[str, list]:
    """Stage-1 curves of per-step scale snapshots, one list of snapshots per round."""
    return {"scales": [s for snaps in rounds for s in snaps],
            "round": [r for r, snaps in enumerate(rounds) for _ in snaps]}


def test_elder_ranking_settles_only_when_the_pick_holds_over_the_rounds_second_half() -> None:
    candidates = [0, 1, 2, 3]
    # round 1 picks layer 2 (smallest from the second step on); round 2 picks 1, which only became the
    # smallest at the last step
    steady = [[1.0, 0.9, 0.95, 1.0], [1.0, 0.9, 0.5, 1.0], [1.0, 0.9, 0.4, 1.0], [1.0, 0.9, 0.3, 1.0]]
    late = [[1.0, 0.9, 0.0, 0.8], [1.0, 0.9, 0.0, 0.7], [1.0, 0.8, 0.0, 0.75], [1.0, 0.6, 0.0, 0.7]]
    rounds = [{"selected": [2]}, {"selected": [1]}]
    assert unsettled_rounds(rounds, _curves([steady, late]), candidates) == [1]
    assert unsettled_rounds(rounds[:1], _curves([steady]), candidates) == []
    # the same pick throughout, but by a margin (0.05) smaller than the scales still move (0.1 per half)
    drifting = [[1.0, 0.95, 0.9, 1.0], [1.0, 0.9, 0.85, 1.0], [1.0, 0.85, 0.8, 1.0], [1.0, 0.8, 0.75, 1.0]]
    assert unsettled_rounds(rounds[:1], _curves([drifting]), candidates) == [0]
    # one step per round has no second half to compare: unsettled
    assert unsettled_rounds(rounds[:1], _curves([steady[-1:]]), candidates) == [0]


def test_an_under_budget_elder_run_is_flagged_with_its_fix() -> None:
    from tests.conftest import load_tiny

    tiny = load_tiny("llama")
    calib = _greedy_calibration(tiny.model, n=2, length=16)
    plan = Elder(stage1_steps_per_round=1, stage2=False, **FAST).prune(
        adapter_for(copy.deepcopy(tiny.model)), calib, 0.25)
    flags = plan.info["quality_flags"]
    assert [f["flag"] for f in flags] == ["unsettled"]
    assert flags[0]["fix"].startswith("method.stage1_steps_per_round=4 ")
    fixed = Elder(layers=[1], stage2=False, **FAST).prune(adapter_for(copy.deepcopy(tiny.model)), calib, 0.25)
    assert "quality_flags" not in fixed.info  # no stage 1, nothing to settle


def test_a_search_on_fewer_tokens_than_the_minimum_is_flagged() -> None:
    def calib(sequences: int, seqlen: int) -> CalibrationSet:
        ids = torch.zeros(sequences, seqlen, dtype=torch.long)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False  # position 0 is never a target
        return CalibrationSet(ids, mask, {})

    starved = few_tokens_flags(calib(4, 128))  # the CPU preset's search set
    assert [f["flag"] for f in starved] == ["few_tokens"]
    assert f"searched on 508 scored tokens (4 sequences), minimum {MIN_SEARCH_TOKENS}" == starved[0]["detail"]
    assert "method.max_sequences=null" in starved[0]["fix"] and "calib.nsamples=14 " in starved[0]["fix"]
    rows = few_tokens_flags(_with_style(calib(2, 128), "row_chunks"))
    assert "calib.nsamples=256 calib.pool=all" in rows[0]["fix"]  # Alpaca: nsamples counts rows
    assert few_tokens_flags(calib(14, 2048)) == []  # BlockPruner's paper calibration


def test_figures_draw_flagged_cells_as_their_own_marked_series() -> None:
    from prune.plots.points import from_cells

    def cell(flags: list) -> dict:
        return {"plan": {"method": "disp"}, "metrics": {"params/removed_frac": 0.2, "ppl/wikitext2": 50.0},
                "quality_flags": flags}

    flagged = [quality.raised(quality.UNTRAINED, "d", "f")]
    assert set(from_cells([cell([]), cell(flagged)])["method"]) == {"disp", "disp †untrained"}


@pytest.mark.parametrize("flag", sorted(quality.FLAGS))
def test_every_flag_has_a_mark_and_a_footnote(flag: str) -> None:
    record = {"quality_flags": [quality.raised(quality.FLAGS[flag], "d", "f")]}
    assert quality.mark(record) == f"†{flag}"
    assert f"`†{flag}`: {quality.FLAGS[flag].meaning}" in quality.footnote([record])


def _with_style(calib: CalibrationSet, style: str) -> CalibrationSet:
    return CalibrationSet(calib.input_ids, calib.target_mask, {"style": style})
