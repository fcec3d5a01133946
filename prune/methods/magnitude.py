"""Magnitude pruning (the baseline of the Wanda and SparseGPT papers): zero the smallest |W| of every linear
of every decoder layer, layer-wise (one threshold per matrix) or per N:M group. No calibration data, no
weight update. Ratio unit: the fraction of the decoder layers' linear weights zeroed (parameters are not
removed: ``params/removed_frac`` stays 0; ``sparsity/linear`` and ``params/nonzero`` report the zeros).

Follows locuslab/wanda ``lib/prune.py::prune_magnitude`` (commit 8e8fc87): per matrix, zero
``|W| <= sorted(|W|)[⌊ratio·numel⌋]``; N:M: the lowest |W| of every M inputs of each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from prune.data.calibration import CalibrationSet
from prune.methods import WithOptions
from prune.methods.sparse_common import (
    RATIO_MEANS,
    RATIO_UNIT,
    SparsityOptions,
    check_columns,
    check_ratio,
    linear_weight_names,
    pattern_mask,
)
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


@dataclass(frozen=True)
class MagnitudeOptions(SparsityOptions):
    # matrix: one threshold per weight matrix (the code and the papers' baseline); row: per output row
    # (Wanda's comparison group, for ablations: Wanda with uniform input norms equals this)
    group: Literal["matrix", "row"] = "matrix"


def magnitude_mask(weight: torch.Tensor, options: SparsityOptions, ratio: float,
                   group: Literal["matrix", "row"] = "matrix") -> torch.Tensor:
    """True where |W| is among the smallest under the pattern."""
    return pattern_mask(weight.abs(), options, ratio, unstructured=group)


class Magnitude(WithOptions[MagnitudeOptions]):
    """Zero the smallest-magnitude weights of the decoder layers' linears."""

    ratio_unit = RATIO_UNIT
    needs_calibration = False

    @torch.no_grad()
    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        check_ratio(self.options, ratio)
        masks = {}
        for name, linear in linear_weight_names(adapter):
            check_columns(name, linear.weight, self.options.n_m)
            masks[f"weight_masks/{name}"] = magnitude_mask(linear.weight, self.options, ratio,
                                                           self.options.group)
        return PrunePlan(method="magnitude", ratio=ratio, ratio_unit=self.ratio_unit, tensors=masks,
                         info={"options": self.options.as_dict(), "ratio_means": RATIO_MEANS})
