"""FLAP and Wanda-sp (prune/methods/flap.py) on the tiny model of every family: the physically pruned model
equals the masked one (removed heads / channels zeroed, bias compensation added), reloads with identical
logits and generates the same with and without the KV cache; ratio 0 is the dense model; the four structures
remove what the code's rounding says; the statistics, scores and bias follow their formulas; bad options are
one error line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from prune.data.calibration import build_calibration
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods.flap import (
    InputStats,
    Passes,
    channel_scores,
    compensation,
    drop_global,
    drop_lowest,
    global_budget,
    layer_units,
    masked,
    recording,
)
from prune.models import surgery
from prune.models.adapter import adapter_for
from tests.conftest import assert_reloads_identically, compose_config, load_tiny, random_ids
from tests.test_bad_inputs import assert_one_error_line, run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

# (method, overrides): FLAP as released, and Wanda-sp (sequential) with compensation switched on so that both
# bias paths are exercised; the structures with heads set by hand.
CASES = {
    "flap": ("flap", []),
    "wanda_sp": ("wanda_sp", ["method.compensate=true"]),
    "ul_mm": ("flap", ["method.structure=UL-MM", "method.remove_heads=4"]),
    "al_mm": ("flap", ["method.structure=AL-MM", "method.remove_heads=3"]),
}


def _calib(tokenizer, n: int = 4):
    return build_calibration(tokenizer, dataset="wikitext2", split="train", nsamples=n, seqlen=64,
                             source="bundled")


def _method(name: str = "flap", *overrides: str):
    # the tiny models are mostly embedding: count the ratio over what heads and channels hold
    return instantiate(compose_config(f"method={name}", "method.ratio_params=linear", *overrides).method)


def _removed_params(adapter, plan) -> int:
    """Parameters the plan's units hold, less the bias entries it creates."""
    removed = 0
    for key, sites in plan.keep_dims.items():
        u = layer_units(adapter, int(key))
        removed += (u.groups - len(sites.get("attn_heads", range(u.groups)))) * u.group_params
        removed += (u.channels - len(sites.get("mlp_mid", range(u.channels)))) * u.channel_params
    created = sum(t.numel() for name, t in plan.tensors_of("added_biases").items()
                  if adapter.model.get_submodule(name).bias is None)
    return removed - created


@pytest.mark.parametrize("case", sorted(CASES))
def test_physical_equals_masked_and_reloads(tiny, case: str, tmp_path: Path) -> None:
    name, overrides = CASES[case]
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    plan = _method(name, *overrides).prune(adapter, _calib(tiny.tokenizer), 0.4)
    assert plan.method == name and plan.keep_dims
    assert plan.tensors_of("added_biases"), "compensation was asked for"
    expected_removed = _removed_params(adapter, plan)
    ids = random_ids(100)
    with torch.no_grad():
        dense = model(ids).logits
        with masked(adapter, plan):
            reference = model(ids).logits
    before = count_params(adapter)["params/total"]
    surgery.apply(adapter, plan)
    with torch.no_grad():
        pruned = model(ids).logits
    assert before - count_params(adapter)["params/total"] == expected_removed > 0
    assert not torch.allclose(dense, reference, atol=1e-3)  # the plan does change the model
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)
    assert_reloads_identically(model, tmp_path)


