"""Attention-head pruning in the width surgery (`prune.models.width.HEAD_SITE`), tiny models of every family.

Zeroed o-projection columns == gated heads == physically removed heads (with ``mlp_mid``, as LLM-Pruner and
FLAP remove them, and with DISP's sites), the parameter count, save / reload, KV-cache generation, GQA groups.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prune.errors import PruneError
from prune.eval.params import count_params
from prune.models import surgery, width
from prune.models.adapter import adapter_for
from prune.types import PrunePlan
from tests.conftest import assert_reloads_identically, random_ids
from tests.test_blockpruner import _dense

pytestmark = pytest.mark.usefixtures("one_thread")

GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # their tiny configs: 4 query heads, 2 KV heads


def _random_keep(model, seed: int = 0, disp_sites: bool = False) -> dict[str, dict[str, list[int]]]:
    """Per layer: a random non-empty subset of KV groups (layer 0 keeps all, layer 1 a single group), a random
    half of the MLP channels, and with `disp_sites` a random half of every DISP site as well."""
    gen = torch.Generator().manual_seed(seed)
    cost = width.WidthCost.of(adapter_for(model))
    keep: dict[str, dict[str, list[int]]] = {}
    for i, (groups, widths) in enumerate(zip(cost.heads, cost.widths)):
        if i == 0:
            heads = list(range(groups))
        elif i == 1:
            heads = [int(torch.randint(groups, (1,), generator=gen))]
        else:
            heads = torch.randperm(groups, generator=gen)[: max(1, groups // 2)].sort().values.tolist()
        sites = {width.HEAD_SITE: heads}
        names = width.SITES if disp_sites else ("mlp_mid",)
        for site in names:
            w = widths[width.SITES.index(site)]
            sites[site] = torch.randperm(w, generator=gen)[: w // 2].sort().values.tolist()
        keep[str(i)] = sites
    return keep


def _masks(model, keep) -> dict[int, dict[str, torch.Tensor]]:
    cost = width.WidthCost.of(adapter_for(model))
    masks: dict[int, dict[str, torch.Tensor]] = {}
    for key, sites in keep.items():
        i = int(key)
        for site, kept in sites.items():
            w = cost.heads[i] if site == width.HEAD_SITE else cost.widths[i][width.SITES.index(site)]
            m = torch.zeros(w)
            m[kept] = 1.0
            masks.setdefault(i, {})[site] = m
    return masks


def _pruned(family: str, keep):
    model = copy.deepcopy(_dense(family))
    surgery.apply(adapter_for(model), PrunePlan("test", 0.5, "params", keep_dims=keep))
    return model


def _zeroed_o_columns(family: str, keep):
    """The dense model with the o projection's input columns of every removed head set to zero, and the MLP
    channels outside ``mlp_mid`` zeroed in down_proj: the reference the physical model must equal."""
    model = copy.deepcopy(_dense(family))
    adapter = adapter_for(model)
    with torch.no_grad():
        for key, sites in keep.items():
            i = int(key)
            geometry = width.HeadGeometry.of(adapter, i)
            dropped = sorted(set(range(geometry.groups)) - set(sites[width.HEAD_SITE]))
            cols = geometry.rows(geometry.query_heads(torch.tensor(dropped, dtype=torch.long)))
            adapter.attn_out(i).weight[:, cols] = 0.0
            down = adapter.mlp_out(i)
            gone = sorted(set(range(down.in_features)) - set(sites["mlp_mid"]))
            down.weight[:, gone] = 0.0
    return model


def test_zeroed_heads_equal_gated_equal_pruned(family) -> None:
    dense = _dense(family)
    keep = _random_keep(dense)
    ids = random_ids(dense.config.vocab_size)
    with torch.inference_mode():
        reference = _zeroed_o_columns(family, keep)(ids).logits
        with width.gated(adapter_for(dense), _masks(dense, keep)):
            gated = dense(ids).logits
        pruned = _pruned(family, keep)
        physical = pruned(ids).logits
    torch.testing.assert_close(gated, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(physical, reference, atol=1e-5, rtol=0)
    # the heads are gone for real: fewer q/k/v rows and o columns, the count the cost model predicts
    adapter, cost = adapter_for(pruned), width.WidthCost.of(adapter_for(dense))
    for i, sites in enumerate(keep.values()):
        geometry = width.HeadGeometry.of(adapter, i)
        assert geometry.groups == len(sites[width.HEAD_SITE])
        assert adapter.attn_out(i).in_features == geometry.groups * geometry.per_group * geometry.head_dim
    sizes = [[w if s != "mlp_mid" else len(keep[str(i)]["mlp_mid"]) for s, w in zip(width.SITES, ws)]
             for i, ws in enumerate(cost.widths)]
    heads = [len(keep[str(i)][width.HEAD_SITE]) for i in range(len(cost.heads))]
    n = count_params(adapter)["params/total"]
    assert n == cost.count(sizes, linear_only=False, heads=heads) < cost.total
    # DISP's count (no heads argument) is unchanged by the head site
    assert cost.count(cost.widths, linear_only=False) == cost.total
    assert cost.count(cost.widths, linear_only=False, heads=cost.heads) == cost.total


def test_heads_with_disp_sites_gated_equal_pruned(family) -> None:
    """The head site composes with DISP's five sites (it slices first; attn_in / attn_out wrap the result)."""
    dense = _dense(family)
    keep = _random_keep(dense, seed=1, disp_sites=True)
    masks = _masks(dense, keep)
    ids = random_ids(dense.config.vocab_size)
    with torch.inference_mode():
        with width.gated(adapter_for(dense), masks):
            reference = dense(ids).logits
        physical = _pruned(family, keep)(ids).logits
    torch.testing.assert_close(physical, reference, atol=1e-5, rtol=0)
    cost = width.WidthCost.of(adapter_for(dense))
    sizes = [[int(masks[i][s].sum()) for s in width.SITES] for i in masks]
    heads = [int(masks[i][width.HEAD_SITE].sum()) for i in masks]
    n = count_params(adapter_for(_pruned(family, keep)))["params/total"]
    assert n == cost.count(sizes, linear_only=False, heads=heads)


