"""Random layer removal (seeded): the floor any layer-scoring method must beat.

Ratio unit: layers, ⌈ratio·L⌉ removed, chosen uniformly with ``random.Random(seed)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prune.data.calibration import CalibrationSet
from prune.methods import WithOptions
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.models.adapter import ModelAdapter
from prune.options import Options
from prune.types import PrunePlan


@dataclass(frozen=True)
class RandomLayersOptions(Options):
    """Attributes:
        seed: the draw's seed (``conf/method/random_layers.yaml`` passes the run's ``seed``).
    """

    seed: int = 0


class RandomLayers(WithOptions[RandomLayersOptions]):
    """Remove a seeded random set of layers."""

    ratio_unit = "layers"
    needs_calibration = False

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        n_layers = adapter.num_layers()
        n = layers_to_remove(ratio, n_layers)
        seed = self.options.seed
        drop = sorted(random.Random(seed).sample(range(n_layers), n))
        return PrunePlan(method="random_layers", ratio=ratio, ratio_unit=self.ratio_unit, drop_layers=drop,
                         info={"rounding": ROUNDING, "layers_removed": n, "seed": seed})
