"""Weight-sparsity methods (magnitude, Wanda, SparseGPT) on the tiny model of every family: the patterns hold
exactly, the sparsity is the target, SparseGPT without pruning changes nothing, Wanda with uniform inputs is
magnitude, nothing is counted as removed, the compressed checkpoint reads back to the same dense weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from prune.data.calibration import build_calibration
from prune.errors import PruneError
from prune.eval.params import count_params, sparsity
from prune.eval.semi_structured import is_two_four, semi_structured
from prune.methods.magnitude import MagnitudeOptions, magnitude_mask
from prune.methods.sparse_common import (
    SparsityOptions,
    capture_inputs,
    layer_linears,
    linear_weight_names,
    pattern_mask,
    run_layer,
)
from prune.methods.sparsegpt import SparseGPT, obs_prune
from prune.methods.wanda import Wanda, wanda_score
from prune.models import sparse_export, surgery
from prune.models.adapter import adapter_for
from prune.types import PrunePlan
from tests.conftest import assert_reloads_identically, compose_config, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ["magnitude", "wanda", "sparsegpt"]


def _calib(tokenizer):
    return build_calibration(tokenizer, dataset="c4", split="train", nsamples=2, seqlen=64, source="bundled")


def _pruned(tiny, method: str, pattern: str, ratio: float = 0.5):
    overrides = [f"method={method}", f"method.pattern={pattern}"]
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    plan = instantiate(compose_config(*overrides).method).prune(adapter, _calib(tiny.tokenizer), ratio)
    return model, adapter, plan


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", METHODS)
def test_n_m_pattern_holds_in_every_matrix(tiny, method: str, pattern: str) -> None:
    model, adapter, plan = _pruned(tiny, method, pattern)
    before, nonzero_before = count_params(adapter), sparsity(adapter)["params/nonzero"]
    surgery.apply(adapter, plan)
    n, m = map(int, pattern.split(":"))
    for name, linear in linear_weight_names(adapter):
        nonzero = (linear.weight.reshape(-1, m) != 0).sum(dim=1)
        assert int(nonzero.max()) <= n and int(nonzero.min()) == n, name  # exactly N kept per group
    metrics = sparsity(adapter)
    assert metrics["sparsity/linear"] == pytest.approx(0.5, abs=1e-9)
    assert count_params(adapter) == before  # zeros are never removed parameters
    assert plan.info["zeroed_only"] is True
    linear_total = sum(lin.weight.numel() for _, lin in linear_weight_names(adapter))
    assert metrics["params/nonzero"] == nonzero_before - linear_total // 2  # (zero-initialised biases aside)


@pytest.mark.parametrize("method", METHODS)
def test_unstructured_sparsity_is_the_target(tiny, method: str) -> None:
    model, adapter, plan = _pruned(tiny, method, "unstructured", ratio=0.4)
    surgery.apply(adapter, plan)
    for name, linear in linear_weight_names(adapter):
        rows, cols = linear.weight.shape
        zeros = int((linear.weight == 0).sum())
        assert abs(zeros - 0.4 * rows * cols) <= rows, name  # to one element per row
        if method == "wanda":  # Wanda compares within rows: exactly floor(0.4 * cols) per row
            assert ((linear.weight == 0).sum(dim=1) == int(0.4 * cols)).all()


def test_sparsegpt_without_pruning_leaves_the_weights(tiny) -> None:
    model, adapter, plan = _pruned(tiny, "sparsegpt", "unstructured", ratio=0.0)
    for name, updated in plan.tensors_of("weight_updates").items():
        dense = tiny.model.get_parameter(name).detach()
        dead = (updated != dense).any(dim=0)  # inputs never active (zero Hessian diagonal, e.g. after ReLU):
        assert (updated[:, dead] == 0).all(), name  # zeroed, as the code does
        assert torch.equal(updated[:, ~dead], dense[:, ~dead]), name
        assert int(dead.sum()) < dense.shape[1] // 4, name


def test_obs_update_beats_zeroing_the_same_mask() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    x = torch.randn(256, 32, generator=g) @ torch.randn(32, 512, generator=g) + 0.1 * torch.randn(256, 512)
    hessian = 2 * x @ x.t() / x.shape[1]
    assert torch.equal(obs_prune(w, hessian.clone(), 0.0, None), w)  # damping alone changes nothing
    updated = obs_prune(w, hessian.clone(), 0.0, (2, 4))
    mask = updated == 0
    assert int(mask.sum()) == w.numel() // 2
    zeroed = w.masked_fill(mask, 0)
    assert ((updated - w) @ x).norm() < 0.5 * ((zeroed - w) @ x).norm()  # the OBS update compensates


def test_wanda_with_uniform_inputs_is_magnitude(tiny) -> None:
    for _, linear in linear_weight_names(adapter_for(tiny.model)):
        w = linear.weight.detach()
        uniform = torch.full((w.shape[1],), 3.0)
        for pattern in ("2:4", "unstructured"):
            o = SparsityOptions(pattern=pattern)
            wanda = pattern_mask(wanda_score(w, uniform), o, 0.5, "row")
            group = "row" if pattern == "unstructured" else "matrix"  # Wanda compares within rows
            assert torch.equal(wanda, magnitude_mask(w, MagnitudeOptions(pattern=pattern), 0.5, group))


def test_layer_loop_reproduces_the_model(tiny) -> None:
    """The loop's layer calls (captured kwargs, one window at a time) give the model's own hidden states."""
    adapter = adapter_for(tiny.model)
    calib = _calib(tiny.tokenizer)
    inputs = capture_inputs(adapter, calib)
    with torch.inference_mode():
        out = tiny.model.base_model(input_ids=calib.input_ids[1:2], output_hidden_states=True)
        states = out.hidden_states
        hidden = [inputs.hidden[1]]
        for i in range(adapter.num_layers() - 1):  # the last state is after the final norm
            hidden = run_layer(adapter, adapter.layer(i), hidden, inputs.layer_kwargs[i])
            torch.testing.assert_close(hidden[0], states[i + 1])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_plan_round_trips_and_the_model_reloads(tiny, method: str, tmp_path) -> None:
    model, adapter, plan = _pruned(tiny, method, "2:4")
    plan.save(tmp_path / "plan")
    assert PrunePlan.load(tmp_path / "plan" / "prune_plan.json") == plan
    surgery.apply(adapter, plan)
    assert_reloads_identically(model, tmp_path / "model")


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_compressed_checkpoint_reads_back_to_the_dense_weights(tiny, pattern: str, tmp_path) -> None:
    model, adapter, plan = _pruned(tiny, "magnitude", pattern)
    surgery.apply(adapter, plan)
    model.save_pretrained(tmp_path / "dense")
    assert sparse_export.save_compressed(adapter, plan, tmp_path / "dense", tmp_path / "compressed")
    back = sparse_export.read_dense_weights(tmp_path / "compressed")
    state = {k: v for k, v in model.state_dict().items() if k in back}
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    linear = next(n for n, _ in linear_weight_names(adapter)).removesuffix(".weight")
    from safetensors import safe_open

    with safe_open(tmp_path / "compressed" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"{linear}.bitmask" in keys and f"{linear}.weight" not in keys
    sparse = json.loads((tmp_path / "compressed" / "config.json").read_text())["quantization_config"]
    assert sparse["quant_method"] == "compressed-tensors"
    assert sparse["sparsity_config"]["sparsity_structure"] == pattern
    fmt = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
    assert sparse["sparsity_config"]["format"] == fmt
    assert sparse["sparsity_config"]["global_sparsity"] == pytest.approx(0.5)


def test_unstructured_plans_write_no_compressed_checkpoint(tiny, tmp_path) -> None:
    _, adapter, plan = _pruned(tiny, "magnitude", "unstructured")
    assert not sparse_export.save_compressed(adapter, plan, tmp_path, tmp_path / "c")


def test_bad_patterns_and_ratios_are_one_clear_error(tiny) -> None:
    with pytest.raises(PruneError, match="method.pattern"):
        Wanda(pattern="4:2")
    with pytest.raises(PruneError, match="pass ratio=0.5"):
        _pruned(tiny, "magnitude", "2:4", ratio=0.3)
    with pytest.raises(PruneError, match="multiple of M=4"):
        SparseGPT(pattern="2:4", blocksize=130)


def test_weight_updates_refuse_a_wrong_shape(tiny) -> None:
    adapter = adapter_for(copy.deepcopy(tiny.model))
    name = next(n for n, _ in linear_weight_names(adapter))
    plan = PrunePlan(method="x", ratio=0.5, ratio_unit="params",
                     tensors={f"weight_updates/{name}": torch.ones(2)})
    with pytest.raises(PruneError, match="shape"):
        surgery.apply(adapter, plan)


def test_sparse_kernels_stay_off_on_a_cpu(tiny) -> None:
    _, adapter, plan = _pruned(tiny, "magnitude", "2:4")
    surgery.apply(adapter, plan)
    assert all(is_two_four(lin.weight) for _, lin in linear_weight_names(adapter))
    with semi_structured(adapter.layers()) as converted:
        assert converted == 0  # no CUDA: the zeros run densely, the speed-up is measured as it is


@pytest.mark.gpu
def test_two_four_linears_run_on_sparse_kernels() -> None:
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Sequential(nn.Linear(256, 128, bias=False))]).half().cuda()
    lin = layer_linears(layers[0])["0"]
    with torch.no_grad():
        lin.weight.masked_fill_(magnitude_mask(lin.weight, MagnitudeOptions(pattern="2:4"), 0.5), 0)
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    dense = lin(x)
    with semi_structured(layers) as converted:
        assert converted == 1 and type(lin.weight.data).__name__.startswith("SparseSemiStructured")
        torch.testing.assert_close(lin(x), dense, rtol=1e-2, atol=1e-2)
    assert torch.equal(lin(x), dense)  # the dense weight is back


def test_random_ids_helper_still_drives_the_pruned_model(tiny) -> None:
    model, adapter, plan = _pruned(tiny, "sparsegpt", "unstructured")
    surgery.apply(adapter, plan)
    with torch.inference_mode():
        assert torch.isfinite(model(random_ids(100)).logits).all()


def test_sparsegpt_true_sequential_groups_every_linear(tiny) -> None:
    """The code's --true-sequential: q/k/v, o, MLP inputs, MLP output pruned one group after another; every
    linear of the layer is in exactly one group, and the pattern still holds."""
    from prune.methods.sparse_common import sequential_groups
    from prune.methods.sparsegpt import SparseGPT

    adapter = adapter_for(copy.deepcopy(tiny.model))
    groups = sequential_groups(adapter, adapter.layer(0))
    names = [n for g in groups for n in g]
    assert sorted(names) == sorted(layer_linears(adapter.layer(0))) and len(groups) >= 4
    plan = SparseGPT(pattern="2:4", true_sequential=True).prune(adapter, _calib(tiny.tokenizer), 0.5)
    surgery.apply(adapter, plan)
    assert sparsity(adapter)["sparsity/linear"] == pytest.approx(0.5, abs=1e-9)
