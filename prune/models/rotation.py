"""SliceGPT's structural edit: fold the norms, rotate the residual stream, slice it, add shortcut matrices.

SliceGPT (Ashkboos et al., ICLR 2024; official code microsoft/TransformerCompression ``src/slicegpt``) writes
every weight that reads or writes the residual stream in a new orthonormal basis per *site* (the residual
that one norm reads) and deletes the trailing basis vectors. A site is named by the dense module name of the
norm that reads it (``model.layers.3.input_layernorm``, ``model.layers.3.post_attention_layernorm``, ...,
the final norm ``model.norm``); the plan carries ``Q[:, :width]`` per site (``rotations/<norm name>``).

The edit, in order (`rotate_and_slice`):

1. `fold_model`: LM head untied from the embeddings (the official code clones it too: folding the final
   norm into the head makes it another matrix); LayerNorm families (OPT, Phi) get zero-mean residuals
   (means subtracted from the embeddings, and from every projection writing into the residual), so that
   their LayerNorm equals an RMS norm; every norm's scale (and bias) is folded into the linears reading it;
   the norms become `FoldedRMSNorm` (no parameters; divides by the *dense* width, as the official RMSN).
2. `rotate_in` / `rotate_out`: readers ``W @ Q_site``, writers ``Q_site^T W`` (in float64, cast back).
3. Shortcuts (`ResidualShortcuts`): the residual of a block moves from the basis of its entry site to that of
   its exit site by ``Q_in^T Q_out`` (``w_in x w_out``, a real parameter, saved and counted).

HF's own decoder-layer ``forward`` runs unchanged; its residual additions are steered with hooks that the
layer's `ResidualShortcuts` child owns (its bound methods, so a deep copy of the model stays consistent):

- attention half (and Phi's single parallel block): a pre-hook on the layer keeps ``x`` and hands the layer
  ``x @ S_attn`` instead, so HF's ``residual + attn`` is ``x S_attn + attn`` exactly; a pre-hook on the
  attention norm hands it the kept ``x`` back.
- MLP half (sequential families): HF adds its residual to the MLP output, which cannot change basis (and
  width, in the last layer) in between. A pre-hook on the MLP norm keeps ``x1``, a hook on the MLP output
  projection keeps ``m`` and hands HF a scalar zero, and a hook on the layer's output returns
  ``x1 @ S_mlp + m`` (the official layer's expression; HF's ``x1 + 0`` is discarded). With no MLP shortcut
  (calibration, before the MLP is rotated) the output is ``x1 + m``.

The model then becomes ``<family>_sliced`` (`SLICED`): its config keeps the dense ``hidden_size`` (attention
head sizes derive from it) and records ``slicegpt_widths`` and the linears the fold gave a bias;
``AutoModelForCausalLM.from_pretrained`` rebuilds the shapes, norms and hooks after ``import prune``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prune.errors import PruneError
from prune.models import export
from prune.models.adapter import ModelAdapter, adapter_for, module_at, replace_module
from prune.models.families import Layout

# ----------------------------------------------------------------------------------------------------------
# Sites and checks
# ----------------------------------------------------------------------------------------------------------


def site_names(adapter: ModelAdapter) -> list[str]:
    """The residual sites in the order the hidden state meets them: per layer the attention norm (and the
    MLP norm of sequential families), then the final norm. Dense-model module names."""
    layout, names = adapter.layout, []
    for i in range(adapter.num_layers()):
        names.append(f"{layout.layers}.{i}.{layout.attn_norm}")
        if not layout.parallel_blocks:
            names.append(f"{layout.layers}.{i}.{layout.mlp_norm}")
    return [*names, layout.final_norm]


def check_model(adapter: ModelAdapter) -> None:
    """SliceGPT needs a stock, pre-norm model whose embeddings have the residual's width."""
    config = adapter.model.config
    stock = adapter.layout.hf_classes()[0]
    if type(config) is not stock:
        raise PruneError(f"slicegpt needs a stock {config.model_type} model, not a {type(config).__name__} "
                         "(apply it before any other structural edit)")
    if getattr(config, "do_layer_norm_before", True) is False:
        raise PruneError("slicegpt needs pre-norm layers (this OPT config is post-LN, like opt-350m)")
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise PruneError("slicegpt needs word_embed_proj_dim == hidden_size (OPT-350m projects; unsupported)")


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class FoldedRMSNorm(nn.Module):
    """``x / sqrt(sum(x^2) / full_width + eps)``: a norm whose scale lives in the readers' weights.

    The sum runs over the (possibly sliced) features but is divided by the *dense* width, as the official
    RMSN does: the deleted directions count as zeros. Half precision is normalised in float32.
    """

    def __init__(self, full_width: int, eps: float) -> None:
        super().__init__()
        self.full_width, self.eps = int(full_width), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.full_width + self.eps)
        return h.to(dtype)

    def extra_repr(self) -> str:
        return f"full_width={self.full_width}, eps={self.eps}"