def test_save_reload_identical_logits(family, tmp_path) -> None:
    keep = _random_keep(_dense(family), seed=2)
    pruned = _pruned(family, keep)
    assert_reloads_identically(pruned, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"{family}_disp"
    recorded = {i: sites[width.HEAD_SITE] for i, sites in config["disp_keep_dims"].items()
                if width.HEAD_SITE in sites}
    assert recorded == {i: s[width.HEAD_SITE] for i, s in keep.items() if i != "0"}  # layer 0 keeps all
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    assert count_params(adapter_for(reloaded)) == count_params(adapter_for(pruned))


def test_generate_with_cache_matches_no_cache(family) -> None:
    pruned = _pruned(family, _random_keep(_dense(family), seed=3)).eval()
    ids = random_ids(pruned.config.vocab_size, batch=1, length=6)
    runs = [pruned.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=cache,
                            return_dict_in_generate=True, output_logits=True, pad_token_id=0)
            for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for with_cache, without in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(with_cache, without, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fam", GQA_FAMILIES)
def test_gqa_group_keeps_its_query_heads(fam) -> None:
    dense = _dense(fam)
    geometry = width.HeadGeometry.of(adapter_for(dense), 2)
    assert (geometry.groups, geometry.per_group) == (2, 2)  # the tiny configs really are GQA
    pruned = _pruned(fam, {"2": {width.HEAD_SITE: [1]}})
    d, p, hd = adapter_for(dense), adapter_for(pruned), geometry.head_dim
    q_rows = slice(2 * hd, 4 * hd)  # query heads 2 and 3 read KV head 1
    q, k, v = (m.weight for m in p.attn_in(2))
    dq, dk, dv = (m.weight for m in d.attn_in(2))
    assert torch.equal(q, dq[q_rows]) and torch.equal(k, dk[hd:2 * hd]) and torch.equal(v, dv[hd:2 * hd])
    assert torch.equal(p.attn_out(2).weight, d.attn_out(2).weight[:, q_rows])
    if fam == "qwen2":  # q/k/v biases follow their rows
        assert torch.equal(p.attn_in(2)[0].bias, d.attn_in(2)[0].bias[q_rows])
    if fam == "qwen3":  # q_norm / k_norm are one head_dim vector shared by every head: untouched
        assert p.attn(2).q_norm.weight.shape == (hd,)
    assert p.attn(2).num_key_value_groups == 2


def test_opt_head_count_follows_the_kept_heads() -> None:
    pruned = _pruned("opt", {"1": {width.HEAD_SITE: [0, 3]}})
    assert adapter_for(pruned).attn(1).num_heads == 2 and adapter_for(pruned).attn(0).num_heads == 4


def test_a_layer_without_heads_is_refused(family) -> None:
    with pytest.raises(PruneError, match="keeps no attention head"):
        _pruned(family, {"1": {width.HEAD_SITE: []}})
    with pytest.raises(PruneError, match="non-empty subset of range"):
        _pruned(family, {"1": {width.HEAD_SITE: [99]}})
    with pytest.raises(PruneError, match="known sites"):
        _pruned(family, {"1": {"heads": [0]}})
