"""The official FLAP / Wanda-sp selection code against ours: same model, same calibration tokens; prints, per
structure, whether both keep the same heads and channels in every layer, and how far the bias compensations
are.

    git --git-dir=<FLAP mirror> archive HEAD | tar -x -C /tmp/ref_flap     # CASIA-IVA-Lab/FLAP @ 3bb57db
    python experiments/fidelity/flap_side_by_side.py --official /tmp/ref_flap

The model: a random LLaMA (seeded) with what the official code assumes: MHA, head_dim 128 (4 heads, hidden
512, 4 layers, intermediate 1024), float32 on the CPU. Calibration: our WikiText-2 random 128-token windows
(`calib=wikitext2`, bundled rows), handed to the official code in place of its own loader. Ours runs with
``arithmetic=code ratio_params=linear`` (the code's arithmetic and ratio unit).

What this script changes around the official code, and why (its scoring and selection run as released):
- ``get_loaders`` returns our token windows (offline; both sides see the same tokens).
- ``Tensor.cuda`` is the identity (CPU only; the code moves scores to the GPU just to sort them).
- Its decoder-layer calls pass ``attention_mask`` and ``position_ids`` only (transformers 4.28); a pre-hook
  adds the rotary ``position_embeddings`` transformers 5 needs; the attention gets back its ``num_heads``.
- FLAP: ``compress`` is replaced by a recorder of its masks and mean inputs (its bias arithmetic multiplies
  the fp16 means by the fp32 weights, which fails); the bias it would write, (mean · ~mask) @ Wᵀ, is computed
  here from what it passed. Wanda-sp: ``compress`` runs as released (real pruning, needed for the next layer's
  inputs), after recording its masks.
Exit status 1 when any structure keeps other heads or channels.
"""

from __future__ import annotations

import argparse
import copy
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CASES = [  # (metric, structure, remove_heads, ratio)
    ("fluctuation", "AL-AM", None, 0.2), ("fluctuation", "AL-AM", None, 0.5),
    ("fluctuation", "UL-UM", None, 0.5), ("fluctuation", "UL-MM", 4, 0.3), ("fluctuation", "AL-MM", 5, 0.3),
    ("wanda_sp", "UL-UM", None, 0.5),
]


def tiny_mha_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50257, hidden_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def ours(model: torch.nn.Module, calib, metric: str, structure: str, heads: int | None, ratio: float):
    from prune.methods.flap import Flap
    from prune.models.adapter import adapter_for

    method = Flap(metric=metric, structure=structure, remove_heads=heads, arithmetic="code",
                  ratio_params="linear", seqlen=None, batch_size=16)
    plan = method.prune(adapter_for(model), calib, ratio)
    masks = []
    for i in range(len(model.model.layers)):
        keep = plan.keep_dims.get(str(i), {})
        a = torch.zeros(4, dtype=torch.bool)
        a[keep.get("attn_heads", list(range(4)))] = True
        m = torch.zeros(1024, dtype=torch.bool)
        m[keep.get("mlp_mid", list(range(1024)))] = True
        masks.append((a, m))
    return masks, plan


def official(ref, model: torch.nn.Module, ids: torch.Tensor, metric: str, structure: str, heads: int | None,
             ratio: float):
    model = copy.deepcopy(model)
    model.seqlen = ids.shape[1]
    rotary = model.model.rotary_emb

    def add_rope(_m, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(hidden.shape[1])[None]
            kwargs["position_embeddings"] = rotary(hidden, position_ids)
        return args, kwargs

    for layer in model.model.layers:
        layer.register_forward_pre_hook(add_rope, with_kwargs=True)
        layer.self_attn.num_heads = model.config.num_attention_heads  # a transformers 4.28 attribute
    loader = [(ids[j : j + 1], None) for j in range(len(ids))]
    ref.get_loaders = lambda *a, **k: (loader, None)
    recorded: dict[int, dict] = {}
    released = ref.compress

    def record(layer, attn_mask, mlp_mask, attn_mean, mlp_mean, device, bias=True, unstr=False):
        i = next(k for k, lay in enumerate(model.model.layers) if lay is layer)
        entry = recorded.setdefault(i, {})
        if attn_mask is not None:
            entry["attn"], entry["attn_mean"] = attn_mask.clone(), attn_mean
            entry["o_weight"] = layer.self_attn.o_proj.weight.data.clone()
        if mlp_mask is not None:
            entry["mlp"], entry["mlp_mean"] = mlp_mask.clone(), mlp_mean
            entry["down_weight"] = layer.mlp.down_proj.weight.data.clone()
        if metric == "wanda_sp":
            released(layer, attn_mask, mlp_mask, attn_mean, mlp_mean, device, bias=bias, unstr=unstr)

    ref.compress = record
    args = types.SimpleNamespace(metrics="WIFV", structure=structure, pruning_ratio=ratio,
                                 remove_heads=-1 if heads is None else heads, nsamples=len(ids), seed=0,
                                 unstr=False)
    with torch.no_grad():
        if metric == "wanda_sp":
            ref.prune_wanda_sp(args, model, None, torch.device("cpu"))
        else:
            ref.prune_flap(args, model, None, torch.device("cpu"))
    ref.compress = released
    return recorded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of CASIA-IVA-Lab/FLAP (3bb57db)")
    parser.add_argument("--nsamples", type=int, default=128, help="128-token calibration windows")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU only (see the module docstring)
    sys.path.insert(0, cli.official)
    import lib.prune as ref  # the official module

    from prune.data.calibration import build_calibration
    from prune.models.load import load_tokenizer

    tokenizer = load_tokenizer("bundled:gpt2")  # the tiny test models' tokenizer
    calib = build_calibration(tokenizer, dataset="wikitext2", split="train", nsamples=cli.nsamples,
                              seqlen=128, seed=cli.seed, source="bundled")
    model = tiny_mha_llama(cli.seed)
    failures = 0
    for metric, structure, heads, ratio in CASES:
        mine, plan = ours(copy.deepcopy(model), calib, metric, structure, heads, ratio)
        theirs = official(ref, model, calib.input_ids, metric, structure, heads, ratio)
        same_heads = all(torch.equal(mine[i][0], theirs[i]["attn"].cpu()) for i in range(4))
        same_channels = all(torch.equal(mine[i][1], theirs[i]["mlp"].cpu()) for i in range(4))
        bias_gap = 0.0
        for i in range(4):
            for site, path, w in (("attn", "self_attn.o_proj", "o_weight"),
                                  ("mlp", "mlp.down_proj", "down_weight")):
                name = f"added_biases/model.layers.{i}.{path}"
                if theirs[i].get(f"{site}_mean") is None or name not in plan.tensors:
                    continue
                mask = theirs[i][site].repeat_interleave(128) if site == "attn" else theirs[i][site]
                expected = (theirs[i][f"{site}_mean"].float() * ~mask) @ theirs[i][w].T
                bias_gap = max(bias_gap, float((plan.tensors[name] - expected).abs().max()
                                                / expected.abs().max().clamp_min(1e-12)))
        kept = [(int(mine[i][0].sum()), int(mine[i][1].sum())) for i in range(4)]
        print(f"{metric:11s} {structure} heads={heads} ratio={ratio}: same heads {same_heads}, same channels "
              f"{same_channels}; kept (heads, channels) per layer {kept}; bias max rel. gap {bias_gap:.2e}")
        failures += not (same_heads and same_channels)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