class ResidualShortcuts(nn.Module):
    """A decoder layer's shortcut matrices and the hooks that put them on HF's residual additions.

    Attributes:
        attn: ``w_in x w_mid`` (sequential) or ``w_in x w_out`` (parallel blocks).
        mlp: ``w_mid x w_out``; ``None`` for parallel blocks, or while calibrating before the MLP rotates.
    """

    def __init__(self, attn: torch.Tensor, mlp: torch.Tensor | None) -> None:
        super().__init__()
        self.attn = nn.Parameter(attn, requires_grad=False)
        self.mlp = None if mlp is None else nn.Parameter(mlp, requires_grad=False)
        self._x: torch.Tensor | None = None
        self._x1: torch.Tensor | None = None
        self._m: torch.Tensor | None = None
        self._handles: list[Any] = []

    # The hooks (bound methods: a deepcopy of the model copies them with this module).

    def enter_layer(self, _layer: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x = ModelAdapter.layer_input(args, kwargs)
        self._x = x
        shortcut = x @ self.attn.to(x.dtype)
        if args:
            return (shortcut, *args[1:]), kwargs
        return args, kwargs | {"hidden_states": shortcut}

    def norm_input(self, _norm: nn.Module, args: tuple) -> tuple:
        return (self._x, *args[1:])

    def keep_mlp_input(self, _norm: nn.Module, args: tuple) -> None:
        self._x1 = args[0]

    def keep_mlp_output(self, _proj: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        self._m = out
        return out.new_zeros(())  # HF adds it to its residual; `leave_layer` computes the real sum

    def leave_layer(self, _layer: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> Any:
        x, x1, m = self._x, self._x1, self._m
        self._x = self._x1 = self._m = None
        assert x is not None and x1 is not None and m is not None
        h = x1 + m if self.mlp is None else x1 @ self.mlp.to(x1.dtype) + m
        return ModelAdapter.with_hidden(out, h.reshape(*x.shape[:-1], h.shape[-1]))

    def leave_parallel_layer(self, _layer: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> Any:
        self._x = None
        return out

    def attach(self, layer: nn.Module, layout: Layout) -> None:
        """Register the hooks on `layer` (once; the layer owns this module as ``slicegpt_shortcuts``)."""
        self.detach()
        h = self._handles
        h.append(layer.register_forward_pre_hook(self.enter_layer, with_kwargs=True))
        h.append(module_at(layer, layout.attn_norm).register_forward_pre_hook(self.norm_input))
        if layout.parallel_blocks:
            h.append(layer.register_forward_hook(self.leave_parallel_layer, with_kwargs=True))
            return
        h.append(module_at(layer, layout.mlp_norm).register_forward_pre_hook(self.keep_mlp_input))
        h.append(module_at(layer, layout.mlp_out).register_forward_hook(self.keep_mlp_output))
        h.append(layer.register_forward_hook(self.leave_layer, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __deepcopy__(self, memo: dict) -> ResidualShortcuts:
        # The copy's hooks are registered by the copied layer's dict entries (bound to the copy); the
        # handles of the original must not travel (they would remove the original's hooks).
        new = ResidualShortcuts.__new__(ResidualShortcuts)
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k != "_handles"}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._handles = []
        return new


SHORTCUTS = "slicegpt_shortcuts"  # the attribute of a decoder layer holding its `ResidualShortcuts`


def shortcuts_of(layer: nn.Module) -> ResidualShortcuts | None:
    return getattr(layer, SHORTCUTS, None)


def set_shortcuts(layer: nn.Module, layout: Layout, attn: torch.Tensor, mlp: torch.Tensor | None) -> None:
    """Give `layer` these shortcut matrices (installing the hooks on first use)."""
    current = shortcuts_of(layer)
    if current is None:
        current = ResidualShortcuts(attn, mlp)
        setattr(layer, SHORTCUTS, current)
        current.attach(layer, layout)
        return
    current.attn = nn.Parameter(attn, requires_grad=False)
    current.mlp = None if mlp is None else nn.Parameter(mlp, requires_grad=False)


# ----------------------------------------------------------------------------------------------------------
# Folding
# ----------------------------------------------------------------------------------------------------------


def _set_weight(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad))


def norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    raise PruneError(f"cannot read the epsilon of {type(norm).__name__}")


def _is_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm)


def fold_norm(norm: nn.Module, readers: Sequence[nn.Linear]) -> None:
    """Fold the norm's scale (and LayerNorm bias) into the linears that read it (official fuse_ln_linear)."""
    scale = norm.weight.detach().double()
    bias = getattr(norm, "bias", None)
    for linear in readers:
        w = linear.weight.detach().double()
        _set_weight(linear, w * scale)
        if bias is not None:
            shift = w @ bias.detach().double()
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device), requires_grad=False)
                linear.slicegpt_added_bias = True
            _set_weight(linear, linear.bias.detach().double() + shift, "bias")


def subtract_output_mean(linear: nn.Linear) -> None:
    """Make a residual writer's output zero-mean over features (official bake_mean_into_linear)."""
    w = linear.weight.detach().double()
    _set_weight(linear, w - w.mean(dim=0, keepdim=True))
    if linear.bias is not None:
        b = linear.bias.detach().double()
        _set_weight(linear, b - b.mean(), "bias")


def fold_layer(layer: nn.Module, layout: Layout) -> None:
    """Fold one decoder layer's norms into its readers and replace them with `FoldedRMSNorm` (in place)."""
    attn_norm = module_at(layer, layout.attn_norm)
    layer_norm = _is_layer_norm(attn_norm)
    width = attn_norm.weight.shape[0]
    attn_readers = [module_at(layer, p) for p in layout.attn_in]
    mlp_readers = [module_at(layer, p) for p in layout.mlp_in]
    if layout.parallel_blocks:
        fold_norm(attn_norm, attn_readers + mlp_readers)
    else:
        fold_norm(attn_norm, attn_readers)
        mlp_norm = module_at(layer, layout.mlp_norm)
        fold_norm(mlp_norm, mlp_readers)
        replace_module(layer, layout.mlp_norm, FoldedRMSNorm(width, norm_eps(mlp_norm)))
    replace_module(layer, layout.attn_norm, FoldedRMSNorm(width, norm_eps(attn_norm)))
    if layer_norm:
        subtract_output_mean(module_at(layer, layout.attn_out))
        subtract_output_mean(module_at(layer, layout.mlp_out))


def untie_head(adapter: ModelAdapter) -> bool:
    """Give the LM head its own weight (tied to the embedding in e.g. SmolLM2); True if it was tied."""
    head, embed = adapter.lm_head(), adapter.embeddings()[0]
    tied = head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    adapter.model.config.tie_word_embeddings = False
    return tied


def centers_embeddings(adapter: ModelAdapter, center_embeddings: str) -> bool:
    """Whether the fold subtracts each embedding row's mean: LayerNorm families always need it (zero-mean
    residual); ``center_embeddings="always"`` does it for RMSNorm families too, as the official code does."""
    return center_embeddings == "always" or _is_layer_norm(adapter.final_norm())


def fold_model(adapter: ModelAdapter, center_embeddings: str = "layernorm") -> None:
    """Step 1 of the edit (official layernorm_fusion.fuse_modules), in place. The function is unchanged,
    except with ``center_embeddings="always"`` on an RMSNorm family (see `centers_embeddings`)."""
    layout = adapter.layout
    untie_head(adapter)
    final = adapter.final_norm()
    if centers_embeddings(adapter, center_embeddings):
        for embedding in adapter.embeddings():
            w = embedding.weight.detach().double()
            _set_weight(embedding, w - w.mean(dim=-1, keepdim=True))
    for layer in adapter.layers():
        fold_layer(layer, layout)
    fold_norm(final, [adapter.lm_head()])
    replace_module(adapter.model, layout.final_norm, FoldedRMSNorm(final.weight.shape[0], norm_eps(final)))


# ----------------------------------------------------------------------------------------------------------
# Rotating and slicing
# ----------------------------------------------------------------------------------------------------------


def rotate_in(modules: Iterable[nn.Module], q: torch.Tensor) -> None:
    """Readers of a site: ``W @ Q`` (Linear: input columns; Embedding: its feature columns)."""
    for module in modules:
        w = module.weight.detach().double()
        _set_weight(module, w @ q.to(w.device, torch.float64))
        if isinstance(module, nn.Linear):
            module.in_features = q.shape[1]
        else:
            module.embedding_dim = q.shape[1]


def rotate_out(modules: Iterable[nn.Linear], q: torch.Tensor) -> None:
    """Writers into a site: ``Q^T W`` and ``Q^T b``."""
    for linear in modules:
        qd = q.to(linear.weight.device, torch.float64)
        _set_weight(linear, qd.T @ linear.weight.detach().double())
        if linear.bias is not None:
            _set_weight(linear, qd.T @ linear.bias.detach().double(), "bias")
        linear.out_features = q.shape[1]


def shortcut(q_from: torch.Tensor, q_to: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``Q_from^T Q_to`` (float64, then the model's dtype): the residual from one site's basis to the next."""
    m = q_from.double().T @ q_to.to(q_from.device, torch.float64)
    return m.to(like.device, like.dtype)


def rotate_layer(adapter: ModelAdapter, i: int, q: dict[str, torch.Tensor]) -> None:
    """Rotate and slice layer `i` with the rotations of its sites (``q`` keyed like `site_names`)."""
    layout, layer = adapter.layout, adapter.layer(i)
    base = f"{layout.layers}.{i}."
    names = site_names(adapter)
    q_in = q[base + layout.attn_norm]
    q_next = q[names[names.index(base + layout.attn_norm) + (1 if layout.parallel_blocks else 2)]]
    like = adapter.attn_out(i).weight
    rotate_in(adapter.attn_in(i), q_in)
    if layout.parallel_blocks:
        rotate_in(adapter.mlp_in(i), q_in)
        rotate_out([adapter.attn_out(i), adapter.mlp_out(i)], q_next)
        set_shortcuts(layer, layout, shortcut(q_in, q_next, like), None)
        return
    q_mid = q[base + layout.mlp_norm]
    rotate_out([adapter.attn_out(i)], q_mid)
    rotate_in(adapter.mlp_in(i), q_mid)
    rotate_out([adapter.mlp_out(i)], q_next)
    set_shortcuts(layer, layout, shortcut(q_in, q_mid, like), shortcut(q_mid, q_next, like))


def check_rotations(adapter: ModelAdapter, rotations: dict[str, torch.Tensor]) -> None:
    names, d = site_names(adapter), adapter.model.config.hidden_size
    if set(rotations) != set(names):
        missing, extra = sorted(set(names) - set(rotations)), sorted(set(rotations) - set(names))
        raise PruneError(f"the plan's rotations must name every residual site of this model; missing "
                         f"{missing[:3]}, unknown {extra[:3]} (a plan of another model?)")
    for name, q in rotations.items():
        if q.dim() != 2 or q.shape[0] != d or not 0 < q.shape[1] <= d:
            raise PruneError(f"rotation {name} is {tuple(q.shape)}; it must be hidden_size x width "
                             f"({d} x 1..{d})")


CENTER_EMBEDDINGS = ("layernorm", "always")


def rotate_and_slice(adapter: ModelAdapter, rotations: dict[str, torch.Tensor],
                     center_embeddings: str = "layernorm") -> None:
    """The whole SliceGPT edit on a dense model, in place; the model becomes ``<family>_sliced``.

    ``center_embeddings``: ``layernorm`` (paper: only LayerNorm families need a zero-mean residual) or
    ``always`` (official code: every family's embeddings are centred, which changes an RMSNorm model's
    function slightly).
    """
    check_model(adapter)
    check_rotations(adapter, rotations)
    if center_embeddings not in CENTER_EMBEDDINGS:
        raise PruneError(f"center_embeddings={center_embeddings!r} is not one of "
                         f"{', '.join(CENTER_EMBEDDINGS)}")
    names = site_names(adapter)
    with torch.no_grad():
        fold_model(adapter, center_embeddings)
        rotate_in(adapter.embeddings(), rotations[names[0]])
        for i in range(adapter.num_layers()):
            rotate_layer(adapter, i, rotations)
        rotate_in([adapter.lm_head()], rotations[names[-1]])
    export.convert(adapter.model, SLICED, **_record(adapter.model, adapter.layout))


# ----------------------------------------------------------------------------------------------------------
# The saved type: record and rebuild
# ----------------------------------------------------------------------------------------------------------


def widths_of(model: nn.Module, layout: Layout) -> dict[str, Any]:
    """``{"embedding": w, "layers": [[w_in, w_mid, w_out], ...], "head": w}``, read from the modules."""
    adapter = adapter_for(model)
    layers = [[adapter.attn_in(i)[0].in_features, adapter.attn_out(i).out_features,
               adapter.mlp_out(i).out_features] for i in range(adapter.num_layers())]
    return {"embedding": int(adapter.embeddings()[0].weight.shape[1]), "layers": layers,
            "head": int(adapter.lm_head().in_features)}


def _record(model: nn.Module, layout: Layout) -> dict[str, Any]:
    added = sorted(name for name, m in model.named_modules() if getattr(m, "slicegpt_added_bias", False))
    return {"slicegpt_widths": widths_of(model, layout), "slicegpt_added_biases": added}


def _slice_cols(module: nn.Module, width: int) -> None:
    _set_weight(module, module.weight.detach()[:, :width])
    if isinstance(module, nn.Linear):
        module.in_features = width
    else:
        module.embedding_dim = width


def _slice_rows(linear: nn.Linear, width: int) -> None:
    _set_weight(linear, linear.weight.detach()[:width])
    if linear.bias is not None:
        _set_weight(linear, linear.bias.detach()[:width], "bias")
    linear.out_features = width


def build_structure(model: nn.Module, widths: dict[str, Any], added_biases: Sequence[str]) -> None:
    """The sliced model's modules and shapes on a freshly built stock model (values are loaded after)."""
    adapter = adapter_for(model)
    layout = adapter.layout
    with torch.no_grad():
        untie_head(adapter)
        for name in added_biases:
            linear = model.get_submodule(name)
            linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features), requires_grad=False)
            linear.slicegpt_added_bias = True
        d = model.config.hidden_size
        for i, layer in enumerate(adapter.layers()):
            for path in (layout.attn_norm,) + (() if layout.parallel_blocks else (layout.mlp_norm,)):
                replace_module(layer, path, FoldedRMSNorm(d, norm_eps(module_at(layer, path))))
        final = adapter.final_norm()
        replace_module(model, layout.final_norm, FoldedRMSNorm(d, norm_eps(final)))
        for embedding in adapter.embeddings():
            _slice_cols(embedding, widths["embedding"])
        for i, (w_in, w_mid, w_out) in enumerate(widths["layers"]):
            for linear in adapter.attn_in(i):
                _slice_cols(linear, w_in)
            like = adapter.attn_out(i).weight
            if layout.parallel_blocks:
                for linear in adapter.mlp_in(i):
                    _slice_cols(linear, w_in)
                _slice_rows(adapter.attn_out(i), w_out)
                _slice_rows(adapter.mlp_out(i), w_out)
                set_shortcuts(adapter.layer(i), layout, like.new_zeros(w_in, w_out), None)
                continue
            _slice_rows(adapter.attn_out(i), w_mid)
            for linear in adapter.mlp_in(i):
                _slice_cols(linear, w_mid)
            _slice_rows(adapter.mlp_out(i), w_out)
            set_shortcuts(adapter.layer(i), layout, like.new_zeros(w_in, w_mid), like.new_zeros(w_mid, w_out))
        _slice_cols(adapter.lm_head(), widths["head"])


def _rebuild(model: nn.Module, layout: Layout, config: Any) -> None:
    if config.slicegpt_widths:
        build_structure(model, config.slicegpt_widths, config.slicegpt_added_biases or [])


# ``<family>_sliced``: the config records the residual widths and the biases the fold added.
SLICED = export.declare(export.Edit(
    suffix="_sliced", tag="Sliced",
    fields={"slicegpt_widths": "dict[str, Any] | None", "slicegpt_added_biases": "list[str] | None"},
    rebuild=_rebuild, record=_record, module=__name__,
))


def sliced_param_count(adapter: ModelAdapter, widths: dict[str, Any]) -> int:
    """Parameters of the sliced model (shortcuts and an untied head included), counted on a skeleton built
    on the meta device: the same `build_structure` that reloads it, so the count cannot drift."""
    from prune.eval.params import count_params

    model = adapter.model
    added = added_biases(adapter)
    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    build_structure(skeleton, widths, added)
    return count_params(adapter_for(skeleton))["params/total"]


def added_biases(adapter: ModelAdapter) -> list[str]:
    """Names of the linears that the fold gives a bias (they read a LayerNorm with a bias but have none)."""
    layout, out = adapter.layout, []
    for i in range(adapter.num_layers()):
        groups = [(layout.attn_norm, layout.attn_in + (layout.mlp_in if layout.parallel_blocks else ()))]
        if not layout.parallel_blocks:
            groups.append((layout.mlp_norm, layout.mlp_in))
        for norm_path, readers in groups:
            if getattr(module_at(adapter.layer(i), norm_path), "bias", None) is None:
                continue
            layer = adapter.layer(i)
            out += [f"{layout.layers}.{i}.{p}" for p in readers if module_at(layer, p).bias is None]
    if getattr(adapter.final_norm(), "bias", None) is not None and adapter.lm_head().bias is None:
        out.append(next(n for n, m in adapter.model.named_modules() if m is adapter.lm_head()))
    return sorted(out)
