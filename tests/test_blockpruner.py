"""BlockPruner: the fast search selects exactly what the plain (official) loop selects, sub-block surgery is
real and exact, pruned models generate with a KV cache and round-trip through save/load, and the removal-order
cache is reused, extended and resumed."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM

from prune.data.calibration import CalibrationSet
from prune.data.tokens import tensor_hash
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods.blockpruner import BlockPruner, candidate_blocks, plain_evaluations
from prune.models import blocks, surgery
from prune.models.adapter import adapter_for
from prune.types import PrunePlan
from tests.conftest import REPO, compose_config, load_tiny, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _dense(family: str):
    return load_tiny(family).model


def tiny_model(family: str):
    """A fresh copy of the family's tiny model (loaded once per session; tests may change the copy)."""
    return copy.deepcopy(_dense(family))


@pytest.fixture
def model(family: str):
    return tiny_model(family)


def _calib(n: int = 3, length: int = 12, seed: int = 1) -> CalibrationSet:
    ids = random_ids(100, batch=n, length=length, seed=seed)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return CalibrationSet(ids, mask, {"tokens_hash": tensor_hash(ids)})


def _skip_blocks_logits(model, attn: list[int], mlp: list[int], ids: torch.Tensor) -> torch.Tensor:
    """Dense logits with the given blocks' outputs zeroed by hooks (the reference for physical removal)."""
    adapter = adapter_for(model)
    zero_attn = lambda m, a, out: (torch.zeros_like(out[0]), *out[1:])  # noqa: E731
    zero_mlp = lambda m, a, out: torch.zeros_like(out)  # noqa: E731
    handles = [adapter.attn(i).register_forward_hook(zero_attn) for i in attn]
    handles += [adapter.mlp_out(i).register_forward_hook(zero_mlp) for i in mlp]
    try:
        return model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _prune(method: BlockPruner, model, calib: CalibrationSet, ratio: float = 0.0) -> PrunePlan:
    return method.prune(adapter_for(model), calib, ratio)


# --------------------------------------------------------------------------------------------- search


