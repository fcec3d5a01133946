"""Relative Magnitude (Samragh et al., 2023; the RM baseline of BlockPruner and ShortGPT).

Score of layer i: E_t[ ||f(x)|| / ||x + f(x)|| ], where x is the layer's input and f(x) = out - x its residual
contribution. Layers with the lowest score are removed in one shot, using ShortGPT's procedure.
Ratio unit: layers, ⌈ratio·L⌉ removed.
"""

from __future__ import annotations

import torch

from prune.data.calibration import CalibrationSet
from prune.methods.layer_common import one_shot_plan
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


def relative_magnitude(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """||out - in|| / ||out|| per token: Tensor[B, T]."""
    return (x_out - x_in).norm(dim=-1) / x_out.norm(dim=-1).clamp_min(1e-12)


class RelativeMagnitude:
    """Remove the layers whose residual update is smallest relative to their output.

    Args:
        batch_size: calibration sequences per forward pass.
    """

    ratio_unit = "layers"
    needs_calibration = True

    def __init__(self, batch_size: int = 1) -> None:
        self.batch_size = batch_size

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        return one_shot_plan("relative_magnitude", adapter, calib, ratio, relative_magnitude, "relative_magnitude", self.batch_size)
