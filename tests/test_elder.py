"""ELDeR/TRSP on tiny models of every family: stage-1 selection, stage-2 regularisation, export, ablations.

Why the selection tests look the way they do. Stage 1 scales a layer's *whole* output, residual included, so
for an identity layer k only the product S[k-1]·S[k] reaches the loss: S[k] and S[k-1] get identical
gradients and stay exactly equal, and an identity layer is *not* singled out. What the loss cannot see is the
last layer's scale, because the final norm is scale-invariant: the L1 term alone drives it, and it is
selected first. With ``scale_site=delta`` (S scales only what a layer adds) the identity layer is the one
whose scale gets no CE gradient, and it is selected. Either way the other scales must be pinned by the loss,
which a random model does not do; so the test model is made to predict its calibration text: sharp logits
(final-norm weight x30, eps ~0 so the norm is exactly scale-invariant) and greedy continuations of itself as
calibration data. (With Adam every scale whose gradient keeps its sign moves at the same rate, so without a
loss that pins the others the ranking would be noise.)
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods.elder import Elder, LayerScales
from prune.methods.training import is_checkpointing
from prune.models import surgery
from prune.models.adapter import adapter_for
from prune.models.hooks import layer_io
from prune.types import PrunePlan
from tests.conftest import compose_config, make_identity, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"progress": False, "batch_size": 2, "grad_accum": 1}


@torch.inference_mode()
def _greedy_calibration(model, n: int = 2, length: int = 64) -> CalibrationSet:
    """`n` greedy continuations of random first tokens: text the model predicts (its loss pins its scales)."""
    ids = random_ids(model.config.vocab_size, batch=n, length=1, seed=1)
    head = model.get_output_embeddings()
    for _ in range(length - 1):
        h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        ids = torch.cat([ids, head(h).argmax(-1, keepdim=True)], dim=1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return CalibrationSet(ids, mask, {"source": "greedy"})


def _sharp_model(tiny, identity: int):
    model = copy.deepcopy(tiny.model).eval()
    make_identity(model, identity)
    norm = adapter_for(model).final_norm()
    with torch.no_grad():
        norm.weight.mul_(30.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(30.0)
    for attr in ("eps", "variance_epsilon"):
        if hasattr(norm, attr):
            setattr(norm, attr, 1e-12)
    return model, _greedy_calibration(model)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_stage1_selection(tiny) -> None:
    model, calib = _sharp_model(tiny, identity=1)
    stage1 = FAST | {"stage2": False, "stage1_steps_per_round": 10, "stage1_lr": 0.2}
    # scale_site=delta: the identity layer's scale sees no CE gradient; L1 drives it to ~0 and it is selected.
    plan = Elder(scale_site="delta", **stage1).prune(adapter_for(copy.deepcopy(model)), calib, 0.25)
    scales = [abs(s) for s in plan.info["rounds"][0]["scales"]]
    assert plan.drop_layers == [1]
    assert scales[1] < 0.25 and min(s for i, s in enumerate(scales) if i != 1) > scales[1] + 0.2
    # The paper's site (whole output): S[1] equals S[0] exactly (only their product matters), and the
    # last layer's scale, invisible to the loss behind the scale-invariant final norm, is selected first.
    plan = Elder(**stage1).prune(adapter_for(model), calib, 0.25)
    scales = plan.info["rounds"][0]["scales"]
    assert scales[1] == pytest.approx(scales[0], abs=1e-5)
    assert plan.drop_layers == [3] and plan.info["selection_order"] == [3]
    # protecting the last layer (the code's rule, scaled down) keeps it out of the selection
    protected = Elder(protect_last=1, **stage1 | {"stage1_steps_per_round": 2})
    protected = protected.prune(adapter_for(model), calib, 0.25)
    assert 3 not in protected.drop_layers and protected.info["protect_last"] == 1


def test_stage2_reduces_io_difference_and_exports(tiny, tmp_path) -> None:
    model = copy.deepcopy(tiny.model)
    calib = _greedy_calibration(model)
    hooks, names = _hooks(model), [n for n, _ in model.named_parameters()]
    flags = [p.requires_grad for p in model.parameters()]

    def io_norm(m, drop: list[int]) -> float:
        norms: list[float] = []
        with torch.no_grad(), layer_io(adapter_for(m), lambda i, x, y: norms.append((y - x).norm().item())
                                       if i in drop else None):
            m.base_model(input_ids=calib.input_ids, use_cache=False)
        return sum(norms)

    dense = copy.deepcopy(model)
    adapter = adapter_for(model)
    method = Elder(**FAST | {"stage1_steps_per_round": 3, "stage2_steps": 5, "stage2_lr": 2e-3,
                             "lambda2": 1.0})
    plan = method.prune(adapter, calib, 0.5)
    drop = plan.drop_layers
    assert len(drop) == 2 and "time_stage2_s" in plan.info
    # ‖X_out − X_in‖ of P: the dense model (stage 1 trains only the scales) versus after stage 2
    before, after = io_norm(dense, drop), io_norm(model, drop)
    assert after < 0.8 * before
    curves = plan.info["stage2_curves"]
    assert len(curves["ce"]) == 5 and curves["reg"][-1] < curves["reg"][0]
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in dense.state_dict().items())
    # nothing of the method remains on the model: hooks, parameters, grad flags, mode
    assert _hooks(model) == hooks and [n for n, _ in model.named_parameters()] == names
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(p.grad is None for p in model.parameters())
    # export: surgery, stock save/load, identical logits
    surgery.apply(adapter, plan)
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids = random_ids(100)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_ablations_and_options() -> None:
    from tests.conftest import load_tiny

    tiny = load_tiny("llama")
    calib = _greedy_calibration(tiny.model)
    model = copy.deepcopy(tiny.model)
    base = FAST | {"stage1_steps_per_round": 2, "stage2_steps": 2}

    # "w/o W": one round, the n smallest at once
    dense = _state(model)
    plan = Elder(iterative=False, stage2=False, **base).prune(adapter_for(model), calib, 0.5)
    ranked = sorted(range(4), key=lambda i: (abs(plan.info["rounds"][0]["scales"][i]), i))
    assert len(plan.info["rounds"]) == 1 and plan.drop_layers == sorted(ranked[:2])
    # "w/o R": no stage 2, so the weights are untouched
    assert "stage2_curves" not in plan.info
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    # iterative: one round per layer; curves are plain lists
    plan = Elder(**base).prune(adapter_for(copy.deepcopy(model)), calib, 0.5)
    assert len(plan.info["rounds"]) == 2 and len(plan.info["stage1_curves"]["scales"]) == 4
    assert PrunePlan.from_json(plan.to_json()) == plan
    # code-faithful variants run: weights trained in stage 1, last-token labels, l1 norm, checkpointing
    variant = copy.deepcopy(model)
    Elder(stage1_trainable="all", stage1_weight_lr=1e-3, stage2=False, labels="last_token", **base).prune(
        adapter_for(variant), calib, 0.25)
    assert any(not torch.equal(dense[k], v) for k, v in variant.state_dict().items())
    # gradient checkpointing changes nothing but memory
    a = Elder(**base | {"stage2": False}).prune(adapter_for(copy.deepcopy(model)), calib, 0.5)
    ckpt_model = copy.deepcopy(model)
    b = Elder(gradient_checkpointing=True, **base | {"stage2": False})
    b = b.prune(adapter_for(ckpt_model), calib, 0.5)
    assert a.drop_layers == b.drop_layers
    assert a.info["rounds"][-1]["scales"] == pytest.approx(b.info["rounds"][-1]["scales"], abs=1e-5)
    assert not is_checkpointing(ckpt_model) and _hooks(ckpt_model) == 0
    # neighbours: only P and the layers next to it train; l1 regulariser
    near = copy.deepcopy(model)
    plan = Elder(stage2_trainable="neighbours", reg_norm="l1", stage2_lr=1e-3, **base).prune(
        adapter_for(near), calib, 0.25)
    p = plan.drop_layers[0]
    changed = {k for k, v in near.state_dict().items() if not torch.equal(dense[k], v)}
    layer_of = {i for k in changed for i in range(4) if f"layers.{i}." in k}
    assert changed and layer_of <= {p - 1, p, p + 1}
    assert not any("embed" in k or "lm_head" in k for k in changed)


def _adam_on_scales(form: str, ce_grad: list[float], steps: int = 20, lr: float = 0.2) -> list[float]:
    """Stage 1's update on S alone: Adam on a linear stand-in for CE (fixed gradient per layer) + λ1·L1."""
    scales = LayerScales(len(ce_grad), torch.device("cpu"), form)
    opt = torch.optim.AdamW(scales.params(), lr=lr, weight_decay=0.0)
    everyone = torch.arange(len(ce_grad))
    for _ in range(steps):
        opt.zero_grad()
        ce = sum(g * scales[i] for i, g in enumerate(ce_grad))
        (ce + 5e-3 * scales.l1(everyone)).backward()
        opt.step()
        scales.project()
    assert scales.l1(everyone).item() == pytest.approx(sum(abs(v) for v in scales.values()), abs=1e-6)
    return scales.values()