def test_fast_search_equals_plain_search(model) -> None:
    calib = _calib(n=3, length=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans = {impl: _prune(BlockPruner(search_impl=impl, num_blocks=6, cache=False), model, calib)
             for impl in ("plain", "fast")}
    fast, plain = plans["fast"].info, plans["plain"].info
    assert fast["removal_order"] == plain["removal_order"]
    assert fast["step_ppl"] == plain["step_ppl"]  # bitwise: every complete score is the same arithmetic
    assert plain["evaluations"] == fast["evaluations"] == plain_evaluations(8, 0, 6) == 8 + 7 + 6 + 5 + 4 + 3
    assert fast["search_total"]["layer_passes"] < plain["search_total"]["layer_passes"]
    assert len(plain["step_ppl"]) == 6 and all(p > 0 for p in plain["step_ppl"])
    after = model.state_dict()  # the search leaves the model as it was
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_fast_search_options_keep_the_selection() -> None:
    """One candidate per layer call (stack_tokens=1) and no kept states (resume_gb=0) change the work done,
    never the result; keeping states saves layer passes."""
    model, calib = tiny_model("qwen2"), _calib(n=3, length=12, seed=1)
    plans = {name: _prune(BlockPruner(num_blocks=6, cache=False, **options), model, calib)
             for name, options in {"default": {}, "unstacked": {"stack_tokens": 1},
                                   "no_resume": {"resume_gb": 0}, "plain": {"search_impl": "plain"}}.items()}
    for name in ("default", "unstacked", "no_resume"):
        assert plans[name].info["removal_order"] == plans["plain"].info["removal_order"]
        assert plans[name].info["step_ppl"] == plans["plain"].info["step_ppl"]
    passes = {name: plan.info["search_total"]["layer_passes"] for name, plan in plans.items()}
    assert passes["default"] == passes["unstacked"] < passes["no_resume"] < passes["plain"]


def test_ties_follow_the_official_order_in_both_searches() -> None:
    """Identity blocks tie exactly; both searches keep the first in the official order (MHA, then MLP)."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    for i in range(adapter.num_layers()):  # every block adds exactly zero: every candidate scores the same
        torch.nn.init.zeros_(adapter.attn_out(i).weight)
        torch.nn.init.zeros_(adapter.mlp_out(i).weight)
    calib = _calib(n=4, length=12, seed=3)
    plans = [_prune(BlockPruner(search_impl=impl, num_blocks=5, batch_size=2, cache=False), model, calib)
             for impl in ("plain", "fast")]
    expected = [["mha", 0], ["mha", 1], ["mha", 2], ["mha", 3], ["mlp", 0]]
    assert plans[0].info["removal_order"] == plans[1].info["removal_order"] == expected
    assert len(set(plans[0].info["step_ppl"])) == 1


def test_fast_search_stops_bad_candidates_early() -> None:
    """A model that predicts the calibration token well unless one noisy MLP is present: candidates that keep
    that MLP are stopped after their first sequence, and the choice still equals the plain search's."""
    model = tiny_model("opt")
    adapter = adapter_for(model)
    with torch.no_grad():
        u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        adapter.embeddings()[0].weight[5] = 10 * u / u.norm()
        adapter.lm_head().weight[5] = 50 * u / u.norm()
        adapter.mlp_out(0).weight.mul_(1000.0)
    ids = torch.full((4, 8), 5)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    calib = CalibrationSet(ids, mask, {"tokens_hash": tensor_hash(ids)})
    plans = {impl: _prune(BlockPruner(search_impl=impl, num_blocks=3, cache=False), model, calib)
             for impl in ("plain", "fast")}
    assert plans["fast"].info["removal_order"] == plans["plain"].info["removal_order"]
    assert plans["fast"].info["removal_order"][0] == ["mlp", 0]
    assert plans["fast"].info["step_ppl"] == plans["plain"].info["step_ppl"]
    fast, plain = plans["fast"].info["search_total"], plans["plain"].info["search_total"]
    assert fast["aborted"] > 0 and fast["completed"] + fast["aborted"] == plain["evaluations"] == 8 + 7 + 6
    assert fast["layer_passes"] < plain["layer_passes"] / 2


def test_ratio_stops_at_first_step_reaching_it_and_reports_it() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    total = count_params(adapter)["params/total"]
    plan = _prune(BlockPruner(num_blocks=None, cache=False), model, _calib(n=2, length=12), ratio=0.006)
    fracs = plan.info["step_removed_frac"]
    assert len(fracs) >= 2 and fracs[-1] >= 0.006 > fracs[-2]  # embeddings are most of a tiny model
    assert plan.info["achieved_ratio"] == pytest.approx(fracs[-1])
    attn, mlp = set(plan.drop_attn) | set(plan.drop_layers), set(plan.drop_mlp) | set(plan.drop_layers)
    assert blocks.removed_param_count(adapter, attn, mlp) / total == pytest.approx(fracs[-1])
    assert len(plan.info["removal_order"]) == plan.info["blocks_removed"] == len(plan.info["step_ppl"])


def test_unreachable_ratio_and_bad_options_raise() -> None:
    model = tiny_model("llama")
    with pytest.raises(PruneError, match="cannot be reached.*block_type=mix"):
        _prune(BlockPruner(block_type="mha", cache=False), model, _calib(), ratio=0.5)  # embeddings dominate
    with pytest.raises(PruneError, match="num_blocks"):
        _prune(BlockPruner(num_blocks=9, cache=False), model, _calib())
    with pytest.raises(PruneError, match="block_type"):
        BlockPruner(block_type="attention")
    with pytest.raises(PruneError, match="stack_tokens"):
        BlockPruner(stack_tokens=0)
    with pytest.raises(PruneError, match="calibration"):
        _prune(BlockPruner(cache=False), model, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [
    {"search": False}, {"search": False, "search_impl": "plain"}, {"score": "block_influence"},
    {"score": "relative_magnitude", "search": False}, {"score": "nll_per_param", "search": False},
    {"unit": "layer"}, {"block_type": "mha"},
    {"block_type": "mlp", "search_impl": "plain"},
])
def test_variants_produce_valid_plans(options: dict) -> None:
    model = tiny_model("phi")
    plan = _prune(BlockPruner(num_blocks=3, cache=False, **options), model, _calib(n=2, length=12))
    assert plan.info["blocks_removed"] == 3
    kinds = {k for k, _ in plan.info["removal_order"]}
    expected = {"unit": {"layer"}, "block_type": {options.get("block_type")}}
    for key, allowed in expected.items():
        if key in options:
            assert kinds <= allowed
    if options.get("unit") == "layer":
        assert len(plan.drop_layers) == 3 and not plan.drop_attn and not plan.drop_mlp
    pruned = copy.deepcopy(model)
    surgery.apply(adapter_for(pruned), PrunePlan.from_json(plan.to_json()))
    with torch.inference_mode():
        assert torch.isfinite(pruned(random_ids(100)).logits).all()


def test_one_shot_ranks_single_block_scores() -> None:
    model = tiny_model("mistral")
    calib = _calib()
    one_shot = _prune(BlockPruner(search=False, num_blocks=8, cache=False), model, calib)
    scores = one_shot.info["block_ppl"]
    assert scores == sorted(scores)  # the dense model's single-block PPLs, ascending
    assert one_shot.info["evaluations"] == one_shot.info["plain_evaluations"] == 8  # one pass over the blocks
    first = _prune(BlockPruner(num_blocks=1, cache=False), model, calib)
    assert first.info["removal_order"][0] == one_shot.info["removal_order"][0]
    assert first.info["step_ppl"][0] == scores[0]


def _calib_loss_sum(model, calib: CalibrationSet) -> float:
    """Σ over sequences of the mean next-token NLL over target positions (an independent computation)."""
    with torch.inference_mode():
        logits = model(calib.input_ids, use_cache=False).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), calib.input_ids[:, 1:], reduction="none")
    mask = calib.target_mask[:, 1:]
    return float(((nll * mask).sum(1) / mask.sum(1)).sum())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_nll_per_param_picks_least_loss_rise_per_parameter(family: str) -> None:
    """The extension score: first removal = argmin (loss with c removed - dense loss) / parameters of c,
    and the fast search selects exactly what the plain one does."""
    model = tiny_model(family)
    adapter, calib = adapter_for(model), _calib(n=3, length=12)
    dense = _calib_loss_sum(model, calib)
    values = {}
    for c in candidate_blocks(adapter.num_layers(), "block", "mix"):
        attn, mlp = ([c[1]], []) if c[0] == "mha" else ([], [c[1]])
        size = blocks.removed_param_count(adapter, attn, mlp)
        with blocks.masked(adapter, attn, mlp):
            values[tuple(c)] = (_calib_loss_sum(model, calib) - dense) / size
    plans = {impl: _prune(BlockPruner(score="nll_per_param", search_impl=impl, num_blocks=4, cache=False),
                          model, calib) for impl in ("plain", "fast")}
    assert plans["fast"].info["removal_order"] == plans["plain"].info["removal_order"]
    assert plans["fast"].info["step_ppl"] == plans["plain"].info["step_ppl"]
    assert tuple(plans["plain"].info["removal_order"][0]) == min(values, key=values.get)
    assert plans["plain"].info["options"]["score"] == "nll_per_param"
    attn_size = blocks.removed_param_count(adapter, [0], [])
    mlp_size = blocks.removed_param_count(adapter, [], [0])
    assert attn_size != mlp_size  # blocks differ in size: the two rules can disagree


