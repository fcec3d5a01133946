"""The one module that changes a model: it executes `PrunePlan`s.

Methods never mutate models; they return a plan, and `apply` carries it out, one registered edit per kind
the plan carries (`PrunePlan.edit_kinds`), in the order of `ORDER`. Structural edits remove the parameters
for real (modules are deleted or sliced, not zeroed) and keep the HF config in step, so stock
``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip the pruned model. Element edits
(``weight_masks``) zero weights in place and remove no parameter.

A new kind of edit: name it in `ORDER` where it must run, and register its function with ``@edit(kind)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from prune.errors import PruneError
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan

# Config attributes that hold one entry per decoder layer and must shrink with the layer list.
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def drop_layers(adapter: ModelAdapter, indices: Iterable[int]) -> None:
    """Delete whole decoder layers, renumber the rest and update the config.

    Args:
        adapter: the model's adapter.
        indices: positions in the *current* layer list to delete.
    """
    drop = sorted(set(indices))
    n = adapter.num_layers()
    if any(i < 0 or i >= n for i in drop):
        raise PruneError(f"layer indices {drop} out of range for a model with {n} layers")
    if len(drop) >= n:
        raise PruneError(f"cannot remove all {n} layers; lower the ratio")
    keep = [i for i in range(n) if i not in set(drop)]
    layers = adapter.layers()
    kept = nn.ModuleList([layers[i] for i in keep])
    # Replace the ModuleList in place on its parent so the parameters of dropped layers are released.
    parent_path, _, attr = adapter.layout.layers.rpartition(".")
    parent = adapter.model.get_submodule(parent_path)
    setattr(parent, attr, kept)
    config = adapter.model.config
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, key, [values[i] for i in keep])
    adapter.sync_config()


# The order edits run in. Every edit names layers and parameters of the *dense* model: element edits run
# first, while every tensor has its dense shape (new values, then the zeros, so a mask always wins); output
# biases are added before widths slice the rows they sit on; a rotation (SliceGPT) changes the hidden size
# and combines with nothing structural; width and sub-block edits keep the layer list; layer drops renumber
# it, so they run last.
ORDER = ("weight_updates", "weight_masks", "added_biases", "rotations", "keep_dims", "drop_sub_blocks",
         "drop_layers")
# Kinds one plan cannot combine: widths assume a stock model, sub-block removal makes another type.
INCOMPATIBLE = (("keep_dims", "drop_sub_blocks",
                 "a plan cannot combine keep_dims (width) with drop_attn / drop_mlp (sub-blocks)"),
               # SliceGPT's shortcuts chain the bases of consecutive sites: nothing may be cut out after it.
               *(("rotations", kind, f"a plan cannot combine rotations (SliceGPT) with {kind}")
                 for kind in ("keep_dims", "drop_sub_blocks", "drop_layers")))

Edit = Callable[[ModelAdapter, PrunePlan], None]
EDITS: dict[str, Edit] = {}


def edit(kind: str) -> Callable[[Edit], Edit]:
    """Register ``fn(adapter, plan)`` as the edit that carries out the plan's ``kind``."""
    if kind not in ORDER:
        raise ValueError(f"edit kind {kind!r} has no place in surgery.ORDER; add it there first")

    def register(fn: Edit) -> Edit:
        EDITS[kind] = fn
        return fn

    return register


def apply(adapter: ModelAdapter, plan: PrunePlan) -> None:
    """Carry out `plan` on the adapter's model, in place; the plan is checked whole before any edit."""
    kinds = plan.edit_kinds()
    unknown = [k for k in kinds if k not in EDITS]
    if unknown:
        raise PruneError(f"this version cannot apply plan edits {unknown} (it applies {', '.join(EDITS)})")
    for a, b, problem in INCOMPATIBLE:
        if a in kinds and b in kinds:
            raise PruneError(problem)
    for kind in ORDER:
        if kind in kinds:
            EDITS[kind](adapter, plan)


@edit("weight_masks")
def zero_masked_weights(adapter: ModelAdapter, plan: PrunePlan) -> None:
    """Zero the elements each mask marks True in its named parameter, in place; shapes stay, so parameter
    counts do too (the plan records ``info["zeroed_only"]``)."""
    for name, mask in plan.tensors_of("weight_masks").items():
        try:
            weight = adapter.model.get_parameter(name)
        except AttributeError as e:
            raise PruneError(f"the plan masks {name}, which the model does not have") from e
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            raise PruneError(f"the plan's mask of {name} is {mask.dtype} {tuple(mask.shape)}; the weight "
                             f"needs a torch.bool mask of shape {tuple(weight.shape)}")
        with torch.no_grad():
            weight.masked_fill_(mask.to(weight.device), 0)


@edit("weight_updates")
def copy_updated_weights(adapter: ModelAdapter, plan: PrunePlan) -> None:
    """Copy each tensor into its named parameter, in place (SparseGPT's reconstructed weights); shapes stay,
    so parameter counts do too (the plan records ``info["zeroed_only"]``)."""
    for name, value in plan.tensors_of("weight_updates").items():
        try:
            weight = adapter.model.get_parameter(name)
        except AttributeError as e:
            raise PruneError(f"the plan updates {name}, which the model does not have") from e
        if value.shape != weight.shape or not value.is_floating_point():
            raise PruneError(f"the plan's update of {name} is {value.dtype} {tuple(value.shape)}; the weight "
                             f"needs a floating tensor of shape {tuple(weight.shape)}")
        with torch.no_grad():
            weight.copy_(value.to(device=weight.device, dtype=weight.dtype))


@edit("added_biases")
def _add_biases(adapter: ModelAdapter, plan: PrunePlan) -> None:
    """Bias compensation (FLAP, LLM-Pruner): vectors added to named linears' output biases, before the widths
    they compensate for are sliced (a bias is created where there is none; the saved model records it)."""
    from prune.models.width import add_output_biases

    add_output_biases(adapter, plan.tensors_of("added_biases"), converting=not plan.keep_dims)


@edit("rotations")
def _rotate_and_slice(adapter: ModelAdapter, plan: PrunePlan) -> None:
    from prune.models.rotation import rotate_and_slice

    # How the fold treats the embeddings is part of the edit (method option center_embeddings).
    rotate_and_slice(adapter, plan.tensors_of("rotations"), plan.info.get("center_embeddings", "layernorm"))


@edit("keep_dims")
def _prune_widths(adapter: ModelAdapter, plan: PrunePlan) -> None:
    from prune.models.width import prune_widths

    prune_widths(adapter, plan.keep_dims)


@edit("drop_sub_blocks")
def _remove_sub_blocks(adapter: ModelAdapter, plan: PrunePlan) -> None:
    from prune.models.blocks import remove_sub_blocks

    remove_sub_blocks(adapter, plan.drop_attn, plan.drop_mlp, dropping_layers=plan.drop_layers)


@edit("drop_layers")
def _drop_layers(adapter: ModelAdapter, plan: PrunePlan) -> None:
    drop_layers(adapter, plan.drop_layers)