def test_l1_forms() -> None:
    # Layer 0 sees no CE gradient (like the last layer behind the scale-invariant final norm): the split form
    # (paper's constrained form) stops it at exactly 0; the code's |S| subgradient carries it across 0.
    # Layer 1's CE gradient (0.1) exceeds λ1: split moves u down and v up, S falls faster than under |S|.
    # Layer 2's CE wants S larger: both forms raise it alike.
    split, plain = _adam_on_scales("split", [0.0, 0.1, -0.1]), _adam_on_scales("abs", [0.0, 0.1, -0.1])
    assert split[0] == 0.0 and plain[0] != 0.0
    assert split[1] < plain[1] < 0
    assert split[2] == pytest.approx(plain[2], rel=1e-5) and split[2] > 4.0
    with pytest.raises(PruneError, match="l1_form"):
        Elder(l1_form="l0")


def test_curves_are_logged_live_to_the_wandb_run(monkeypatch) -> None:
    """Each optimiser step goes to the open W&B run (``wandb.run.log``) as it happens, with the values that
    ``plan.info`` keeps; lists become one key per entry: the scales by index, stage 2's I/O norms by layer."""
    import types

    from tests.conftest import load_tiny

    logged: list[dict[str, float]] = []
    run = types.SimpleNamespace(log=logged.append)  # what the runner's W&B logger leaves in wandb.run
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run))
    tiny = load_tiny("llama")
    calib = _greedy_calibration(tiny.model, n=2, length=16)
    plan = Elder(stage1_steps_per_round=2, stage2_steps=1, **FAST).prune(
        adapter_for(copy.deepcopy(tiny.model)), calib, 0.25)
    stage1, stage2 = plan.info["stage1_curves"], plan.info["stage2_curves"]
    assert len(logged) == 2 + 1
    assert [p["elder/stage1/ce"] for p in logged[:2]] == stage1["ce"]
    assert [p["elder/stage1/l1"] for p in logged[:2]] == stage1["l1"]
    assert [logged[1][f"elder/stage1/scales/{i}"] for i in range(4)] == stage1["scales"][1]
    assert logged[0]["elder/stage1/round"] == 0
    assert logged[2]["elder/stage2/reg"] == stage2["reg"][0]
    first = stage2["layers"][0]  # W&B keys name the layer itself; plan.info keeps the order of "layers"
    assert logged[2][f"elder/stage2/io_norm_per_layer/{first}"] == stage2["io_norm_per_layer"][0][0]


