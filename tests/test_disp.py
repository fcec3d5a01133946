"""DISP-LLM on tiny models of every family: hard-masked model == physically pruned model, export and reload,
KV-cache generation, the hypernetwork and its binarisers, training to the target ratio with a frozen LLM,
deterministic final masks, checkpoint / resume, the config and the CLI end to end."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM

from prune.data.calibration import CalibrationSet
from prune.data.tokens import tensor_hash
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods.disp import Disp, HyperNetwork, gumbel_sigmoid, hard_st, reinmax
from prune.models import surgery, width
from prune.models.adapter import adapter_for
from prune.models.load import load_model_and_tokenizer
from prune.types import PrunePlan
from tests.conftest import REPO, compose_config, random_ids
from tests.test_blockpruner import _dense
from tests.test_run_smoke import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"progress": False, "checkpoint": False, "seqlen": 32, "log_every": 10}


@functools.cache
def _small_vocab():
    """tiny_llama with a 512-token vocabulary: the LM head no longer dominates, training tests run fast."""
    cfg = compose_config("model=tiny_llama", "model.random_config.vocab_size=512")
    return load_model_and_tokenizer(cfg.model).model


def _calib(vocab: int, n: int = 4, length: int = 64, seed: int = 3) -> CalibrationSet:
    ids = random_ids(vocab, batch=n, length=length, seed=seed)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return CalibrationSet(ids, mask, {"tokens_hash": tensor_hash(ids)})


def _random_masks(model, seed: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer and site: fully kept, a single index, or a random half (cycling over sites and layers)."""
    gen = torch.Generator().manual_seed(seed)
    masks: dict[int, dict[str, torch.Tensor]] = {}
    for i, widths in enumerate(width.WidthCost.of(adapter_for(model)).widths):
        masks[i] = {}
        for j, (site, w) in enumerate(zip(width.SITES, widths)):
            kind = (i + j) % 3
            m = torch.ones(w) if kind == 0 else (torch.rand(w, generator=gen) > 0.5).float()
            if kind == 1:
                m = torch.zeros(w)
                m[int(torch.randint(w, (1,), generator=gen))] = 1.0
            masks[i][site] = m
    return masks


def _keep(masks) -> dict[str, dict[str, list[int]]]:
    return {str(i): {s: m.nonzero().flatten().tolist() for s, m in sites.items()}
            for i, sites in masks.items()}


def _pruned(family: str, masks):
    model = copy.deepcopy(_dense(family))
    surgery.apply(adapter_for(model), PrunePlan("disp", 0.5, "params", keep_dims=_keep(masks)))
    return model


# ------------------------------------------------------------------------------------------ architecture


def test_hard_masks_equal_physical_pruning(family) -> None:
    dense = _dense(family)
    masks = _random_masks(dense)
    ids = random_ids(dense.config.vocab_size)
    with torch.inference_mode(), width.gated(adapter_for(dense), masks):
        reference = dense(ids).logits
    pruned = _pruned(family, masks)
    with torch.inference_mode():
        torch.testing.assert_close(pruned(ids).logits, reference, atol=1e-5, rtol=0)
    # T(s) of the masks is exactly what the physical model holds, and less than the dense model
    cost = width.WidthCost.of(adapter_for(dense))
    sizes = [[int(masks[i][s].sum()) for s in width.SITES] for i in masks]
    n = count_params(adapter_for(pruned))["params/total"]
    assert n == cost.count(sizes, linear_only=False) < cost.total
    assert type(pruned).__name__.endswith("DispForCausalLM") and pruned.config.model_type == family


