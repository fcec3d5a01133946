"""Dimension-independent width pruning (DISP-LLM): five index sets per decoder layer, as gates and for real.

Every layer has five structures over the full widths (S1..S5 in the paper, site names here):

- ``attn_in`` (S1, width d): which features of the *normalised* input feed q/k/v.
- ``attn_out`` (S2, width d): which rows of the attention output projection reach the residual.
- ``mlp_in`` (S3, width d): which features of the normalised MLP input feed the MLP input projections.
- ``mlp_mid`` (S4, width d_ff): the intermediate, shared by gate and up (or fc1); the input of down (fc2).
- ``mlp_out`` (S5, width d): which rows of the MLP output projection reach the residual.

One more site, ``attn_heads`` (`HEAD_SITE`, kept out of `SITES`, which is DISP's hypernetwork order), removes
whole attention heads: its indices are the kept *KV groups* of the layer (under MHA a group is one head; under
GQA one KV head with the query heads that read it, so GQA stays valid). It slices the q/k/v output rows (and
biases), the o_proj / out_proj / dense input columns and the attention module's head count; head_dim and the
per-head norms (Qwen3 q_norm / k_norm, Phi's optional q/k LayerNorm: one vector over head_dim shared by every
head) are untouched, so RoPE (Phi's partial rotary included) is unchanged. With ``mlp_mid`` it is exactly the
structure LLM-Pruner, FLAP and Wanda-sp remove. DISP never sets it. A layer must keep at least one group
(removing a whole attention block is `prune.models.blocks`' job, which keep_dims cannot combine with).

head_dim, embeddings, norms and the LM head are untouched.

Per family (`Layout`): LLaMA / Mistral / Qwen2 / Qwen3 and OPT (pre-LN) are sequential: S1 sits on the
output of the attention norm (it only feeds q/k/v), S3 on the MLP norm's output. Phi-2 runs attention and MLP
in parallel off one norm, so S1 sits on the *inputs* of q/k/v and S3 on the input of fc1 (two index sets read
the same normalised tensor). S2 is on o_proj / out_proj / dense, S4 on the input of down_proj / fc2, S5 on
the output of down_proj / fc2.

`gated` applies masks with forward (pre-)hooks: training, and the reference for the physical model.
`prune_widths` slices the weights and substitutes small modules so HF's own layer ``forward`` runs unchanged
and computes exactly what the hard-masked model computes:

- sequential S1 / S3: the norm becomes `SelectNorm` (norm at full width, then one ``index_select``) and
  q/k/v (gate/up, fc1) keep only those input columns: one gather per block instead of one per projection.
- Phi S1 / S3: q/k/v and fc1 become `IndexSelectLinear` (gather, then the column-sliced Linear).
- S2 / S5: o_proj and down_proj become `IndexAddLinear` (row-sliced Linear whose output is written into a
  full-width zero tensor at the kept rows); HF's ``residual + out`` then equals DISP's
  ``residual.index_add(-1, idx, out)``. It costs one full-width write more than the official fused
  ``index_add`` into the residual, which needs the residual and so a forked layer forward.
- S4: plain width pruning (gate/up output rows, down input columns): no gather at all.
- a structure that keeps every index is not wrapped, so it costs nothing.

The model then becomes the ``<family>_disp`` type declared here (`DISP`, see `prune.models.export`), whose
config records ``disp_keep_dims`` (``{layer: {site: [kept indices]}}``, fully kept sites omitted) and which
``AutoModelForCausalLM.from_pretrained`` rebuilds after ``import prune`` (no ``trust_remote_code``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prune.errors import PruneError
from prune.models import export
from prune.models.adapter import ModelAdapter, module_at, replace_module
from prune.models.families import Layout

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")  # S1..S5, the hypernetwork's order
HEAD_SITE = "attn_heads"  # kept KV groups (whole heads); not a DISP structure, so not in SITES
# {layer index (str, JSON-safe): {site: sorted kept indices}}; absent layers / sites keep everything.
KeepDims = dict[str, dict[str, list[int]]]
Masks = dict[int, dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------------
# Sizes and the parameter count T(s)
# ----------------------------------------------------------------------------------------------------------


def _check_pre_norm(adapter: ModelAdapter) -> None:
    """Every family in `LAYOUTS` supports width pruning, but only with pre-norm layers."""
    if getattr(adapter.model.config, "do_layer_norm_before", True) is False:
        raise PruneError("width pruning needs pre-norm layers (this OPT config is post-LN, like opt-350m)")


@dataclass(frozen=True)
class HeadGeometry:
    """One layer's attention heads: ``groups`` KV groups of ``per_group`` query heads, ``head_dim`` wide.

    Query head ``j`` reads KV head ``j // per_group`` (HF's ``repeat_kv``), so group ``g`` owns query heads
    ``g*per_group .. (g+1)*per_group - 1``; under MHA ``per_group`` is 1.
    """

    groups: int
    per_group: int
    head_dim: int

    @classmethod
    def of(cls, adapter: ModelAdapter, i: int) -> HeadGeometry:
        head_dim = adapter.attn(i).head_dim
        q, k, _v = adapter.attn_in(i)
        return cls(k.out_features // head_dim, q.out_features // k.out_features, head_dim)

    def query_heads(self, groups: torch.Tensor) -> torch.Tensor:
        """The query heads of the given KV groups, in order."""
        offsets = torch.arange(self.per_group, device=groups.device)
        return (groups[:, None] * self.per_group + offsets).flatten()

    def rows(self, heads: torch.Tensor) -> torch.Tensor:
        """The feature indices (q/k/v output rows, o input columns) of the given heads."""
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim, device=heads.device)).flatten()


def _variable(sizes: Sequence[Sequence[Any]], coef: list[tuple[int, int, int]],
              bias: list[tuple[int, int, int]] | None) -> Any:
    """The width-dependent parameters: linear weights, plus the shrinking biases unless `bias` is None."""
    total: Any = 0
    for i, ((n1, n2, n3, n4, n5), (qkv, o_in, m)) in enumerate(zip(sizes, coef)):
        total = total + n1 * qkv + n2 * o_in + m * n3 * n4 + n4 * n5
        if bias is not None:
            b2, b4, b5 = bias[i]
            total = total + b2 * n2 + b4 * n4 + b5 * n5
    return total


@dataclass(frozen=True)
class WidthCost:
    """Parameter count as a function of the five kept widths of every layer (DISP's T(s)).

    Per layer, the linear weights are n1·(q+k+v outputs) + n2·(o inputs) + m·n3·n4 + n4·n5 (m = 2 for
    gate+up, 1 for fc1), as in the official code's count; biases that shrink with a width add n2, n4 (per
    MLP input projection with bias) and n5. Everything no width touches (embeddings, LM head, norms, q/k/v
    biases) is ``fixed``.

    The attention-head site (`HEAD_SITE`) scales the q/k/v and o terms by the kept fraction of KV groups and
    removes the dropped groups' q/k/v biases from ``fixed``: ``count(..., heads=...)``. DISP never passes it.

    Attributes:
        widths: per layer, the dense width of each site (SITES order).
        coef: per layer (q+k+v outputs, o inputs, number of MLP input projections).
        bias: per layer, how many bias entries one kept index of (S2, S4, S5) carries.
        linear_total: T_total of the official script: all q/k/v/o/MLP weights of the dense model.
        total: every parameter of the dense model.
        fixed: the parameters no width changes.
        heads: per layer, the dense number of KV groups (the width of `HEAD_SITE`).
        head_coef: per layer and per KV group: (q+k+v output rows, o input columns, q+k+v bias entries).
    """

    widths: list[list[int]]
    coef: list[tuple[int, int, int]]
    bias: list[tuple[int, int, int]]
    linear_total: int
    total: int
    fixed: int
    heads: list[int] = field(default_factory=list)
    head_coef: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, adapter: ModelAdapter) -> WidthCost:
        """The cost model of the adapter's (dense) model."""
        from prune.eval.params import count_params

        _check_pre_norm(adapter)
        widths, coef, bias, heads, head_coef = [], [], [], [], []
        for i in range(adapter.num_layers()):
            geometry = HeadGeometry.of(adapter, i)
            qkv_bias = sum(p.out_features for p in adapter.attn_in(i) if p.bias is not None)
            heads.append(geometry.groups)
            qkv, o, mlp_in = adapter.attn_in(i), adapter.attn_out(i), adapter.mlp_in(i)
            down = adapter.mlp_out(i)
            d = qkv[0].in_features
            widths.append([d, o.out_features, d, down.in_features, down.out_features])
            coef.append((sum(p.out_features for p in qkv), o.in_features, len(mlp_in)))
            bias.append((int(o.bias is not None), sum(p.bias is not None for p in mlp_in),
                         int(down.bias is not None)))
            g = geometry.groups
            head_coef.append((coef[-1][0] // g, o.in_features // g, qkv_bias // g))
        total = count_params(adapter)["params/total"]
        return cls(widths, coef, bias, linear_total=_variable(widths, coef, None), total=total,
                   fixed=total - _variable(widths, coef, bias), heads=heads, head_coef=head_coef)

    def count(self, sizes: Sequence[Sequence[Any]], linear_only: bool,
              heads: Sequence[Any] | None = None) -> Any:
        """T(s) for kept widths ``sizes[layer][site]`` (ints, or differentiable mask sums).

        `heads` (per layer, kept KV groups) counts pruned attention heads; ``None`` keeps them all.
        """
        coef, fixed = self.coef, self.fixed
        if heads is not None:
            coef = [(qkv * h, o * h, m)
                    for (qkv, o, _b), h, (_q, _o, m) in zip(self.head_coef, heads, self.coef)]
            fixed = fixed - sum(b * (n - h) for (_q, _o, b), n, h in zip(self.head_coef, self.heads, heads))
        if linear_only:
            return _variable(sizes, coef, None)
        return fixed + _variable(sizes, coef, self.bias)

    def dense_total(self, linear_only: bool) -> int:
        return self.linear_total if linear_only else self.total


# ----------------------------------------------------------------------------------------------------------
# Gates (training, and the reference the physical model must equal)
# ----------------------------------------------------------------------------------------------------------


def _scale_output(get: Callable[[], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * get().to(out.dtype)

    return hook


def _scale_input(get: Callable[[], torch.Tensor]) -> Callable[..., tuple]:
    def hook(_m: nn.Module, args: tuple) -> tuple:
        return (args[0] * get().to(args[0].dtype), *args[1:])

    return hook


def _gate_sites(adapter: ModelAdapter, i: int) -> list[tuple[str, nn.Module, str]]:
    """(site, module, "in" | "out"): where each gate multiplies, for layer `i`.

    The head gate multiplies the o projection's input (the heads' outputs side by side), expanded from one
    value per KV group to every feature of the group's query heads: zeroing it equals removing the group.
    """
    if adapter.parallel_blocks:  # one norm feeds both blocks: gate the readers, not the norm
        readers = [("attn_in", m, "in") for m in adapter.attn_in(i)]
        readers += [("mlp_in", m, "in") for m in adapter.mlp_in(i)]
    else:
        readers = [("attn_in", adapter.attn_norm(i), "out"), ("mlp_in", adapter.mlp_norm(i), "out")]
    return readers + [("attn_out", adapter.attn_out(i), "out"), (HEAD_SITE, adapter.attn_out(i), "in"),
                      ("mlp_mid", adapter.mlp_out(i), "in"), ("mlp_out", adapter.mlp_out(i), "out")]


@contextmanager
def gated(adapter: ModelAdapter, masks: Masks, square_mid: bool = False) -> Iterator[None]:
    """Multiply S1..S5 into the forward pass while the context is open.

    Args:
        adapter: the model's adapter.
        masks: ``{layer: {site: Tensor[width]}}``; the sites present when the context opens are gated, and
            their tensors are looked up on every call (the caller may swap them between steps). The
            `HEAD_SITE` mask has one value per KV group.
        square_mid: gate the intermediate with m² where the MLP is gated (gate and up): the official code
            multiplies act(gate(x)) and up(x) by m each, which differs from m only for soft gates.
    """
    _check_pre_norm(adapter)
    handles = []
    for i in range(adapter.num_layers()):
        gated_mlp = len(adapter.mlp_in(i)) > 1
        geometry = HeadGeometry.of(adapter, i)
        for site, module, side in _gate_sites(adapter, i):
            if site not in masks.get(i, {}):
                continue
            repeat = geometry.per_group * geometry.head_dim if site == HEAD_SITE else 1

            def get(i: int = i, site: str = site, sq: bool = square_mid and gated_mlp and site == "mlp_mid",
                    repeat: int = repeat) -> torch.Tensor:
                m = masks[i][site]
                m = m * m if sq else m
                return m.repeat_interleave(repeat) if repeat > 1 else m

            if side == "out":
                handles.append(module.register_forward_hook(_scale_output(get)))
            else:
                handles.append(module.register_forward_pre_hook(_scale_input(get)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------
# Physical pruning
# ----------------------------------------------------------------------------------------------------------


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


class SelectNorm(nn.Module):
    """The norm at full width, then the kept features: ``norm(x)[..., index]`` (sequential S1 / S3)."""

    def __init__(self, norm: nn.Module, index: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).index_select(-1, self.index)


class IndexSelectLinear(nn.Linear):
    """``Linear(x[..., in_index])`` with the kept input columns only (Phi's S1 / S3)."""

    def __init__(self, linear: nn.Linear, index: torch.Tensor) -> None:
        nn.Module.__init__(self)  # no fresh initialisation: the weights come from `linear`
        self.in_features, self.out_features = len(index), linear.out_features
        self.full_in = linear.in_features
        self.weight = _param(linear.weight.index_select(1, index), linear.weight)
        self.bias = linear.bias
        self.register_buffer("in_index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.in_index), self.weight, self.bias)


class IndexAddLinear(nn.Linear):
    """The kept output rows of a Linear, written into zeros of the full width at ``out_index`` (S2 / S5)."""

    def __init__(self, linear: nn.Linear, index: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, len(index)
        self.full_out = linear.out_features
        self.weight = _param(linear.weight.index_select(0, index), linear.weight)
        self.bias = None if linear.bias is None else _param(linear.bias.index_select(0, index), linear.bias)
        self.register_buffer("out_index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        # index_copy into zeros == index_add into zeros (indices are unique); HF adds the residual after.
        return y.new_zeros(*y.shape[:-1], self.full_out).index_copy_(-1, self.out_index, y)


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = _param(linear.weight.index_select(0, index), linear.weight)
    if linear.bias is not None:
        linear.bias = _param(linear.bias.index_select(0, index), linear.bias)
    linear.out_features = len(index)


def _keep_cols(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = _param(linear.weight.index_select(1, index), linear.weight)
    linear.in_features = len(index)


def _keep_heads(layer: nn.Module, layout: Layout, groups: torch.Tensor) -> None:
    """`HEAD_SITE`: keep the KV groups `groups` (q/k/v output rows, o input columns, the module's head count).

    HF's attention reshapes with ``-1`` heads (OPT with its ``num_heads``, updated here), and
    ``num_key_value_groups`` (query heads per KV head) is unchanged by removing whole groups.
    """
    attn = module_at(layer, layout.attn)
    q, k, v = (module_at(layer, p) for p in layout.attn_in)
    geometry = HeadGeometry(k.out_features // attn.head_dim, q.out_features // k.out_features, attn.head_dim)
    query_heads = geometry.query_heads(groups)
    q_rows, kv_rows = geometry.rows(query_heads), geometry.rows(groups)
    _keep_rows(q, q_rows)
    _keep_rows(k, kv_rows)
    _keep_rows(v, kv_rows.clone())
    _keep_cols(module_at(layer, layout.attn_out), q_rows)
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(query_heads)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(groups)


def _select_inputs(layer: nn.Module, layout: Layout, norm_path: str, readers: list[str],
                   index: torch.Tensor) -> None:
    """S1 / S3: the readers of one normalised tensor see only the kept features."""
    if layout.parallel_blocks:
        for path in readers:  # one buffer each: safetensors refuses shared tensors
            replace_module(layer, path, IndexSelectLinear(module_at(layer, path), index.clone()))
        return
    for path in readers:
        _keep_cols(module_at(layer, path), index)
    replace_module(layer, norm_path, SelectNorm(module_at(layer, norm_path), index))


def _write_rows(layer: nn.Module, path: str, index: torch.Tensor) -> None:
    """S2 / S5: the projection at `path` computes the kept rows only, written into full-width zeros."""
    replace_module(layer, path, IndexAddLinear(module_at(layer, path), index))


def _prune_layer(layer: nn.Module, layout: Layout, keep: dict[str, list[int]]) -> None:
    device = module_at(layer, layout.attn_out).weight.device
    idx = {site: torch.tensor(v, dtype=torch.long, device=device) for site, v in keep.items()}
    if HEAD_SITE in idx:  # first: attn_in / attn_out then slice and wrap the head-sliced projections
        _keep_heads(layer, layout, idx[HEAD_SITE])
    if "attn_in" in idx:
        _select_inputs(layer, layout, layout.attn_norm, list(layout.attn_in), idx["attn_in"])
    if "attn_out" in idx:
        _write_rows(layer, layout.attn_out, idx["attn_out"])
    if "mlp_mid" in idx:  # before mlp_out: IndexAddLinear copies the column-sliced down projection
        for path in layout.mlp_in:
            _keep_rows(module_at(layer, path), idx["mlp_mid"])
        _keep_cols(module_at(layer, layout.mlp_out), idx["mlp_mid"])
    if "mlp_in" in idx:
        _select_inputs(layer, layout, layout.mlp_norm or layout.attn_norm, list(layout.mlp_in), idx["mlp_in"])
    if "mlp_out" in idx:
        _write_rows(layer, layout.mlp_out, idx["mlp_out"])
    layer.disp_keep = {site: list(v) for site, v in keep.items()}  # travels with the layer (drop_layers)


def _site_width(site: str, i: int, widths: list[list[int]], heads: list[int] | None) -> int:
    if site in SITES:
        return widths[i][SITES.index(site)]
    if site == HEAD_SITE and heads is not None:
        return heads[i]
    raise PruneError(f"keep_dims[{i}] names site {site!r}; known sites: {', '.join((*SITES, HEAD_SITE))}")


def normalise_keep(keep_dims: KeepDims, widths: list[list[int]], heads: list[int] | None = None) -> KeepDims:
    """Checked, sorted index sets with fully kept sites (and layers) left out.

    `heads` (per layer, the dense KV groups) admits `HEAD_SITE`; a layer keeping no group is refused.
    """
    out: KeepDims = {}
    for key, sites in keep_dims.items():
        i = int(key)
        if not 0 <= i < len(widths):
            raise PruneError(f"keep_dims names layer {i}; the model has {len(widths)}")
        for site, values in sites.items():
            width = _site_width(site, i, widths, heads)
            kept = sorted({int(v) for v in values})
            if site == HEAD_SITE and not kept:
                raise PruneError(f"keep_dims[{i}][{HEAD_SITE}] keeps no attention head: keep at least one KV "
                                 "group per layer (removing attention blocks is drop_attn, not keep_dims)")
            if not kept or kept[0] < 0 or kept[-1] >= width:
                raise PruneError(f"keep_dims[{i}][{site}] must be a non-empty subset of range({width})")
            if len(kept) < width:
                out.setdefault(str(i), {})[site] = kept
    return out


def apply_widths(model: nn.Module, layout: Layout, keep_dims: KeepDims) -> None:
    """Slice and wrap the modules of `model` for `keep_dims` (already normalised)."""
    layers = module_at(model, layout.layers)
    for key, keep in keep_dims.items():
        _prune_layer(layers[int(key)], layout, keep)


def _recorded(model: nn.Module, layout: Layout) -> KeepDims:
    layers = module_at(model, layout.layers)
    return {str(i): dict(layer.disp_keep) for i, layer in enumerate(layers)
            if getattr(layer, "disp_keep", None)}


def prune_widths(adapter: ModelAdapter, keep_dims: KeepDims) -> None:
    """Remove the unkept dimensions for good and make the model the ``<family>_disp`` type (`DISP`)."""
    _check_pre_norm(adapter)
    model = adapter.model
    if type(model.config) is not adapter.layout.hf_classes()[0]:
        raise PruneError(f"width pruning needs a stock {model.config.model_type} model, "
                         f"not a {type(model.config).__name__}")
    cost = WidthCost.of(adapter)
    keep = normalise_keep(keep_dims, cost.widths, cost.heads)
    apply_widths(model, adapter.layout, keep)
    export.convert(model, DISP, **_record(model, adapter.layout))


# ---- added output biases (surgery kind ``added_biases``: FLAP's and LLM-Pruner's bias compensation) -------
# A linear given a bias its stock config does not create (LLaMA's o_proj) carries this flag; the ``_disp``
# config records those linears (``disp_added_biases``) and the rebuild creates them before the weights load.
ADDED_BIAS_FLAG = "carries_added_bias"


def _create_bias(linear: nn.Linear) -> None:
    weight = linear.weight
    zeros = torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device)
    linear.bias = nn.Parameter(zeros, requires_grad=weight.requires_grad)
    setattr(linear, ADDED_BIAS_FLAG, True)


def add_output_biases(adapter: ModelAdapter, biases: dict[str, torch.Tensor], converting: bool) -> None:
    """Add each vector to the output bias of the named linear (dense-model names), creating the bias where
    the linear has none. `converting`: make the model the ``_disp`` type here (no keep_dims edit follows to do
    it), so that a saved model recreates the biases on reload."""
    model = adapter.model
    for name, vector in biases.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as e:
            raise PruneError(f"the plan adds a bias to {name}, which the model does not have") from e
        if not isinstance(linear, nn.Linear) or vector.shape != (linear.out_features,):
            raise PruneError(f"the plan's added bias of {name} has shape {tuple(vector.shape)}; it needs a "
                             f"vector of the linear's {getattr(linear, 'out_features', '?')} outputs")
        if linear.bias is None:
            _create_bias(linear)
        with torch.no_grad():
            linear.bias.add_(vector.to(linear.bias.device, linear.bias.dtype))
    if converting and biases and type(model.config) is adapter.layout.hf_classes()[0]:
        export.convert(model, DISP, **_record(model, adapter.layout))


def _added_bias_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if getattr(m, ADDED_BIAS_FLAG, False)]


def _rebuild(model: nn.Module, layout: Layout, config: Any) -> None:
    for name in getattr(config, "disp_added_biases", None) or []:  # before the slicing, as at pruning time
        _create_bias(model.get_submodule(name))
    apply_widths(model, layout, config.disp_keep_dims or {})


def _record(model: nn.Module, layout: Layout) -> dict[str, Any]:
    return {"disp_keep_dims": _recorded(model, layout),  # renumbered if layers were dropped since
            "disp_added_biases": _added_bias_names(model) or None}


# ``<family>_disp``: the config records the kept indices of every pruned site and the linears given a bias.
DISP = export.declare(export.Edit(
    suffix="_disp", tag="Disp", fields={"disp_keep_dims": "dict[str, dict[str, list[int]]] | None",
                                        "disp_added_biases": "list[str] | None"},
    rebuild=_rebuild, record=_record, module=__name__,
))