def test_config_and_errors() -> None:
    from tests.conftest import load_tiny

    cfg = compose_config("model=tiny_llama", "method=elder", "method.stage1_steps_per_round=1",
                         "method.stage2_steps=1")
    method = Elder(**{k: v for k, v in cfg.method.items() if k != "_target_"} | {"progress": False})
    assert method.ratio_unit == "layers" and method.grad_accum == 8 and method.lambda1 == 5e-3
    tiny = load_tiny("llama")
    calib = _greedy_calibration(tiny.model, n=2, length=16)
    plan = method.prune(adapter_for(copy.deepcopy(tiny.model)), calib, 0.25)
    assert len(plan.drop_layers) == math.ceil(0.25 * 4)
    with pytest.raises(PruneError, match="protect"):
        Elder(protect_first=2, protect_last=2, **FAST).prune(adapter_for(tiny.model), calib, 0.25)
    # a fixed P (extension): no stage 1, stage 2 on the given layers, the ratio ignored
    fixed = Elder(layers=[2, 1], stage2_steps=1, **FAST)
    fixed = fixed.prune(adapter_for(copy.deepcopy(tiny.model)), calib, 0.25)
    assert fixed.drop_layers == [1, 2] and "rounds" not in fixed.info
    assert len(fixed.info["stage2_curves"]["ce"]) == 1
    with pytest.raises(PruneError, match=r"method.layers=\[4\] must name layers in 0..3"):
        Elder(layers=[4], **FAST).prune(adapter_for(tiny.model), calib, 0.25)
    with pytest.raises(PruneError, match="reg_norm"):
        Elder(reg_norm="l3")
    with pytest.raises(PruneError, match="calibration"):
        Elder().prune(adapter_for(tiny.model), None, 0.25)


@pytest.mark.slow
def test_accelerate_two_processes_select_like_one() -> None:
    # accelerate launch, 2 CPU processes (gloo), the same global batch as 1 process: same layers, same scales.
    from prune.bench.elder_accelerate import main

    result = main(["processes=1,2", "model=tiny_llama", "ratio=0.5"])
    assert result["same_selection"] and result["runs"][2]["processes"] == 2
    assert result["max_scale_diff"] < 1e-5 and result["max_weight_checksum_rel_diff"] < 1e-6
