"""Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large Language Models").

Score of weight W_ij: |W_ij|·‖X_j‖₂, the weight's magnitude times the norm of its input feature over the
calibration tokens; the lowest scores are zeroed within each output row (unstructured) or within each group
of M inputs of a row (N:M). No weight update. Layers are pruned in sequence, each on the outputs of the
already pruned layers (`prune.methods.sparse_common.prune_in_sequence`). Ratio unit: the fraction of the
decoder layers' linear weights zeroed; no parameter is removed (``params/removed_frac`` stays 0).

Follows locuslab/wanda ``lib/prune.py::prune_wanda`` and ``lib/layerwrapper.py::WrappedGPT`` (commit
8e8fc87): the squared input norms are a running mean over calibration windows (batch 1); ties within a row
are broken by a stable sort. Its ``--use_variant`` (a per-row cumulative-score threshold) is not offered.
"""

from __future__ import annotations

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.methods import WithOptions, require_calibration
from prune.methods.sparse_common import (
    RATIO_MEANS,
    RATIO_UNIT,
    LinearStatistic,
    SparsityOptions,
    check_columns,
    check_ratio,
    pattern_mask,
    prune_in_sequence,
)
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


def wanda_score(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ from the squared input norms (Tensor[in])."""
    return weight.abs() * torch.sqrt(input_sq_norms.reshape(1, -1))


class InputNorms(LinearStatistic):
    """The running mean of ‖X_j‖² per input feature, over calibration windows (WrappedGPT's scaler_row)."""

    def __init__(self, linear: nn.Linear, options: SparsityOptions, ratio: float) -> None:
        self.sq_norms = torch.zeros(linear.in_features, device=linear.weight.device)
        self.windows, self.options, self.ratio = 0, options, ratio

    def add(self, x: torch.Tensor) -> None:
        windows = x.shape[0] if x.dim() == 3 else 1
        features = x.reshape(-1, x.shape[-1]).t().to(torch.float32)  # [in, tokens]
        self.sq_norms *= self.windows / (self.windows + windows)
        self.windows += windows
        self.sq_norms += torch.norm(features, p=2, dim=1) ** 2 / self.windows

    def prune(self, linear: nn.Linear) -> None:
        mask = pattern_mask(wanda_score(linear.weight, self.sq_norms), self.options, self.ratio, "row")
        linear.weight.masked_fill_(mask, 0)


class Wanda(WithOptions[SparsityOptions]):
    """Zero the weights with the lowest |W|·‖X‖ in each output row (or N:M group)."""

    ratio_unit = RATIO_UNIT
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("wanda", calib)
        check_ratio(self.options, ratio)

        def statistic(name: str, linear: nn.Linear) -> InputNorms:
            check_columns(name, linear.weight, self.options.n_m)
            return InputNorms(linear, self.options, ratio)

        pruned = prune_in_sequence(adapter, calib, statistic, desc="wanda")
        masks = {f"weight_masks/{name}": w == 0 for name, w in pruned.items()}
        return PrunePlan(method="wanda", ratio=ratio, ratio_unit=self.ratio_unit, tensors=masks,
                         info={"options": self.options.as_dict(), "ratio_means": RATIO_MEANS})
