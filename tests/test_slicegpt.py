"""SliceGPT on the tiny model of every family: rotation is exact, slicing is physical and counted, the sliced
model reloads, generates with a KV cache and replays from its plan."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.eval.params import count_params, removed_fraction
from prune.methods.slicegpt import SliceGPT, pca_rotation, sliced_width
from prune.models import rotation, surgery
from prune.models.adapter import adapter_for
from prune.types import PrunePlan
from tests.conftest import assert_reloads_identically, random_ids
from tests.test_bad_inputs import assert_one_error_line, run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(vocab: int, n: int = 4, length: int = 32) -> CalibrationSet:
    ids = random_ids(vocab, n, length, seed=11)
    return CalibrationSet(ids, torch.ones_like(ids, dtype=torch.bool))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _sliced(tiny, ratio: float = 0.25) -> tuple[torch.nn.Module, PrunePlan]:
    model = copy.deepcopy(tiny.model).eval()
    plan = SliceGPT().prune(adapter_for(model), _calib(model.config.vocab_size), ratio)
    surgery.apply(adapter_for(model), plan)
    return model, plan


def test_sliced_width_follows_the_official_rounding() -> None:
    assert sliced_width(4096, 0.3, 8) == 2864  # int(0.7 * 4096) = 2867 -> 2864
    assert sliced_width(576, 0.2, 8) == 456    # int(460.8) = 460 -> 456
    assert sliced_width(576, 0.5, 8) == 288
    assert sliced_width(64, 0.25, 1) == 48


def test_pca_sorts_by_variance_and_damps() -> None:
    x = torch.randn(2, 500, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 5.0, 0.1])
    values, vectors = pca_rotation([x], damping=0.01)
    assert values[0] > values[1] > values[2]
    assert vectors[:, 0].abs().argmax() == 1 and vectors[:, 2].abs().argmax() == 2
    h = (x.reshape(-1, 3).double().T @ x.reshape(-1, 3).double())
    assert values.sum().item() == pytest.approx((h.trace() * 1.01).item(), rel=1e-9)


def test_rotated_but_unsliced_model_equals_the_dense_model(tiny) -> None:
    dense = tiny.model.eval()
    ids = random_ids(dense.config.vocab_size, 2, 24, seed=5)
    reference = _logits(dense, ids)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    hidden = model.config.hidden_size
    rotations = SliceGPT().rotations(adapter, _calib(dense.config.vocab_size).input_ids, hidden)
    assert all(q.shape == (hidden, hidden) for q in rotations.values())
    rotation.rotate_and_slice(adapter, rotations)
    assert type(model).__name__.endswith("SlicedForCausalLM")
    assert torch.allclose(_logits(model, ids), reference, atol=1e-5, rtol=0)


def test_sliced_model_is_physically_smaller_and_counted(tiny) -> None:
    dense_counts = count_params(adapter_for(tiny.model))
    model, plan = _sliced(tiny)
    adapter = adapter_for(model)
    d, w = model.config.hidden_size, sliced_width(model.config.hidden_size, 0.25, 8)
    assert plan.info["sliced_width"] == w and plan.info["slicing_ratio_achieved"] == pytest.approx(1 - w / d)
    assert adapter.embeddings()[0].weight.shape[1] == w
    assert all(lin.in_features == w for lin in adapter.attn_in(0) + adapter.mlp_in(0))
    assert adapter.mlp_out(adapter.num_layers() - 1).out_features == d  # the head's input is not sliced
    assert adapter.lm_head().in_features == d and adapter.lm_head().out_features == model.config.vocab_size
    shortcuts = [n for n, _ in model.named_parameters() if ".slicegpt_shortcuts." in n]
    per_layer = 1 if adapter.parallel_blocks else 2
    assert len(shortcuts) == per_layer * adapter.num_layers()
    counts = count_params(adapter)
    assert counts["params/total"] == plan.info["params_sliced"]  # the plan's projection is the real count
    assert plan.info["params_dense"] == dense_counts["params/total"]
    removed = removed_fraction(dense_counts, counts)["params/removed_frac"]
    assert removed == pytest.approx(-plan.info["params_change_frac"])
    assert adapter.lm_head().weight is not adapter.embeddings()[0].weight  # untied, both counted


def test_sliced_model_reloads_and_generates_with_the_cache(tiny, tmp_path: Path) -> None:
    model, _ = _sliced(tiny)
    assert_reloads_identically(model, tmp_path / "sliced")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced").eval()
    assert reloaded.config.slicegpt_widths == rotation.widths_of(model, adapter_for(model).layout)
    prompt = random_ids(model.config.vocab_size, 1, 6, seed=2)
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    with torch.no_grad():
        cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True,
                                   pad_token_id=pad)
        uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False,
                                     pad_token_id=pad)
    assert torch.equal(cached, uncached)


def test_the_plan_replays_to_the_same_model(tiny, tmp_path: Path) -> None:
    model, plan = _sliced(tiny)
    plan.save(tmp_path)
    replayed = copy.deepcopy(tiny.model).eval()
    surgery.apply(adapter_for(replayed), PrunePlan.load(tmp_path / "prune_plan.json"))
    ids = random_ids(model.config.vocab_size, 2, 12, seed=4)
    assert torch.equal(_logits(replayed, ids), _logits(model, ids))


def test_a_deep_copy_keeps_its_own_shortcuts(family) -> None:
    from tests.conftest import load_tiny

    model, _ = _sliced(load_tiny(family))
    ids = random_ids(model.config.vocab_size, 1, 10, seed=6)
    before = _logits(model, ids)
    twin = copy.deepcopy(model)
    assert torch.equal(_logits(twin, ids), before)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".slicegpt_shortcuts." in name:
                p.zero_()
    assert not torch.equal(_logits(twin, ids), before)  # the copy's hooks read the copy's shortcuts
    assert torch.equal(_logits(model, ids), before)


def test_official_embedding_centring_is_an_option(family) -> None:
    """center_embeddings=always (official fuse_modules) changes only RMSNorm models; LayerNorm ones are
    centred either way."""
    from tests.conftest import load_tiny

    dense = load_tiny(family).model.eval()
    ids = random_ids(dense.config.vocab_size, 1, 12, seed=8)
    logits = {}
    for mode in ("layernorm", "always"):
        model = copy.deepcopy(dense)
        rotations = SliceGPT(center_embeddings=mode).rotations(
            adapter_for(model), _calib(dense.config.vocab_size).input_ids, dense.config.hidden_size)
        rotation.rotate_and_slice(adapter_for(model), rotations, mode)
        logits[mode] = _logits(model, ids)
    layer_norm = family in ("opt", "phi")
    assert torch.allclose(logits["always"], logits["layernorm"], atol=1e-5) == layer_norm


def test_ratio_zero_is_a_no_op(tiny) -> None:
    plan = SliceGPT().prune(adapter_for(tiny.model), _calib(tiny.model.config.vocab_size), 0.0)
    assert plan.is_empty() and plan.info["no_op"]


def test_rotations_refuse_other_structural_edits(tiny) -> None:
    model = copy.deepcopy(tiny.model)
    plan = SliceGPT().prune(adapter_for(model), _calib(model.config.vocab_size), 0.25)
    both = PrunePlan("x", 0.25, "slicing", drop_layers=[1], tensors=plan.tensors)
    with pytest.raises(PruneError, match="cannot combine rotations"):
        surgery.apply(adapter_for(model), both)
    partial = PrunePlan("x", 0.25, "slicing", tensors=dict(list(plan.tensors.items())[1:]))
    with pytest.raises(PruneError, match="every residual site"):
        surgery.apply(adapter_for(model), partial)
    surgery.apply(adapter_for(model), plan)
    with pytest.raises(PruneError, match="stock"):
        SliceGPT().prune(adapter_for(model), _calib(model.config.vocab_size), 0.25)


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["method=slicegpt", "method.round_interval=0"], "method.round_interval=0 must be >= 1"),
    (["method=slicegpt", "method.final_orientation=svd"], "method.final_orientation='svd' is not one of"),
    (["method=slicegpt", "method.damping=-1"], "method.damping=-1"),
    (["method=slicegpt", "method.center_embeddings=yes"], "method.center_embeddings='yes' is not one of"),
    (["method=slicegpt", "ratio=0.99"], "leaves no dimension"),
])
def test_bad_options_are_one_error_line_exit_2(overrides, fragment, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    code, _ = run_in_process(overrides, tmp_path / "out")
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, fragment)