# --------------------------------------------------------------------------------------------- cache


def test_cache_serves_every_ratio_and_extends() -> None:
    model = tiny_model("llama")
    calib = _calib()
    first = _prune(BlockPruner(num_blocks=3), model, calib)
    assert first.info["steps_searched"] == 3 and first.info["evaluations"] == 8 + 7 + 6
    again = _prune(BlockPruner(num_blocks=2), model, calib)
    assert again.info["evaluations"] == 0 and again.info["steps_searched"] == 0
    assert again.info["removal_order"] == first.info["removal_order"][:2]
    ratio = first.info["step_removed_frac"][1]  # a ratio the cached order already covers
    by_ratio = _prune(BlockPruner(), model, calib, ratio=ratio)
    assert by_ratio.info["evaluations"] == 0
    assert by_ratio.info["removal_order"] == first.info["removal_order"][:2]
    more = _prune(BlockPruner(num_blocks=5, search_impl="plain"), model, calib)  # one order for both impls
    assert more.info["steps_searched"] == 2 and more.info["steps_reused"] == 3
    assert more.info["evaluations"] == plain_evaluations(8, 3, 2) == 5 + 4
    assert more.info["removal_order"][:3] == first.info["removal_order"]
    other_data = _prune(BlockPruner(num_blocks=2), model, _calib(seed=7))
    assert other_data.info["steps_searched"] == 2  # another calibration set: another cache entry


