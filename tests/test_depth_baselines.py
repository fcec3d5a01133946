"""Shortened LLaMA (PPL, Taylor+) and LaCo on tiny models of every family, plus LaCo's merge arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch

from prune.data.calibration import build_calibration
from prune.methods.laco import LaCo, rdsc_merge
from prune.methods.shortened_llama import ShortenedLlama, _calibration_ppl
from prune.models import surgery
from prune.models.adapter import adapter_for
from tests.conftest import assert_reloads_identically, make_identity


def _calib(tokenizer, n: int = 2):
    return build_calibration(tokenizer, dataset="wikitext2", split="train", nsamples=n, seqlen=64,
                             source="bundled")


def _assert_pruned_model_reloads(model, adapter, plan, folder) -> None:
    """Apply the plan; the saved model reloads as a stock HF model with the same logits."""
    surgery.apply(adapter, plan)
    assert_reloads_identically(model, folder)


def test_rdsc_merge_by_hand() -> None:
    base, a, b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([5.0])}
    assert rdsc_merge(base, [a, b], "paper")["w"].item() == 1 + (3 - 1) + (5 - 1)  # 7
    assert rdsc_merge(base, [a, b], "released")["w"].item() == 5  # collapses to the last layer: a plain drop
    assert base["w"].item() == 1  # inputs untouched


@pytest.mark.parametrize("criterion", ["ppl", "taylor"])
def test_shortened_llama_matrix(tiny, criterion: str, tmp_path) -> None:
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    method = ShortenedLlama(criterion=criterion, plus_heuristic=False)
    plan = method.prune(adapter, _calib(tiny.tokenizer), 0.25)
    assert len(plan.drop_layers) == 1 and len(plan.scores[criterion]) == 4
    assert all(p.grad is None for p in model.parameters())  # Taylor leaves no gradients behind
    _assert_pruned_model_reloads(model, adapter, plan, tmp_path)


def test_shortened_llama_ppl_picks_identity_layer(tiny) -> None:
    model = copy.deepcopy(tiny.model)
    make_identity(model, 1)
    calib = _calib(tiny.tokenizer)
    plan = ShortenedLlama(criterion="ppl").prune(adapter_for(model), calib, 0.25)
    with torch.inference_mode():
        dense_ppl = _calibration_ppl(adapter_for(model), calib, 1)
    # removing an identity layer changes nothing: its score is the dense PPL (on a random model, removing
    # another layer may even lower it, so the identity layer need not be the minimum)
    assert plan.scores["ppl"][1] == pytest.approx(dense_ppl, rel=1e-5)


def test_taylor_plus_protects_first_and_last_blocks(tiny) -> None:
    adapter = adapter_for(tiny.model)
    method = ShortenedLlama(criterion="taylor", keep_first=1, keep_last=1)
    plan = method.prune(adapter, _calib(tiny.tokenizer), 0.5)
    assert plan.info["plus_heuristic"] and set(plan.drop_layers) == {1, 2}


def test_laco_matrix_and_reload(tiny, tmp_path) -> None:
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    before = {n: p.clone() for n, p in adapter.layer(2).named_parameters()}
    plan = LaCo(merge_layers=2, n_sentences=2, sentence_tokens=16, search_steps=6).prune(
        adapter, _calib(tiny.tokenizer), 0.25)
    assert len(plan.drop_layers) == 1
    merge = plan.info["merges"][0]
    assert merge["collapsed"] == plan.drop_layers and merge["base"] == merge["collapsed"][0] - 1
    if merge["base"] == 2:  # the merged base layer really carries θ_2 + (θ_3 − θ_2) = θ_3
        for n, p in adapter.layer(2).named_parameters():
            torch.testing.assert_close(p, dict(adapter.layer(3).named_parameters())[n])
    _assert_pruned_model_reloads(model, adapter, plan, tmp_path)
    assert before  # the scan restored then re-applied merges; nothing else asserted here


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_laco_merge_rules_on_the_model(tiny, rule: str) -> None:
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    dense = [{n: p.clone() for n, p in adapter.layer(i).named_parameters()} for i in range(3)]
    plan = LaCo(merge_layers=3, threshold=-1.0, merge_rule=rule, n_sentences=1, sentence_tokens=8).prune(
        adapter, _calib(tiny.tokenizer, 1), 0.5)
    assert plan.info["merges"][0]["base"] == 0 and plan.drop_layers == [1, 2]
    for n, p in adapter.layer(0).named_parameters():
        # paper: θ0 + (θ1 − θ0) + (θ2 − θ0); released: θ2 (the merge degenerates into dropping layers 0 and 1)
        expected = dense[1][n] + dense[2][n] - dense[0][n] if rule == "paper" else dense[2][n]
        torch.testing.assert_close(p, expected)