def test_save_reload_identical_logits(family, tmp_path) -> None:
    masks = _random_masks(_dense(family), seed=2)
    pruned = _pruned(family, masks)
    pruned.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"{family}_disp" and (tmp_path / "model.safetensors").is_file()
    partial = {i: {s: v for s, v in sites.items() if len(v) < len(masks[int(i)][s])}  # full sites omitted
               for i, sites in _keep(masks).items()}
    assert config["disp_keep_dims"] == partial
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())  # no missing / unexpected / mismatched keys
    assert type(reloaded) is type(pruned)
    total = [count_params(adapter_for(m))["params/total"] for m in (reloaded, pruned, _dense(family))]
    assert total[0] == total[1] < total[2]
    ids = random_ids(pruned.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(reloaded.eval()(ids).logits, pruned(ids).logits)


def test_fresh_process_loads_export_after_import_prune(tmp_path) -> None:
    """Only ``import prune`` is needed, no trust_remote_code: the *_disp types register on from_pretrained."""
    pruned = _pruned("qwen2", _random_masks(_dense("qwen2")))
    pruned.save_pretrained(tmp_path / "model")
    ids = random_ids(100)
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import sys, prune, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        with torch.inference_mode():
            torch.save(model(torch.tensor({ids.tolist()})).logits, sys.argv[2])
        print(type(model).__name__)
    """))
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "logits.pt")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("Qwen2DispForCausalLM")
    with torch.inference_mode():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), pruned(ids).logits)


@pytest.mark.parametrize("fam", ["llama", "phi"])  # SelectNorm and IndexSelectLinear inputs
def test_generate_with_cache_matches_no_cache(fam) -> None:
    pruned = _pruned(fam, _random_masks(_dense(fam), seed=3))
    ids = random_ids(100, batch=2, length=8)
    with torch.inference_mode():
        out = pruned.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        full = pruned(out.sequences[:, :-1], use_cache=False).logits[:, 7:]
        torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-4, rtol=1e-4)


def test_plan_errors_and_json_round_trip() -> None:
    model = copy.deepcopy(_dense("llama"))
    plan = PrunePlan("disp", 0.5, "params", keep_dims={"0": {"mlp_mid": [0, 5]}})
    assert PrunePlan.from_json(plan.to_json()) == plan and not plan.is_empty()
    old = json.dumps({"method": "x", "ratio": 0.0, "ratio_unit": "layers"})  # a plan from before keep_dims
    assert PrunePlan.from_json(old).keep_dims == {}
    for bad in ({"0": {"mlp_mid": []}}, {"0": {"attn_in": [64]}}, {"9": {"attn_in": [0]}},
                {"0": {"nope": [0]}}):
        with pytest.raises(PruneError):
            surgery.apply(adapter_for(model), PrunePlan("disp", 0.5, "params", keep_dims=bad))
    with pytest.raises(PruneError, match="combine"):
        mixed = PrunePlan("disp", 0.5, "params", keep_dims=plan.keep_dims, drop_mlp=[1])
        surgery.apply(adapter_for(model), mixed)


# -------------------------------------------------------------------------------------------- hypernetwork


def test_hypernetwork_shapes_follow_the_paper() -> None:
    widths = [64, 64, 64, 128, 64] * 2
    hn = HyperNetwork(widths)
    gru = hn.gru
    assert (gru.input_size, gru.hidden_size, gru.bidirectional, gru.num_layers) == (32, 64, True, 1)
    assert len(hn.norms) == len(widths) and all(n.normalized_shape == (128,) for n in hn.norms)
    assert all(h.in_features == 128 and h.out_features == w and h.bias is None
               for h, w in zip(hn.heads, widths))
    assert hn.z.shape == (len(widths), 1, 32) and "z" not in dict(hn.named_parameters())  # fixed input
    assert [x.shape[0] for x in hn()] == widths
    assert torch.equal(HyperNetwork(widths, seed=0).z, hn.z)
    assert len(HyperNetwork(widths, shared_norm=True).norms) == 1


def test_binarisers_are_hard_where_expected_and_have_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, requires_grad=True)
    b = reinmax(x, 3.0, 1.0, gen)
    assert set(b.unique().tolist()) <= {0.0, 1.0} and 0.8 < b.mean() < 0.99  # σ(x + 3): gates start open
    b.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    x.grad = None
    soft = gumbel_sigmoid(x, 3.0, 0.4, gen)
    hard = hard_st(gumbel_sigmoid(x, 3.0, 0.4, gen))
    assert ((soft > 0.01) & (soft < 0.99)).any() and set(hard.unique().tolist()) <= {0.0, 1.0}  # soft gates
    (soft.sum() + hard.sum()).backward()
    assert x.grad.abs().sum() > 0


def test_reinmax_matches_the_two_class_softmax_algorithm() -> None:
    """Alg. 2 of the paper on the two-class softmax over (x + c, 0): same values, same gradients."""
    x = torch.randn(512, requires_grad=True)
    w = torch.randn(512)
    (grad,) = torch.autograd.grad((reinmax(x, 3.0, 1.0, torch.Generator().manual_seed(0)) * w).sum(), x)
    theta = torch.stack([x + 3.0, torch.zeros_like(x)], -1)
    b = torch.bernoulli(torch.sigmoid(x.detach() + 3.0), generator=torch.Generator().manual_seed(0))
    d = torch.stack([b, 1 - b], -1)
    pi0 = theta.softmax(-1)
    pi1 = (d + theta.softmax(-1)) / 2  # tau = 1
    pi1 = ((pi1.log() - theta).detach() + theta).softmax(-1)
    pi2 = 2 * pi1 - pi0 / 2
    (expected,) = torch.autograd.grad(((pi2 - pi2.detach() + d)[..., 0] * w).sum(), x)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------------- method


@pytest.mark.parametrize("binarizer", ["reinmax", "gumbel"])
def test_training_reaches_the_ratio_with_a_frozen_llm(binarizer, tmp_path) -> None:
    model = copy.deepcopy(_small_vocab())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = Disp(**FAST | {"checkpoint": True, "checkpoint_dir": str(tmp_path)}, binarizer=binarizer,
                  ratio_params="linear", steps=150)
    plan = method.prune(adapter_for(model), _calib(512), 0.4)
    info = plan.info
    assert abs(info["achieved"]["linear"] - 0.4) < 0.02 and abs(info["achieved_ratio"] - 0.4) < 0.02
    sampled = info["curves"]["removed_frac_sampled"][-5:]  # the regulariser's masks found the target
    assert abs(sum(sampled) / len(sampled) - 0.4) < 0.05
    assert info["reached_target"]
    assert info["trained_removed_frac"] == pytest.approx(sum(sampled) / len(sampled))
    assert {"ce", "reg", "removed_frac_threshold", "step"} <= set(info["curves"])
    # the LLM is untouched: same weights, no gradients, trainable flags restored, nothing in the optimiser
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    state = torch.load(info["checkpoint"], weights_only=False)
    hn_shapes = sorted(tuple(v.shape) for k, v in state["hn"].items() if k != "z")
    opt_shapes = sorted(tuple(s["exp_avg"].shape) for s in state["opt"]["state"].values())
    assert opt_shapes == hn_shapes and state["step"] == 150
    # the plan prunes the model to the achieved count
    cost = width.WidthCost.of(adapter_for(model))
    surgery.apply(adapter_for(model), plan)
    assert count_params(adapter_for(model))["params/total"] == cost.count(info["kept_widths"], False)


def test_final_masks_are_deterministic_and_keep_one_index() -> None:
    cost = width.WidthCost.of(adapter_for(_small_vocab()))
    widths = [w for ws in cost.widths for w in ws]
    hn = HyperNetwork(widths)
    for mode in ("budget", "threshold", "sample"):
        method = Disp(**FAST, final_mask=mode, ratio_params="linear")
        first, _ = method.final_masks(hn, cost, 0.5)
        second, _ = method.final_masks(hn, cost, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    with torch.no_grad():
        for head in hn.heads:
            head.weight.fill_(-1.0)  # every logit far below -offset: every gate closed
    masks, tau = Disp(**FAST, final_mask="threshold").final_masks(hn, cost, 0.5)
    assert tau == 0.0 and [int(m.sum()) for m in masks] == [1] * len(widths)


def test_checkpoint_resumes_exactly(tmp_path) -> None:
    calib = _calib(512)

    def run(steps: int, folder: Path) -> PrunePlan:
        method = Disp(**FAST | {"checkpoint": True, "checkpoint_dir": str(folder)}, steps=steps,
                      ratio_params="linear")
        return method.prune(adapter_for(_small_vocab()), calib, 0.3)

    whole = run(30, tmp_path / "a")
    run(10, tmp_path / "b")
    resumed = run(30, tmp_path / "b")  # continues the 10-step checkpoint
    assert resumed.info["resumed_from_step"] == 10 and resumed.keep_dims == whole.keep_dims
    assert resumed.info["curves"] == whole.info["curves"]
    again = run(30, tmp_path / "b")  # finished: nothing left to train
    assert again.info["resumed_from_step"] == 30 and again.keep_dims == whole.keep_dims


def test_config_defaults_presets_and_errors() -> None:
    method = instantiate(compose_config("model=llama2_7b", "method=disp").method)  # no preset: paper values
    assert isinstance(method, Disp) and method.ratio_unit == "params"
    got = (method.lam, method.binarizer, method.offset, method.tau, method.steps, method.seqlen, method.lr,
           method.weight_decay, method.ratio_params)
    assert got == (6.0, "reinmax", 3.0, 1.0, 10000, 2048, 1e-3, 0.05, "all")
    cpu = compose_config("model=smollm2_135m", "method=disp").method
    assert (cpu.steps, cpu.seqlen, cpu.nsamples) == (500, 128, None)  # the CPU preset (issue 32: trains 20%)
    model = _dense("llama")
    with pytest.raises(PruneError, match="unreachable"):  # tiny: the embeddings are ~98% of the parameters
        Disp(**FAST).prune(adapter_for(model), _calib(100), 0.3)
    with pytest.raises(PruneError, match="calibration"):
        Disp(**FAST).prune(adapter_for(model), None, 0.3)
    with pytest.raises(PruneError, match="binarizer"):
        Disp(binarizer="hard")
    assert Disp(**FAST).prune(adapter_for(model), _calib(100), 0.0).is_empty()


def test_cli_end_to_end_saves_a_reloadable_model(tmp_path) -> None:
    cell = tmp_path / "cell"
    out = run_cli("debug=tiny", "method=disp", "ratio=0.3", "method.ratio_params=linear", "method.steps=5",
                  "method.seqlen=32", "method.checkpoint=false", "save=true", f"hydra.run.dir={cell}",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((cell / "results.json").read_text())
    plan = record["plan"]
    assert plan["method"] == "disp" and plan["keep_dims"]
    assert abs(plan["info"]["achieved"]["linear"] - 0.3) < 0.02
    # 5 steps cannot train the gates to 30%: the budget threshold meets the ratio, and the run says so
    assert plan["info"]["reached_target"] is False
    assert "training has not reached the ratio" in out.stdout + out.stderr
    assert record["metrics"]["params/removed_frac"] == pytest.approx(plan["info"]["achieved"]["all"])
    reloaded = AutoModelForCausalLM.from_pretrained(cell / "model")
    assert type(reloaded).__name__ == "LlamaDispForCausalLM"
    assert Path(cell / "prune_plan.json").is_file()