def test_interrupted_search_resumes_from_last_step() -> None:
    model = tiny_model("opt")
    calib = _calib()
    reference = _prune(BlockPruner(num_blocks=5, cache=False), model, calib).info["removal_order"]

    def interrupt(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    method = BlockPruner(num_blocks=5)
    method.on_step = interrupt
    with pytest.raises(KeyboardInterrupt):
        _prune(method, model, calib)
    resumed = _prune(BlockPruner(num_blocks=5), model, calib)
    assert resumed.info["steps_reused"] == 2 and resumed.info["steps_searched"] == 3
    assert resumed.info["removal_order"] == reference
    cache_file = resumed.info["cache"]["path"]
    assert json.loads(open(cache_file).read())["order"] == reference


def test_cache_file_name_and_layout_stay_readable() -> None:
    """Caches written before the search became a recipe resume: the file is named by the first 20 hex digits
    of the sha256 of its key as sorted JSON, keeps its field names, and loads without ``step_total`` (the
    oldest layout)."""
    model, calib = tiny_model("qwen2"), _calib(seed=11)
    first = _prune(BlockPruner(num_blocks=1), model, calib).info
    key, path = first["cache"]["key"], first["cache"]["path"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    assert path.endswith(os.path.join("blockpruner", f"{digest}.json"))
    stored = json.loads(open(path).read())
    fields = {"key", "order", "step_ppl", "step_total", "steps", "hints", "complete", "dense_ppl"}
    assert set(stored) == fields
    del stored["step_total"]
    with open(path, "w") as f:
        f.write(json.dumps(stored, indent=1))
    resumed = _prune(BlockPruner(num_blocks=2), model, calib).info
    assert resumed["steps_reused"] == 1 and resumed["steps_searched"] == 1
    assert resumed["removal_order"][:1] == first["removal_order"]


# --------------------------------------------------------------------------------------------- surgery


ATTN, MLP = [0, 2, 3], [1, 3]  # layer 0's attention goes; layer 3 loses both blocks


def _reference_and_copy(model) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Inputs, the dense logits with the ATTN / MLP blocks zeroed (what removing them must give), and a copy
    of the model to prune."""
    ids = random_ids(100)
    with torch.inference_mode():
        expected = _skip_blocks_logits(model, ATTN, MLP, ids)
    return ids, expected, copy.deepcopy(model)


def test_sub_block_removal_is_real_and_exact(model) -> None:
    ids, expected, pruned = _reference_and_copy(model)
    adapter = adapter_for(pruned)
    before = count_params(adapter)["params/total"]
    removed = {id(p): p.numel() for m in blocks.removed_modules(adapter, ATTN, MLP) for p in m.parameters()}
    layer3 = sum(p.numel() for p in adapter.layer(3).parameters())
    assert sum(removed.values()) == blocks.removed_param_count(adapter, ATTN, MLP)
    surgery.apply(adapter, PrunePlan("blockpruner", 0.0, "params", drop_attn=ATTN, drop_mlp=MLP))
    assert count_params(adapter)["params/total"] == before - sum(removed.values())
    assert sum(removed.values()) > layer3  # layer 3 is gone whole, plus the other blocks
    family = model.config.model_type
    assert type(pruned.config).model_type == f"{family}_blockpruned"  # what config.json records
    assert pruned.config.model_type == family  # instances keep the family: adapters work unchanged
    assert (pruned.config.pruned_attn_layers, pruned.config.pruned_mlp_layers) == (ATTN, MLP)
    with torch.inference_mode():
        torch.testing.assert_close(pruned(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    assert adapter_for(pruned).num_layers() == 4  # the adapter still works on the new model type


def test_plan_drops_layers_without_blocks_and_renumbers(model) -> None:
    """A plan drops layer 3 whole and sub-blocks elsewhere; the config records post-drop indices."""
    ids, expected, pruned = _reference_and_copy(model)
    adapter = adapter_for(pruned)
    plan = PrunePlan("blockpruner", 0.0, "params", drop_layers=[3], drop_attn=[0, 2], drop_mlp=[1])
    surgery.apply(adapter, plan)
    assert adapter.num_layers() == pruned.config.num_hidden_layers == 3
    assert (pruned.config.pruned_attn_layers, pruned.config.pruned_mlp_layers) == ([0, 2], [1])
    assert [adapter.attn(i).layer_idx for i in range(3)] == [0, 1, 2]
    with torch.inference_mode():
        torch.testing.assert_close(pruned(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)


def test_phi_shared_norm_goes_with_the_last_block() -> None:
    model = tiny_model("phi")
    adapter = adapter_for(model)
    norm = sum(p.numel() for p in adapter.attn_norm(0).parameters())
    attn = sum(p.numel() for p in adapter.attn(0).parameters())
    mlp = sum(p.numel() for n, p in adapter.layer(0).named_parameters() if n.startswith("mlp."))
    assert blocks.removed_param_count(adapter, [0], []) == attn  # the norm stays while the MLP reads it
    assert blocks.removed_param_count(adapter, [], [0]) == mlp
    assert blocks.removed_param_count(adapter, [0], [0]) == attn + mlp + norm
    with blocks.masked(adapter, [0], []):
        assert blocks.removed_param_count(adapter, [], [0]) == mlp + norm  # now the MLP is the last block
        assert isinstance(adapter.attn(0), blocks.ZeroAttention)
    assert not isinstance(adapter.attn(0), blocks.ZeroAttention)  # restored


def test_generate_with_cache_matches_no_cache(model) -> None:
    """Layer 0's attention is removed: the KV cache must still report the right length (positions, masks)."""
    pruned = copy.deepcopy(model)
    plan = PrunePlan("blockpruner", 0.0, "params", drop_attn=[0, 2], drop_mlp=[0, 3])
    surgery.apply(adapter_for(pruned), plan)
    ids = random_ids(100, batch=2, length=8)
    pad = torch.ones_like(ids)
    pad[0, :3] = 0  # left padding in the first row
    with torch.inference_mode():
        out = pruned.generate(ids, attention_mask=pad, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                              use_cache=True, return_dict_in_generate=True, output_logits=True)
        mask = torch.cat([pad, torch.ones(2, 4, dtype=pad.dtype)], dim=1)
        full = pruned(out.sequences[:, :-1], attention_mask=mask, use_cache=False).logits[:, 7:]
        torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-4, rtol=1e-4)
        # A plain incremental forward (positions taken from the cache length) matches too.
        first = pruned(ids[:, :5], use_cache=True)
        rest = pruned(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
        whole = pruned(ids, use_cache=False).logits
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), whole, atol=1e-4, rtol=1e-4)


