"""Sub-block removal (BlockPruner's MHA / MLP blocks) and the HF types that save and reload such models.

A decoder layer holds two residual blocks: attention (its input norm + attention) and MLP (its norm + MLP).
Removing a block swaps its modules for parameter-free stand-ins, so HF's own layer ``forward`` runs
unchanged and adds zeros to the residual (``x + 0 == x`` exactly):

- attention -> `ZeroAttention` (returns zeros and, when a KV cache is passed, appends a ``[B, 1, T, 1]``
  placeholder so the cache's per-layer lengths, which give positions and mask sizes, stay right even when
  layer 0's attention is gone); its pre-norm -> ``nn.Identity``.
- MLP -> `ZeroBlock` (returns zeros); its pre-norm -> ``nn.Identity``. OPT keeps ``fc1``/``fc2`` on the layer,
  so ``fc1`` becomes ``nn.Identity`` and ``fc2`` a `ZeroBlock`.
- Phi (one ``input_layernorm`` feeds attention and MLP in parallel): a block is the attention module or the
  MLP module alone; the shared norm is removed only when both blocks of the layer are gone.

`masked` does this reversibly (the search); `remove_sub_blocks` does it for good, then turns the config into
a registered ``<model_type>_blockpruned`` subclass that records ``pruned_attn_layers`` / ``pruned_mlp_layers``
and the model into the matching ``*BlockPrunedForCausalLM``, whose ``__init__`` builds the stock model and
applies the same removal. ``save_pretrained`` -> ``AutoModelForCausalLM.from_pretrained`` then round-trips
with no missing or unexpected keys (`register` adds the types to the Auto classes; ``import prune`` arranges
it). The config *class* says ``<family>_blockpruned``; an instance's ``config.model_type`` stays the family's,
so adapters and transformers treat the model as the architecture it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prune.errors import PruneError
from prune.models.adapter import ModelAdapter, _get
from prune.models.families import LAYOUTS, Layout

SUFFIX = "_blockpruned"
# model_type -> (config class, causal-LM class) names in `transformers`.
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
}


class ZeroAttention(nn.Module):
    """A removed attention sub-layer: adds nothing to the residual; no parameters."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # renumbered by `ModelAdapter.sync_config` like a real attention module

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            # The cache reads sequence length and mask sizes from layer 0 (or the first full-attention layer):
            # keep this layer's length in step with a 1x1 placeholder per token instead of storing nothing.
            b, t = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class ZeroBlock(nn.Module):
    """A removed MLP: zeros shaped like its input (the hidden size); no parameters."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(x)


def base_model_type(model_type: str) -> str:
    return model_type.removesuffix(SUFFIX)


class _ModelType:
    """``model_type`` of a derived config (``*BlockPrunedConfig``, ``*DispConfig``): ``<family><suffix>`` on
    the class (what config.json records and the Auto classes key on), the family's own on instances, so code
    keyed on an instance's ``config.model_type`` (adapters, transformers internals) treats the model as the
    architecture it is."""

    def __init__(self, family: str, suffix: str = SUFFIX) -> None:
        self.family, self.suffix = family, suffix

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        return self.family if obj is not None else self.family + self.suffix

    def __set__(self, obj: Any, value: str) -> None:
        """Loading passes config.json's ``model_type`` back as a keyword: the type is fixed, keep it."""


def _mlp_sites(layout: Layout) -> tuple[list[str], str]:
    """(paths that become Identity, the path that becomes a `ZeroBlock`) for removing an MLP."""
    parents = {p.rpartition(".")[0] for p in (*layout.mlp_in, layout.mlp_out)}
    if len(parents) == 1 and "" not in parents:  # one container module (``mlp``): replace it whole
        return [], parents.pop()
    if len(layout.mlp_in) != 1:
        raise PruneError("MLP removal needs an MLP container or a single input projection; extend blocks.py")
    return [layout.mlp_in[0]], layout.mlp_out  # OPT: fc1 -> Identity, fc2 -> zeros


def attn_removed(layout: Layout, layer: nn.Module) -> bool:
    return isinstance(_get(layer, layout.attn), ZeroAttention)


def mlp_removed(layout: Layout, layer: nn.Module) -> bool:
    return isinstance(_get(layer, _mlp_sites(layout)[1]), ZeroBlock)