def test_generation_with_kv_cache_equals_without(tiny) -> None:
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    plan = _method("flap", "method.structure=UL-UM").prune(adapter, _calib(tiny.tokenizer), 0.5)
    assert all("attn_heads" in sites for sites in plan.keep_dims.values())  # every layer lost a group
    surgery.apply(adapter, plan)
    prompt = random_ids(100, batch=1, length=6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("structure", ["AL-AM", "AL-MM", "UL-MM", "UL-UM"])
def test_ratio_zero_with_compensation_is_the_dense_model(tiny, structure: str) -> None:
    heads = ["method.remove_heads=0"] if structure.endswith("MM") else []
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    ids = random_ids(100)
    with torch.no_grad():
        dense = model(ids).logits
    plan = _method("flap", f"method.structure={structure}", "method.compensate=true", *heads).prune(
        adapter, _calib(tiny.tokenizer), 0.0)
    assert plan.is_empty() and plan.info["achieved_linear"] == 0.0
    surgery.apply(adapter, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=0)


def test_code_arithmetic_removes_one_unit_at_ratio_zero() -> None:
    """The code's AL-AM threshold is strict at the budget boundary: even ratio 0 removes the last unit."""
    tiny = load_tiny("llama")
    method = _method("flap", "method.arithmetic=code")
    plan = method.prune(adapter_for(tiny.model), _calib(tiny.tokenizer), 0.0)
    kept = sum(plan.info["kept_groups"]) + sum(plan.info["kept_channels"])
    assert kept == 4 * (2 + 128) - 1


def test_structures_remove_what_the_code_rounds_to() -> None:
    tiny = load_tiny("llama")  # 4 layers, 2 KV groups of 2 query heads (head_dim 16), 128 MLP channels
    adapter, calib = adapter_for(tiny.model), _calib(tiny.tokenizer)
    u = layer_units(adapter, 0)
    assert (u.groups, u.group_channels, u.channels) == (2, 32, 128)
    assert (u.group_params, u.channel_params) == (2 * 16 * 64 + 2 * 16 * 64 + 2 * 16 * 64, 3 * 64)
    ul_um = _method("flap", "method.structure=UL-UM").prune(adapter, calib, 0.5)
    assert ul_um.info["kept_groups"] == [1] * 4 and ul_um.info["kept_channels"] == [64] * 4
    ul_mm = _method("flap", "method.structure=UL-MM", "method.remove_heads=4").prune(adapter, calib, 0.5)
    channels = int((0.5 * u.params - u.group_params) / u.channel_params)  # cal_remove_neuron
    assert ul_mm.info["kept_groups"] == [1] * 4 and ul_mm.info["kept_channels"] == [128 - channels] * 4
    al_mm = _method("flap", "method.structure=AL-MM", "method.remove_heads=3").prune(adapter, calib, 0.5)
    channels = int((0.5 * 4 * u.params - 3 * u.group_params) / u.channel_params)
    assert sum(al_mm.info["kept_groups"]) == 8 - 3 and sum(al_mm.info["kept_channels"]) == 4 * 128 - channels
    al_am = _method("flap").prune(adapter, calib, 0.5)
    assert abs(al_am.info["achieved_linear"] - 0.5) <= u.group_params / (4 * u.params)
    seq_mm = _method("wanda_sp", "method.structure=UL-MM", "method.remove_heads=4").prune(adapter, calib, 0.5)
    assert seq_mm.info["sequential"] and seq_mm.info["kept_groups"] == [1] * 4  # 4 // 4 layers per layer
    wanda = _method("wanda_sp").prune(adapter, calib, 0.5)
    assert wanda.info["sequential"] and not wanda.tensors and wanda.info["structure"] == "UL-UM"
    assert wanda.info["kept_channels"] == [64] * 4


def test_gqa_mistral_scores_kv_groups() -> None:
    tiny = load_tiny("mistral")  # 4 query heads over 2 KV heads
    adapter = adapter_for(copy.deepcopy(tiny.model))
    plan = _method("flap", "method.structure=UL-UM").prune(adapter, _calib(tiny.tokenizer), 0.5)
    surgery.apply(adapter, plan)
    q, k, v = adapter.attn_in(0)
    widths = (q.out_features, k.out_features, v.out_features, adapter.attn_out(0).in_features)
    assert widths == (32, 16, 16, 32)  # one group (2 query heads, 1 KV head, head_dim 16) of two left


def test_selection_rules() -> None:
    s = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert drop_lowest(s, 2).tolist() == [True, False, False, True]
    assert drop_lowest(s, 9).tolist() == [False, False, False, True]  # k capped: one unit stays
    assert drop_lowest(s, 0).all()
    two = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    assert drop_global(two, 2).tolist() == [[True, False], [False, True]]
    assert drop_global(two, 0).all()
    attn, mlp = torch.tensor([[0.5]]), torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # weights: a group = 2, a channel = 1 (total 6); keep 2/3 -> cumulative 1, 2, 3, 5(group), 6: 4 is nearest
    # to 3 and 5 alike; argmin takes the first (3: channels 3.0, 2.0, 1.0)
    keep_a, keep_m = global_budget(attn, mlp, (2.0, 1.0), 4 / 6, strict=False)
    assert keep_a.tolist() == [[False]] and keep_m.tolist() == [[True, True, True, False]]
    keep_a, keep_m = global_budget(attn, mlp, (2.0, 1.0), 4 / 6, strict=True)  # the code: that unit goes too
    assert keep_a.tolist() == [[False]] and keep_m.tolist() == [[True, True, False, False]]


def test_input_statistics_and_scores_follow_their_formulas() -> None:
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    stats = InputStats(4)
    stats.add(x[:2])
    stats.add(x[2:])
    flat = x.reshape(-1, 4).double()
    torch.testing.assert_close(stats.mean(code=False), flat.mean(0))
    torch.testing.assert_close(stats.variance(code=False), flat.var(0))
    torch.testing.assert_close(stats.mean(code=True), flat.mean(0), rtol=1e-6, atol=1e-6)
    # the code's running fluctuation: 0 after the first sequence, then f*(n-1)/n + Σ_t (x - mean_new)² / (n+1)
    f = torch.zeros(4, dtype=torch.float64)
    for n in (1, 2):
        new_mean = x[: n + 1].reshape(-1, 4).double().mean(0)
        f = f * (n - 1) / n + ((x[n].double() - new_mean) ** 2).sum(0) / (n + 1)
    torch.testing.assert_close(stats.variance(code=True), f, rtol=1e-5, atol=1e-6)
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    fluctuation = channel_scores("fluctuation", stats, w, code=False, attention=True)
    torch.testing.assert_close(fluctuation, flat.var(0) * (w.double() ** 2).sum(0))
    squared = channel_scores("fluctuation", stats, w, code=True, attention=True)
    torch.testing.assert_close(squared, (f * (w.double() ** 2).sum(0)) ** 2, rtol=1e-5, atol=1e-8)
    wanda = channel_scores("wanda_sp", stats, w, code=False, attention=True)
    torch.testing.assert_close(wanda, (w.double().abs() * ((flat ** 2).sum(0) / 3).sqrt()).mean(0))
    removed = torch.tensor([False, True, False, True])
    bias = compensation(w, flat.mean(0), removed)
    expected = w.double()[:, [1, 3]] @ flat.mean(0)[[1, 3]]
    torch.testing.assert_close(bias.double(), expected, rtol=1e-6, atol=1e-6)


def test_wanda_sp_scores_each_layer_on_its_pruned_predecessors() -> None:
    tiny = load_tiny("llama")
    calib = _calib(tiny.tokenizer)
    method = _method("wanda_sp")
    plan = method.prune(adapter_for(tiny.model), calib, 0.5)
    # layer 1's decision, recomputed on a model whose layer 0 alone is pruned as the plan says
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    first = copy.copy(plan)
    first.keep_dims = {"0": plan.keep_dims["0"]}
    surgery.apply(adapter, first)
    stats: dict = {}
    with torch.no_grad(), recording(adapter, [1], stats):
        Passes(adapter, calib.input_ids, 8).full()
    u = layer_units(adapter, 1)
    attn, mlp = method._layer_scores(adapter, 1, stats, u)
    keep_groups = drop_lowest(attn, int(0.5 * u.groups))
    keep_channels = drop_lowest(mlp, int(0.5 * u.channels))
    assert torch.nonzero(keep_channels).flatten().tolist() == plan.keep_dims["1"]["mlp_mid"]
    assert torch.nonzero(keep_groups).flatten().tolist() == plan.keep_dims["1"]["attn_heads"]


BAD = {
    "manual_heads_missing": (["method.structure=AL-MM"], "method.remove_heads=None must be set"),
    "heads_without_manual": (["method.remove_heads=3"], "method.remove_heads=3 is only read by structure"),
    "metric_unknown": (["method.metric=magnitude"], "method.metric='magnitude' is not one of"),
    "structure_unknown": (["method.structure=AL-UM"], "method.structure='AL-UM' is not one of"),
    "ratio_unreachable": (["ratio=0.5"], "of all parameters is"),
    "heads_over_budget": (["method.structure=UL-MM", "method.remove_heads=8", "method.ratio_params=linear",
                           "ratio=0.05"], "method.remove_heads=8 removes more parameters than the ratio"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_are_one_error_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture
                                               ) -> None:
    overrides, fragment = BAD[case]
    ratio = [] if any(o.startswith("ratio=") for o in overrides) else ["ratio=0.01"]
    code, _ = run_in_process(["method=flap", *ratio, *overrides], tmp_path / "out")
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


def test_wanda_sp_name_refuses_another_metric() -> None:
    from prune.methods.wanda_sp import WandaSp

    assert WandaSp(metric="wanda_sp").options.layout == "UL-UM"
    with pytest.raises(PruneError, match="is not wanda_sp"):
        WandaSp(metric="fluctuation")
