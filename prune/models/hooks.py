"""Generic hook sites on decoder layers; methods observe or modify activations here, never by forking code."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from prune.errors import PruneError
from prune.models.adapter import ModelAdapter

LayerIOCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class ScaleLookup(Protocol):
    """Layer i's scalar as ``scales[i]``: a 1-D tensor, or an object indexed the same way."""

    def __getitem__(self, i: int) -> torch.Tensor: ...


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


@contextmanager
def skip_layers(adapter: ModelAdapter, indices: list[int]) -> Iterator[None]:
    """Turn the given decoder layers into the identity (output = input) while the context is open.

    Used to score a removal without deleting anything; equals `surgery.drop_layers` numerically.
    """

    def identity(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        return adapter.with_hidden(out, adapter.layer_input(args, kwargs))

    handles = [adapter.layer(i).register_forward_hook(identity, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _scaled_output(
    adapter: ModelAdapter, i: int, scales: ScaleLookup, skip: Collection[int], site: str
) -> Callable[..., Any]:
    """The forward hook body of `layer_scales` for layer `i` (see there)."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        x_in = adapter.layer_input(args, kwargs)
        if i in skip:  # a masked layer passes its input through unchanged
            return adapter.with_hidden(out, x_in)
        h = adapter.hidden(out)
        s = scales[i].to(h.dtype)
        h = h * s if site == "output" else x_in + s * (h - x_in)
        return adapter.with_hidden(out, h)

    return hook


@contextmanager
def layer_scales(
    adapter: ModelAdapter, scales: ScaleLookup, skip: Collection[int] = (), site: str = "output"
) -> Iterator[None]:
    """Multiply each decoder layer's output by a scalar, and turn the layers in `skip` into the identity.

    ``site="output"`` scales the whole output, residual included: ``x_{i+1} = S[i]·Layer_i(x_i)``
    (ELDeR/TRSP stage 1). ``site="delta"`` scales only what the layer adds to its input:
    ``x_{i+1} = x_i + S[i]·(Layer_i(x_i) - x_i)``. `skip` is read on every call, so a caller may add layers
    to it while the hooks are attached.

    Args:
        adapter: the model's adapter.
        scales: ``scales[i]`` is layer i's scalar: a Tensor[num_layers] (e.g. an ``nn.Parameter``) or any
            object indexed the same way (ELDeR's `LayerScales`); gradients flow into it.
        skip: indices of layers whose output is replaced by their input.
        site: ``output`` | ``delta``.
    """
    if site not in ("output", "delta"):
        raise PruneError(f"unknown scale site '{site}'; choose output or delta")
    handles = [
        layer.register_forward_hook(_scaled_output(adapter, i, scales, skip, site), with_kwargs=True)
        for i, layer in enumerate(adapter.layers())
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
