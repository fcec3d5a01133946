"""2:4 sparse kernels for speed measurements: a 2:4-sparse model's decoder linears run through
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS) while the speed protocols time it.

Only where they exist: a CUDA GPU of compute capability 8.0 or later (Ampere, Hopper), fp16 or bf16 weights,
and matrices the kernels accept (rows and columns multiples of 64 and 128 respectively: the strictest
of torch's limits). Everywhere else, and for any model that is not 2:4 in every decoder linear, nothing
changes: the zeros are multiplied densely and the measured speed-up is what it is (about 1x on a CPU). The
ideal speed-up (`prune.eval.speed.ideal_speedup`) counts parameters, which zeros do not remove: 1.0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MIN_CAPABILITY = (8, 0)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS, MIN_COLS = 64, 128  # torch's limits for fp16/bf16 (CUTLASS: 32 x 64; cuSPARSELt: 16 x 16) and more


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive weights of each row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def sparse_kernels_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY and dtype in HALF_DTYPES)


def two_four_linears(layers: nn.ModuleList) -> list[nn.Linear]:
    """The decoder linears to run sparse: all of them when every one is 2:4 and of a kernel shape, else []."""
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    ok = all(is_two_four(m.weight) and m.weight.shape[0] % MIN_ROWS == 0
             and m.weight.shape[1] % MIN_COLS == 0 for m in linears)
    return linears if linears and ok else []


@contextmanager
def semi_structured(layers: nn.ModuleList, enabled: bool = True) -> Iterator[int]:
    """Within the context, the layers' linears hold ``SparseSemiStructuredTensor`` weights when the model is
    2:4-sparse and the device has the kernels; yields how many linears were converted (0: dense as is).
    The dense weights are restored on exit."""
    first = next(layers.parameters(), None)
    if not enabled or first is None or not sparse_kernels_available(first.device, first.dtype):
        yield 0
        return
    linears = two_four_linears(layers)
    dense = [m.weight for m in linears]
    try:
        for m in linears:
            m.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(m.weight.detach()),
                                    requires_grad=False)
        yield len(linears)
    finally:
        for m, w in zip(linears, dense):
            m.weight = w
