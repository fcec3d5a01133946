"""`ModelAdapter`: one accessor object over any supported HF causal LM.

Methods, surgery and hooks are written once against this class. It locates modules through the family's
`Layout` and never copies an HF ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prune.errors import PruneError
from prune.models.families import LAYOUTS, Layout


def module_at(root: nn.Module, path: str) -> Any:
    """The object at dotted attribute `path` below `root` (``"self_attn.o_proj"``)."""
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted `path` below `root`; returns the module it replaced."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


class ModelAdapter:
    """Accessors and hook sites for one loaded model.

    Args:
        model: a ``*ForCausalLM`` whose ``config.model_type`` is in `LAYOUTS`.
    """

    def __init__(self, model: nn.Module) -> None:
        model_type = model.config.model_type
        if model_type not in LAYOUTS:
            supported = ", ".join(sorted(LAYOUTS))
            raise PruneError(
                f"model_type '{model_type}' is not supported; supported: {supported} "
                "(add a Layout in prune/models/families.py to support it)"
            )
        self.model = model
        self.layout: Layout = LAYOUTS[model_type]

    @property
    def parallel_blocks(self) -> bool:
        return self.layout.parallel_blocks

    def layers(self) -> nn.ModuleList:
        return module_at(self.model, self.layout.layers)

    def num_layers(self) -> int:
        return len(self.layers())

    def layer(self, i: int) -> nn.Module:
        return self.layers()[i]

    # A layer's parts in the order its hidden state meets them.

    def attn_norm(self, i: int) -> nn.Module:
        return module_at(self.layer(i), self.layout.attn_norm)

    def attn_in(self, i: int) -> list[nn.Linear]:
        """The attention input projections (q, k, v)."""
        return [module_at(self.layer(i), p) for p in self.layout.attn_in]

    def attn(self, i: int) -> nn.Module:
        return module_at(self.layer(i), self.layout.attn)

    def attn_out(self, i: int) -> nn.Linear:
        return module_at(self.layer(i), self.layout.attn_out)

    def mlp_norm(self, i: int) -> nn.Module:
        """The norm feeding the MLP (the shared input norm for parallel blocks)."""
        return module_at(self.layer(i), self.layout.mlp_norm or self.layout.attn_norm)

    def mlp_in(self, i: int) -> list[nn.Linear]:
        return [module_at(self.layer(i), p) for p in self.layout.mlp_in]

    def mlp_out(self, i: int) -> nn.Linear:
        return module_at(self.layer(i), self.layout.mlp_out)

    def final_norm(self) -> nn.Module:
        return module_at(self.model, self.layout.final_norm)

    def embeddings(self) -> list[nn.Module]:
        return [module_at(self.model, p) for p in self.layout.embeddings]

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @staticmethod
    def hidden(layer_output: Any) -> torch.Tensor:
        """The hidden state in a decoder layer's output (a tensor, or a tuple in older transformers)."""
        return layer_output[0] if isinstance(layer_output, tuple) else layer_output

    @staticmethod
    def with_hidden(layer_output: Any, h: torch.Tensor) -> Any:
        """`layer_output` with its hidden state replaced by `h` (inverse of `hidden`)."""
        return (h, *layer_output[1:]) if isinstance(layer_output, tuple) else h

    @staticmethod
    def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden state a decoder layer was called with (positional or keyword)."""
        return args[0] if args else kwargs["hidden_states"]

    def sync_config(self) -> None:
        """Write the current layer count back into ``model.config`` so HF save/load round-trips."""
        n = self.num_layers()
        config = self.model.config
        config.num_hidden_layers = n
        for i, layer in enumerate(self.layers()):
            attn = getattr(layer, self.layout.attn)
            # The KV cache is indexed by layer_idx (transformers#30508): renumber after removals.
            attn.layer_idx = i
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = i


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, chosen by ``model.config.model_type``."""
    return ModelAdapter(model)
