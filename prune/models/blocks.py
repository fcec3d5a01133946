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

`masked` does this reversibly (the search); `remove_sub_blocks` does it for good, then makes the model the
``<family>_blockpruned`` type declared here (`BLOCKPRUNED`, see `prune.models.export`): its config records
``pruned_attn_layers`` / ``pruned_mlp_layers`` and its ``*BlockPrunedForCausalLM.__init__`` builds the stock
model and applies the same removal, so ``save_pretrained`` -> ``AutoModelForCausalLM.from_pretrained``
round-trips with no missing or unexpected keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prune.errors import PruneError
from prune.models import export
from prune.models.adapter import ModelAdapter, module_at, replace_module
from prune.models.families import Layout


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


def _mlp_sites(layout: Layout) -> tuple[list[str], str]:
    """(paths that become Identity, the path that becomes a `ZeroBlock`) for removing an MLP."""
    parents = {p.rpartition(".")[0] for p in (*layout.mlp_in, layout.mlp_out)}
    if len(parents) == 1 and "" not in parents:  # one container module (``mlp``): replace it whole
        return [], parents.pop()
    if len(layout.mlp_in) != 1:
        raise PruneError("MLP removal needs an MLP container or a single input projection; extend blocks.py")
    return [layout.mlp_in[0]], layout.mlp_out  # OPT: fc1 -> Identity, fc2 -> zeros


def attn_removed(layout: Layout, layer: nn.Module) -> bool:
    return isinstance(module_at(layer, layout.attn), ZeroAttention)


def mlp_removed(layout: Layout, layer: nn.Module) -> bool:
    return isinstance(module_at(layer, _mlp_sites(layout)[1]), ZeroBlock)


def _edits(layout: Layout, layer: nn.Module, attn: bool, mlp: bool) -> list[tuple[str, nn.Module]]:
    """(path in the layer, stand-in) pairs removing these blocks of one layer (already removed ones: none)."""
    attn = attn and not attn_removed(layout, layer)
    mlp = mlp and not mlp_removed(layout, layer)
    edits: list[tuple[str, nn.Module]] = []
    if attn:
        edits.append((layout.attn, ZeroAttention(module_at(layer, layout.attn).layer_idx)))
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
    return [module_at(adapter.layer(i), path) for i, path, _ in _plan_edits(adapter, attn, mlp)]


def removed_param_count(adapter: ModelAdapter, attn: Iterable[int], mlp: Iterable[int]) -> int:
    """Parameters removing these blocks would delete (each tensor counted once)."""
    params = {id(p): p.numel() for m in removed_modules(adapter, attn, mlp) for p in m.parameters()}
    return sum(params.values())


@contextmanager
def masked(adapter: ModelAdapter, attn: Iterable[int], mlp: Iterable[int]) -> Iterator[None]:
    """Temporarily remove blocks (the same stand-ins as `remove_sub_blocks`); restored on exit."""
    edits = _plan_edits(adapter, attn, mlp)
    undo = [(i, path, replace_module(adapter.layer(i), path, new)) for i, path, new in edits]
    try:
        yield
    finally:
        for i, path, old in reversed(undo):
            replace_module(adapter.layer(i), path, old)


def _strip(model: nn.Module, layout: Layout, attn: Iterable[int], mlp: Iterable[int]) -> None:
    layers = module_at(model, layout.layers)
    attn_set, mlp_set = set(attn), set(mlp)
    for i in sorted(attn_set | mlp_set):
        for path, new in _edits(layout, layers[i], i in attn_set, i in mlp_set):
            replace_module(layers[i], path, new)


def scan(model: nn.Module, layout: Layout) -> tuple[list[int], list[int]]:
    """(layers without attention, layers without MLP), read from the modules themselves."""
    layers = module_at(model, layout.layers)
    return ([i for i, layer in enumerate(layers) if attn_removed(layout, layer)],
            [i for i, layer in enumerate(layers) if mlp_removed(layout, layer)])


def remove_sub_blocks(
    adapter: ModelAdapter, attn: Iterable[int], mlp: Iterable[int], dropping_layers: Iterable[int] = ()
) -> None:
    """Delete attention / MLP blocks for good; the model becomes the ``<family>_blockpruned`` type.

    Args:
        adapter: the model's adapter.
        attn: current layer indices whose attention block (and its norm) goes.
        mlp: current layer indices whose MLP block (and its norm) goes.
        dropping_layers: layers the same plan deletes whole afterwards (``surgery.drop_layers``); the config
            records the sub-block indices as they will be after that deletion.
    """
    model = adapter.model
    _strip(model, adapter.layout, _check(adapter, attn), _check(adapter, mlp))
    drop = set(dropping_layers)
    new_index = {old: new for new, old in enumerate(i for i in range(adapter.num_layers()) if i not in drop)}
    pruned_attn, pruned_mlp = scan(model, adapter.layout)
    export.convert(model, BLOCKPRUNED,
                   pruned_attn_layers=[new_index[i] for i in pruned_attn if i in new_index],
                   pruned_mlp_layers=[new_index[i] for i in pruned_mlp if i in new_index])


def _rebuild(model: nn.Module, layout: Layout, config: Any) -> None:
    _strip(model, layout, config.pruned_attn_layers or [], config.pruned_mlp_layers or [])


def _record(model: nn.Module, layout: Layout) -> dict[str, list[int]]:
    pruned_attn, pruned_mlp = scan(model, layout)
    return {"pruned_attn_layers": pruned_attn, "pruned_mlp_layers": pruned_mlp}


# ``<family>_blockpruned``: the config records which layers lost their attention / MLP block.
BLOCKPRUNED = export.declare(export.Edit(
    suffix="_blockpruned", tag="BlockPruned",
    fields={"pruned_attn_layers": "list[int] | None", "pruned_mlp_layers": "list[int] | None"},
    rebuild=_rebuild, record=_record, module=__name__,
))
