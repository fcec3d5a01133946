"""Shared by the layer-removal methods: the ratio -> layer-count rule and per-layer calibration statistics."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods import WithOptions, require_calibration
from prune.models.adapter import ModelAdapter
from prune.models.hooks import layer_io
from prune.options import Options, bounded
from prune.types import PrunePlan

ROUNDING = "ceil(ratio * num_layers), as SLEB and TRSP round"


def layers_to_remove(ratio: float, num_layers: int, max_removable: int | None = None) -> int:
    """How many layers a layer-unit ratio removes: ⌈ratio·L⌉ (SLEB/TRSP rounding).

    Raises:
        PruneError: when the count exceeds what the method can remove from this model.
    """
    limit = num_layers - 1 if max_removable is None else max_removable
    n = math.ceil(round(ratio * num_layers, 9))  # round() keeps 0.25*28=7.000000001 from becoming 8
    if n > limit:
        raise PruneError(
            f"ratio={ratio} asks for {n} of {num_layers} layers but at most {limit} can be removed; "
            f"use ratio <= {limit / num_layers:.3f}"
        )
    return n


# A per-token statistic of one layer: (x_in[B,T,d], x_out[B,T,d]) -> values[B,T].
TokenStatistic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def mean_layer_statistic(
    adapter: ModelAdapter, calib: CalibrationSet, statistic: TokenStatistic, batch_size: int = 1
) -> list[float]:
    """The statistic averaged over every calibration token, per layer, from one pass of the dense model."""
    n_layers = adapter.num_layers()
    sums = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    device = next(adapter.model.parameters()).device

    def accumulate(i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        sums[i] += statistic(x_in.float(), x_out.float()).sum(dtype=torch.float64).cpu()

    with layer_io(adapter, accumulate):
        for s in tqdm(range(0, len(calib), batch_size), desc="layer statistics", leave=False):
            batch = calib.input_ids[s : s + batch_size].to(device)
            adapter.model.base_model(input_ids=batch, use_cache=False)
            count += batch.numel()
    if count == 0:
        raise PruneError("the calibration set is empty; raise calib.nsamples")
    return (sums / count).tolist()


def lowest(scores: list[float], n: int) -> list[int]:
    """Indices of the `n` lowest scores (ties: the lower index first), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])


def one_shot_plan(method: str, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float,
                  statistic: TokenStatistic, score_name: str, batch_size: int = 1) -> PrunePlan:
    """Score every layer once with `statistic` and remove the ⌈ratio·L⌉ lowest (ShortGPT's procedure)."""
    calib = require_calibration(method, calib)
    n = layers_to_remove(ratio, adapter.num_layers())
    scores = mean_layer_statistic(adapter, calib, statistic, batch_size)
    return PrunePlan(method=method, ratio=ratio, ratio_unit="layers", drop_layers=lowest(scores, n),
                     scores={score_name: scores}, info={"rounding": ROUNDING, "layers_removed": n})


@dataclass(frozen=True)
class LayerRankingOptions(Options):
    """Knobs of a one-shot layer ranking (``conf/method/{shortgpt,relative_magnitude}.yaml``).

    Attributes:
        batch_size: calibration sequences per forward pass.
    """

    batch_size: int = bounded(1, ge=1)


class OneShotLayerRanking(WithOptions[LayerRankingOptions]):
    """Score every layer once with a per-token statistic and remove the ⌈ratio·L⌉ lowest (ShortGPT's
    procedure); subclasses set `name`, `score_name` and `statistic`."""

    name: str
    score_name: str
    statistic: staticmethod
    ratio_unit = "layers"
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        return one_shot_plan(self.name, adapter, calib, ratio, self.statistic, self.score_name,
                             self.options.batch_size)
