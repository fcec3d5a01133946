"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot").

Per linear: the Hessian of the layer-wise reconstruction loss, H = 2·XXᵀ over the calibration tokens (fp32),
damped by 1% of its mean diagonal; the upper Cholesky factor of H⁻¹; columns visited left to right in blocks
of 128: a block's mask picks the weights with the lowest w²/[H⁻¹]_jj² (over the whole block when
unstructured, per group of M columns when N:M, chosen when the group's first column is reached), each
column's pruning error is spread over the columns to its right (the OBS update), and the block's error over
the blocks after it. Layers in sequence on the pruned model's own inputs
(`prune.methods.sparse_common.prune_in_sequence`). Ratio unit: the fraction of the decoder layers' linear
weights zeroed; the plan rewrites the weights (``weight_updates``) and removes no parameter.

Follows IST-DASLab/sparsegpt ``sparsegpt.py::SparseGPT`` and ``llama.py::llama_sequential`` (commit
147d215): dead inputs (zero Hessian diagonal) are zeroed, the Hessian is a running mean over windows (batch
1), ``true_sequential`` is the code's ``--true-sequential`` (off by default there and here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods import WithOptions, require_calibration
from prune.methods.sparse_common import (
    RATIO_MEANS,
    RATIO_UNIT,
    LinearStatistic,
    SparsityOptions,
    check_columns,
    check_ratio,
    n_m_mask,
    per_matrix_mask,
    prune_in_sequence,
    sequential_groups,
)
from prune.models.adapter import ModelAdapter
from prune.options import bounded
from prune.types import PrunePlan


@dataclass(frozen=True)
class SparseGPTOptions(SparsityOptions):
    blocksize: int = bounded(128, ge=1)          # columns per lazy-update block
    percdamp: float = bounded(0.01, ge=0.0)      # damping, a fraction of the mean Hessian diagonal
    true_sequential: bool = False                # prune q/k/v, o, MLP in, MLP out one after another

    def check(self) -> None:
        super().check()
        nm = self.n_m
        if nm is not None and self.blocksize % nm[1]:
            raise self.error("blocksize", f"must be a multiple of M={nm[1]} for pattern {self.pattern}")


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp·mean(diag H). H is changed (dead diagonal set)."""
    damp = percdamp * torch.mean(torch.diag(hessian))
    hessian.diagonal().add_(damp)
    try:
        lower = torch.linalg.cholesky(hessian)
    except torch.linalg.LinAlgError as e:
        raise PruneError("the damped Hessian is not positive definite; raise method.percdamp") from e
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, nm: tuple[int, int] | None,
              blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The pruned and updated weight (fp32, zeros where pruned); `hessian` (fp32 [in, in]) is consumed."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian
    dead = torch.diag(h) == 0  # inputs never active: their weights contribute nothing, zero them
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = inverse_hessian_factor(h, percdamp)
    cols = w.shape[1]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, hinv_block = w[:, start:end].clone(), hinv[start:end, start:end]
        d = torch.diag(hinv_block)
        if nm is None:
            mask = per_matrix_mask(block ** 2 / d.reshape(1, -1) ** 2, ratio) if ratio > 0 \
                else torch.zeros_like(block, dtype=torch.bool)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        pruned, errors = torch.zeros_like(block), torch.zeros_like(block)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                score = block[:, group] ** 2 / d[group].reshape(1, -1) ** 2
                mask[:, group] = n_m_mask(score, *nm)
            col = block[:, j]
            kept = col.masked_fill(mask[:, j], 0)
            error = (col - kept) / d[j]
            block[:, j:] -= error.unsqueeze(1) @ hinv_block[j, j:].unsqueeze(0)  # OBS update of the rest
            pruned[:, j], errors[:, j] = kept, error
        w[:, start:end] = pruned
        w[:, end:] -= errors @ hinv[start:end, end:]  # the block's error, carried to later blocks
    return w


class Hessian(LinearStatistic):
    """H = 2·XXᵀ as a running mean over calibration windows, in fp32 (the code's add_batch)."""

    def __init__(self, linear: nn.Linear, options: SparseGPTOptions, ratio: float) -> None:
        self.h = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        self.windows, self.options, self.ratio = 0, options, ratio

    def add(self, x: torch.Tensor) -> None:
        windows = x.shape[0] if x.dim() == 3 else 1
        features = x.reshape(-1, x.shape[-1]).t()
        self.h *= self.windows / (self.windows + windows)
        self.windows += windows
        features = math.sqrt(2 / self.windows) * features.float()
        self.h += features @ features.t()

    def prune(self, linear: nn.Linear) -> None:
        o = self.options
        new = obs_prune(linear.weight, self.h, self.ratio, o.n_m, o.blocksize, o.percdamp)
        linear.weight.copy_(new.to(linear.weight.dtype))
        self.h = None  # type: ignore[assignment]


class SparseGPT(WithOptions[SparseGPTOptions]):
    """Zero the weights with the lowest OBS saliency and update the rest to compensate."""

    ratio_unit = RATIO_UNIT
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("sparsegpt", calib)
        check_ratio(self.options, ratio)

        def statistic(name: str, linear: nn.Linear) -> Hessian:
            check_columns(name, linear.weight, self.options.n_m)
            return Hessian(linear, self.options, ratio)

        groups = (lambda layer: sequential_groups(adapter, layer)) if self.options.true_sequential else None
        pruned = prune_in_sequence(adapter, calib, statistic, groups=groups, desc="sparsegpt")
        updates = {f"weight_updates/{name}": w for name, w in pruned.items()}
        return PrunePlan(method="sparsegpt", ratio=ratio, ratio_unit=self.ratio_unit, tensors=updates,
                         info={"options": self.options.as_dict(), "ratio_means": RATIO_MEANS})