def _edits(layout: Layout, layer: nn.Module, attn: bool, mlp: bool) -> list[tuple[str, nn.Module]]:
    """(path in the layer, stand-in) pairs removing these blocks of one layer (already removed ones: none)."""
    attn = attn and not attn_removed(layout, layer)
    mlp = mlp and not mlp_removed(layout, layer)
    edits: list[tuple[str, nn.Module]] = []
    if attn:
        edits.append((layout.attn, ZeroAttention(_get(layer, layout.attn).layer_idx)))
    if mlp:
        identities, zero = _mlp_sites(layout)
        edits += [(p, nn.Identity()) for p in identities] + [(zero, ZeroBlock())]
    if layout.mlp_norm is not None:  # sequential blocks: each block owns its pre-norm
        if attn:
            edits.append((layout.attn_norm, nn.Identity()))
        if mlp:
            edits.append((layout.mlp_norm, nn.Identity()))
    elif (attn or mlp) and (attn or attn_removed(layout, layer)) and (mlp or mlp_removed(layout, layer)):
        edits.append((layout.attn_norm, nn.Identity()))  # parallel blocks (Phi): the shared norm goes last
    return edits


def _swap(layer: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def _check(adapter: ModelAdapter, indices: Iterable[int]) -> list[int]:
    idx = sorted(set(int(i) for i in indices))
    n = adapter.num_layers()
    if any(i < 0 or i >= n for i in idx):
        raise PruneError(f"block layer indices {idx} out of range for a model with {n} layers")
    return idx


def _plan_edits(adapter: ModelAdapter, attn: Iterable[int],
                mlp: Iterable[int]) -> list[tuple[int, str, nn.Module]]:
    attn_set, mlp_set = set(_check(adapter, attn)), set(_check(adapter, mlp))
    return [
        (i, path, new)
        for i in sorted(attn_set | mlp_set)
        for path, new in _edits(adapter.layout, adapter.layer(i), i in attn_set, i in mlp_set)
    ]


def removed_modules(adapter: ModelAdapter, attn: Iterable[int], mlp: Iterable[int]) -> list[nn.Module]:
    """The modules that removing these blocks (on top of what is already removed) would delete."""
    return [_get(adapter.layer(i), path) for i, path, _ in _plan_edits(adapter, attn, mlp)]


def removed_param_count(adapter: ModelAdapter, attn: Iterable[int], mlp: Iterable[int]) -> int:
    """Parameters removing these blocks would delete (each tensor counted once)."""
    params = {id(p): p.numel() for m in removed_modules(adapter, attn, mlp) for p in m.parameters()}
    return sum(params.values())


@contextmanager
def masked(adapter: ModelAdapter, attn: Iterable[int], mlp: Iterable[int]) -> Iterator[None]:
    """Temporarily remove blocks (the same stand-ins as `remove_sub_blocks`); restored on exit."""
    undo = [(i, path, _swap(adapter.layer(i), path, new)) for i, path, new in _plan_edits(adapter, attn, mlp)]
    try:
        yield
    finally:
        for i, path, old in reversed(undo):
            _swap(adapter.layer(i), path, old)


def _strip(model: nn.Module, layout: Layout, attn: Iterable[int], mlp: Iterable[int]) -> None:
    layers = _get(model, layout.layers)
    attn_set, mlp_set = set(attn), set(mlp)
    for i in sorted(attn_set | mlp_set):
        for path, new in _edits(layout, layers[i], i in attn_set, i in mlp_set):
            _swap(layers[i], path, new)


def scan(model: nn.Module, layout: Layout) -> tuple[list[int], list[int]]:
    """(layers without attention, layers without MLP), read from the modules themselves."""
    layers = _get(model, layout.layers)
    return ([i for i, l in enumerate(layers) if attn_removed(layout, l)],
            [i for i, l in enumerate(layers) if mlp_removed(layout, l)])


def remove_sub_blocks(
    adapter: ModelAdapter, attn: Iterable[int], mlp: Iterable[int], dropping_layers: Iterable[int] = ()
) -> None:
    """Delete attention / MLP blocks for good and make the model a registered ``*_blockpruned`` type.

    Args:
        adapter: the model's adapter.
        attn: current layer indices whose attention block (and its norm) goes.
        mlp: current layer indices whose MLP block (and its norm) goes.
        dropping_layers: layers the same plan deletes whole afterwards (``surgery.drop_layers``); the config
            records the sub-block indices as they will be after that deletion.
    """
    model = adapter.model
    family = base_model_type(model.config.model_type)
    if family not in FAMILY_CLASSES:
        raise PruneError(f"sub-block removal is not supported for model_type '{family}' (supported: "
                         f"{', '.join(FAMILY_CLASSES)})")
    _strip(model, adapter.layout, _check(adapter, attn), _check(adapter, mlp))
    config_cls, model_cls = blockpruned_classes(family)
    register()
    drop = set(dropping_layers)
    new_index = {old: new for new, old in enumerate(i for i in range(adapter.num_layers()) if i not in drop)}
    pruned_attn, pruned_mlp = scan(model, adapter.layout)
    model.config.__class__ = config_cls  # in place: every module holding this config object sees the new type
    model.config.pruned_attn_layers = [new_index[i] for i in pruned_attn if i in new_index]
    model.config.pruned_mlp_layers = [new_index[i] for i in pruned_mlp if i in new_index]
    model.__class__ = model_cls


# ----------------------------------------------------------------------------------------------------------
# Registered config / model types
# ----------------------------------------------------------------------------------------------------------

_CLASSES: dict[tuple[str, str], tuple[type, type]] = {}


def derived_classes(family: str, suffix: str, tag: str, fields: dict[str, str],
                    rebuild: Callable[[nn.Module, Any], None], refresh: Callable[[nn.Module], None],
                    module: str = __name__) -> tuple[type, type]:
    """(config class, causal-LM class) of ``<family><suffix>``, built once from the stock classes.

    The config class adds `fields` (name -> annotation, default ``None``); the model class builds the stock
    model and then calls ``rebuild(model, config)`` to redo the structural edit the fields describe, and calls
    ``refresh(model)`` before ``save_pretrained`` to re-read the fields from the modules. Both classes are
    published in `module` under ``<Stock><tag>Config`` / ``<Stock><tag>ForCausalLM`` (pickle finds them).
    """
    if (family, suffix) in _CLASSES:
        return _CLASSES[family, suffix]
    import sys

    import transformers

    config_name, model_name = FAMILY_CLASSES[family]
    base_config, base_model = getattr(transformers, config_name), getattr(transformers, model_name)
    config_cls = type(
        config_name.removesuffix("Config") + tag + "Config",
        (base_config,),
        {"__module__": module, "__doc__": f"{config_name} plus {', '.join(fields)}.",
         "model_type": _ModelType(family, suffix), "__annotations__": dict(fields)} | dict.fromkeys(fields),
    )

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base_model.__init__(self, config, *args, **kwargs)
        rebuild(self, config)

    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        refresh(self)  # the modules are the truth: later edits cannot leave stale fields
        return base_model.save_pretrained(self, *args, **kwargs)

    model_cls = type(
        model_name.removesuffix("ForCausalLM") + tag + "ForCausalLM",
        (base_model,),
        {"__module__": module, "config_class": config_cls, "__init__": __init__,
         "save_pretrained": save_pretrained,
         "__doc__": f"{model_name} rebuilt with the structural edit its config records ({tag})."},
    )
    for cls in (config_cls, model_cls):
        setattr(sys.modules[module], cls.__name__, cls)
    _CLASSES[family, suffix] = (config_cls, model_cls)
    return config_cls, model_cls


def register_derived(classes: Callable[[str], tuple[type, type]]) -> None:
    """Add ``classes(family)`` of every family to ``AutoConfig`` / ``AutoModelForCausalLM``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for family in FAMILY_CLASSES:
        config_cls, model_cls = classes(family)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def blockpruned_classes(family: str) -> tuple[type, type]:
    """(config class, causal-LM class) of ``<family>_blockpruned``."""
    layout = LAYOUTS[family]

    def rebuild(model: nn.Module, config: Any) -> None:
        _strip(model, layout, config.pruned_attn_layers or [], config.pruned_mlp_layers or [])

    def refresh(model: nn.Module) -> None:
        model.config.pruned_attn_layers, model.config.pruned_mlp_layers = scan(model, layout)

    fields = {"pruned_attn_layers": "list[int] | None", "pruned_mlp_layers": "list[int] | None"}
    return derived_classes(family, SUFFIX, "BlockPruned", fields, rebuild, refresh)


_REGISTERED = False


def register() -> None:
    """Add every ``*_blockpruned`` type to ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    register_derived(blockpruned_classes)
    _REGISTERED = True