def test_save_reload_identical_logits(model, tmp_path) -> None:
    pruned = copy.deepcopy(model)
    surgery.apply(adapter_for(pruned), PrunePlan("blockpruner", 0.0, "params", drop_attn=ATTN, drop_mlp=MLP))
    pruned.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pruned_attn_layers"] == ATTN and config["pruned_mlp_layers"] == MLP
    assert config["model_type"] == f"{model.config.model_type}_blockpruned"
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())  # no missing / unexpected / mismatched keys
    assert type(reloaded) is type(pruned)
    assert count_params(adapter_for(reloaded)) == count_params(adapter_for(pruned))
    ids = random_ids(100)
    with torch.inference_mode():
        assert torch.equal(reloaded.eval()(ids).logits, pruned(ids).logits)


def test_fresh_process_loads_export_after_import_prune(tmp_path) -> None:
    """Only `import prune` is needed: the *_blockpruned types register on the first from_pretrained."""
    model = tiny_model("llama")
    pruned = copy.deepcopy(model)
    surgery.apply(adapter_for(pruned), PrunePlan("blockpruner", 0.0, "params", drop_attn=[0], drop_mlp=[1]))
    pruned.save_pretrained(tmp_path)
    ids = random_ids(100)
    with torch.inference_mode():
        torch.save(pruned(ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    code = "\n".join([
        "import sys",
        "import prune",
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules  # import prune stays light",
        "import torch",
        "from transformers import AutoModelForCausalLM",
        f"m = AutoModelForCausalLM.from_pretrained(r'{tmp_path}').eval()",
        "with torch.inference_mode():",
        f"    logits = m(torch.load(r'{tmp_path / 'ids.pt'}')).logits",
        f"assert torch.equal(logits, torch.load(r'{tmp_path / 'expected.pt'}'))",
        "print(type(m).__name__)",
    ])
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("LlamaBlockPrunedForCausalLM")


def test_config_composes_and_is_the_method() -> None:
    method = instantiate(compose_config("method=blockpruner").method)
    assert isinstance(method, BlockPruner) and method.ratio_unit == "params"
    assert (method.block_type, method.score, method.search, method.unit, method.search_impl) == (
        "mix", "ppl", True, "block", "fast")
    assert candidate_blocks(3, "block", "mix") == [("mha", 0), ("mha", 1), ("mha", 2), ("mlp", 0), ("mlp", 1),
                                                   ("mlp", 2)]


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_fast_equals_plain_on_embedded_model() -> None:
    """Reference model, tiny preset: 2 Alpaca chunks of 128 tokens, 3 greedy steps."""
    from prune.data.calibration import build_calibration
    from prune.models.load import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(compose_config().model)
    full = build_calibration(loaded.tokenizer, dataset="alpaca", split="train", style="row_chunks",
                             nsamples=16, seqlen=128, seed=42)
    ids, mask = full.input_ids[:2], full.target_mask[:2]
    calib = CalibrationSet(ids, mask, {"tokens_hash": tensor_hash(ids)})
    plans = {impl: _prune(BlockPruner(search_impl=impl, num_blocks=3, cache=False), loaded.model, calib)
             for impl in ("plain", "fast")}
    assert plans["fast"].info["removal_order"] == plans["plain"].info["removal_order"]
    assert plans["fast"].info["step_ppl"] == plans["plain"].info["step_ppl"]
    fast, plain = (plans[impl].info["search_total"]["layer_passes"] for impl in ("fast", "plain"))
    assert fast < plain
