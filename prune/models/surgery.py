"""The one module that changes a model's structure: it executes `PrunePlan`s.

Methods never mutate models; they return a plan, and `apply` carries it out. Every edit removes the
parameters for real (modules are deleted, not zeroed) and keeps the HF config in step, so stock
``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip the pruned model.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def apply(adapter: ModelAdapter, plan: PrunePlan) -> None:
    """Carry out `plan` on the adapter's model, in place."""
    if plan.keep_dims:  # first: keep_dims, like drop_layers, uses the dense model's layer indices
        if plan.drop_attn or plan.drop_mlp:
            raise PruneError("a plan cannot combine keep_dims (width) with drop_attn / drop_mlp (sub-blocks)")
        from prune.models.width import prune_widths

        prune_widths(adapter, plan.keep_dims)
    if plan.drop_attn or plan.drop_mlp:  # before drop_layers: both use the dense model's layer indices
        from prune.models.blocks import remove_sub_blocks

        remove_sub_blocks(adapter, plan.drop_attn, plan.drop_mlp, dropping_layers=plan.drop_layers)
    if plan.drop_layers:
        drop_layers(adapter, plan.drop_layers)
