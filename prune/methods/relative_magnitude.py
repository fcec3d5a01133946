"""Relative Magnitude (Samragh et al., 2023; the RM baseline of BlockPruner and ShortGPT).

Score of layer i: E_t[ ||f(x)|| / ||x + f(x)|| ], where x is the layer's input and f(x) = out - x its residual
contribution. Layers with the lowest score are removed in one shot, using ShortGPT's procedure.
Ratio unit: layers, ⌈ratio·L⌉ removed.
"""

from __future__ import annotations

import torch

from prune.methods.layer_common import OneShotLayerRanking


def relative_magnitude(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """||out - in|| / ||out|| per token: Tensor[B, T]."""
    return (x_out - x_in).norm(dim=-1) / x_out.norm(dim=-1).clamp_min(1e-12)


class RelativeMagnitude(OneShotLayerRanking):
    """Remove the layers whose residual update is smallest relative to their output."""

    name, score_name = "relative_magnitude", "relative_magnitude"
    statistic = staticmethod(relative_magnitude)
