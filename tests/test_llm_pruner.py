"""LLM-Pruner on tiny models of every family: ratio 0 is the dense model, the physical model equals the gated
(masked) one, reload and KV-cache generation, the official rounding and layer range, the Taylor scores against
a direct computation, the all-parameter ratio conversion, and bad options."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prune.data.calibration import CalibrationSet
from prune.data.tokens import tensor_hash
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods.llm_pruner import (
    LLMPruner,
    calibration_pieces,
    official_layer_range,
    removed_count,
)
from prune.models import surgery, width
from prune.models.adapter import adapter_for
from prune.models.load import load_model_and_tokenizer
from tests.conftest import assert_reloads_identically, compose_config, random_ids
from tests.test_blockpruner import _dense
from tests.test_run_smoke import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(vocab: int, n: int = 4, length: int = 64, seed: int = 3) -> CalibrationSet:
    ids = random_ids(vocab, batch=n, length=length, seed=seed)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return CalibrationSet(ids, mask, {"tokens_hash": tensor_hash(ids)})


def _method(**options) -> LLMPruner:
    return LLMPruner(**({"num_examples": 4, "ratio_of": "layer"} | options))


def _plan(family: str, ratio: float = 0.5, **options):
    model = _dense(family)
    return _method(**options).prune(adapter_for(model), _calib(model.config.vocab_size), ratio)


def _pruned(family: str, plan):
    model = copy.deepcopy(_dense(family))
    surgery.apply(adapter_for(model), plan)
    return model


@functools.cache
def _small_vocab():
    """tiny_llama (GQA, 4 layers) with a 512-token vocabulary, so that the layers hold most parameters."""
    cfg = compose_config("model=tiny_llama", "model.random_config.vocab_size=512")
    return load_model_and_tokenizer(cfg.model).model


def test_ratio_zero_is_the_dense_model(family) -> None:
    plan = _plan(family, 0.0)
    assert plan.keep_dims == {} and plan.info["achieved"]["params_removed"] == 0
    dense, pruned = _dense(family), _pruned(family, plan)
    ids = random_ids(dense.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(pruned(ids).logits, dense(ids).logits)


def test_physically_pruned_equals_masked_and_reloads(family, tmp_path) -> None:
    plan = _plan(family, 0.5)
    dense = _dense(family)
    adapter = adapter_for(dense)
    cost = width.WidthCost.of(adapter)
    # the official rounding on the tiny configs: 2 KV groups (GQA) or 4 heads (MHA), 128 channels, r = 0.5
    groups = cost.heads[0]
    assert plan.info["removed_per_layer"] == {"heads_kv_groups": groups // 2, "mlp_channels": 64}
    assert sorted(plan.keep_dims) == ["0", "1", "2", "3"]  # official_layer_range(4) = (0, 4)
    masks = {}
    for key, sites in plan.keep_dims.items():
        i = int(key)
        assert len(sites[width.HEAD_SITE]) == groups - groups // 2 and len(sites["mlp_mid"]) == 64
        masks[i] = {width.HEAD_SITE: torch.zeros(groups), "mlp_mid": torch.zeros(128)}
        for site, kept in sites.items():
            masks[i][site][kept] = 1.0
    ids = random_ids(dense.config.vocab_size)
    pruned = _pruned(family, plan)
    with torch.inference_mode():
        with width.gated(adapter, masks):
            masked = dense(ids).logits
        torch.testing.assert_close(pruned(ids).logits, masked, atol=1e-5, rtol=0)
    removed = count_params(adapter)["params/total"] - count_params(adapter_for(pruned))["params/total"]
    assert removed == plan.info["achieved"]["params_removed"] > 0
    assert_reloads_identically(pruned, tmp_path)


def test_generate_with_cache_matches_no_cache(family) -> None:
    pruned = _pruned(family, _plan(family, 0.5)).eval()
    ids = random_ids(pruned.config.vocab_size, batch=1, length=6)
    runs = [pruned.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=cache,
                            return_dict_in_generate=True, output_logits=True, pad_token_id=0)
            for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for with_cache, without in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(with_cache, without, atol=1e-5, rtol=0)


def test_official_rounding_and_layer_range() -> None:
    # LLaMA-7B at --pruning_ratio 0.25: 4096 q channels -> 1024 removed = 8 of 32 heads; 11008 -> 2752
    assert removed_count(4096, 0.25) == 1024 and removed_count(4096, 0.25) // 128 == 8
    assert removed_count(11008, 0.25) == 11008 - int(11008 * 0.75) == 2752
    # Llama-3-8B (llama3.py roots at k_proj: 8 KV heads x 128): 0.25 -> 2 KV groups (8 query heads)
    assert removed_count(1024, 0.25) // 128 == 2
    # SmolLM2-135M: 3 KV groups of 64; 0.25 removes none, 0.5 one, 0.8 two
    assert [removed_count(192, r) // 64 for r in (0.25, 0.5, 0.8)] == [0, 1, 2]
    assert official_layer_range(32) == (4, 30) and official_layer_range(30) == (4, 28)
    assert official_layer_range(4) == (0, 4)


def test_param_first_scores_are_the_summed_taylor_salience() -> None:
    """With sum grouping, a KV group's score is Σ|w·∂L/∂w| over its q/k/v rows and o columns, and an MLP
    channel's over its gate/up rows and down column: computed here with a plain backward pass."""
    model = copy.deepcopy(_small_vocab())
    adapter = adapter_for(model)
    calib = _calib(512)
    ids, mask = calibration_pieces(calib, 4, 64)
    heads, channels = _method().scores(adapter, [1, 2], ids, mask)
    for p in model.parameters():
        p.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    geometry = width.HeadGeometry.of(adapter, 2)
    q, k, v = ((m.weight * m.weight.grad).abs() for m in adapter.attn_in(2))
    o = (adapter.attn_out(2).weight * adapter.attn_out(2).weight.grad).abs()
    for g in range(geometry.groups):
        kv = geometry.rows(torch.tensor([g]))
        qo = geometry.rows(geometry.query_heads(torch.tensor([g])))
        direct = q[qo].sum() + k[kv].sum() + v[kv].sum() + o[:, qo].sum()
        torch.testing.assert_close(heads[2][g], direct, rtol=1e-5, atol=0)
    gate, up = ((m.weight * m.weight.grad).abs() for m in adapter.mlp_in(2))
    down = (adapter.mlp_out(2).weight * adapter.mlp_out(2).weight.grad).abs()
    torch.testing.assert_close(channels[2], gate.sum(1) + up.sum(1) + down.sum(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("taylor", ["vectorize", "param_second", "param_mix"])
def test_other_saliences_run_and_differ(taylor) -> None:
    adapter = adapter_for(copy.deepcopy(_small_vocab()))
    ids, mask = calibration_pieces(_calib(512), 4, 64)
    first = _method().scores(adapter, [1], ids, mask)[1][1]
    other = _method(taylor=taylor).scores(adapter, [1], ids, mask)[1][1]
    assert other.shape == first.shape and not torch.allclose(other, first)


def test_ratio_of_all_reaches_the_nearest_parameter_fraction() -> None:
    model = _small_vocab()
    adapter = adapter_for(model)
    plan = _method(ratio_of="all").prune(adapter, _calib(512), 0.2)
    achieved = plan.info["achieved"]
    assert plan.ratio_unit == "params" and achieved["group_ratio"] < 0.5  # no KV group removed yet
    # the nearest rounding step: one MLP channel per layer more or less is farther from the target
    step = 4 * 3 * 64 / count_params(adapter)["params/total"]  # 4 layers x (gate, up, down) x hidden 64
    assert abs(achieved["all"] - 0.2) <= step / 2 + 1e-9
    # 0.3 lies inside the jump of the first KV group (0.212 -> 0.334, r = 15/32): the nearer side is taken
    jump = _method(ratio_of="all").prune(adapter, _calib(512), 0.3).info
    assert jump["removed_per_layer"]["heads_kv_groups"] == 1 and 0.33 < jump["achieved"]["all"] < 0.335
    pruned = copy.deepcopy(model)
    surgery.apply(adapter_for(pruned), plan)
    dense_n, pruned_n = (count_params(adapter_for(m))["params/total"] for m in (model, pruned))
    assert 1 - pruned_n / dense_n == pytest.approx(achieved["all"], abs=1e-12)
    layer = _method(ratio_of="layer").prune(adapter, _calib(512), achieved["group_ratio"])
    assert layer.keep_dims == plan.keep_dims and layer.ratio_unit == "groups_per_layer"


def test_calibration_pieces_round_robin_over_windows() -> None:
    calib = _calib(512, n=2, length=128)
    ids, mask = calibration_pieces(calib, 4, 64)
    assert torch.equal(ids[0], calib.input_ids[0, :64]) and torch.equal(ids[1], calib.input_ids[1, :64])
    assert torch.equal(ids[2], calib.input_ids[0, 64:]) and torch.equal(ids[3], calib.input_ids[1, 64:])
    assert not mask[0, 0] and mask[2, 0]  # a piece cut from mid-window keeps its first target
    with pytest.raises(PruneError, match="needs 5 calibration pieces"):
        calibration_pieces(calib, 5, 64)


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(PruneError, match="method.taylor"):
        LLMPruner(taylor="second")
    with pytest.raises(PruneError, match="method.layer_end=2 must be > method.layer_start=3"):
        LLMPruner(layer_start=3, layer_end=2)
    adapter = adapter_for(_small_vocab())
    with pytest.raises(PruneError, match="prunes layers \\[2, 9\\); the model has 4"):
        _method(layer_start=2, layer_end=9).prune(adapter, _calib(512), 0.2)
    with pytest.raises(PruneError, match="out of reach"):
        _method(ratio_of="all").prune(adapter, _calib(512), 0.9)
    with pytest.raises(PruneError, match="removes every head or every MLP channel"):
        _method().prune(adapter, _calib(512), 0.99)


def test_cli_bad_option_exits_2(tmp_path) -> None:
    proc = run_cli("debug=tiny", "model=tiny_llama", "method=llm_pruner", "method.grouping=median",
                   "ratio=0.2", "logger=none", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "method.grouping" in errors[0]


def test_cli_end_to_end_saves_a_reloadable_model(tmp_path) -> None:
    cell = tmp_path / "cell"
    out = run_cli("debug=tiny", "model=tiny_qwen2", "method=llm_pruner", "ratio=0.5", "method.ratio_of=layer",
                  "save=true", f"hydra.run.dir={cell}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((cell / "results.json").read_text())
    plan = record["plan"]
    assert plan["method"] == "llm_pruner" and plan["ratio_unit"] == "groups_per_layer"
    assert record["metrics"]["params/removed_frac"] == pytest.approx(plan["info"]["achieved"]["all"])
    reloaded = AutoModelForCausalLM.from_pretrained(cell / "model")
    assert type(reloaded).__name__ == "Qwen2DispForCausalLM"
    heads = [len(layer.self_attn.k_proj.weight) // 16 for layer in reloaded.model.layers]
    assert heads == [1, 1, 1, 1]  # 2 KV groups per layer, half removed


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_gqa_fold_llama3_differs_only_under_gqa(fam) -> None:
    """gqa_fold=llama3 (the official llama3.py's stride fold) scores other query heads than a KV group
    removes; under MHA (OPT) both folds are the official hf_prune computation."""
    model = _dense(fam)
    adapter = adapter_for(model)
    ids, mask = calibration_pieces(_calib(model.config.vocab_size), 4, 64)
    grouped = _method().scores(adapter, [1], ids, mask)[0][1]
    llama3 = _method(gqa_fold="llama3").scores(adapter, [1], ids, mask)[0][1]
    assert torch.equal(grouped, llama3) == (fam == "opt")
    assert float(grouped.sum()) == pytest.approx(float(llama3.sum()), rel=1e-5)  # the same values, regrouped
