"""Generic hook sites on decoder layers; methods observe or modify activations here, never by forking code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prune.models.adapter import ModelAdapter

LayerIOCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@contextmanager
def layer_io(adapter: ModelAdapter, callback: LayerIOCallback) -> Iterator[None]:
    """Call ``callback(i, x_in, x_out)`` for every decoder layer on every forward pass.

    ``x_in`` and ``x_out`` are the layer's input and output hidden states, ``Tensor[B, T, d]``.
    """
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(adapter.layers()):

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            inputs[i] = adapter.layer_input(args, kwargs)

        def post_hook(_m: nn.Module, _a: tuple, _k: dict, out: Any, i: int = i) -> None:
            callback(i, inputs.pop(i), adapter.hidden(out))

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
