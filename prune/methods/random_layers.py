"""Random layer removal (seeded): the floor any layer-scoring method must beat.

Ratio unit: layers, ⌈ratio·L⌉ removed, chosen uniformly with ``random.Random(seed)``.
"""

from __future__ import annotations

import random

from prune.data.calibration import CalibrationSet
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


class RandomLayers:
    """Remove a seeded random set of layers.

    Args:
        seed: the draw's seed (defaults to the run's ``seed``).
    """

    ratio_unit = "layers"
    needs_calibration = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        n_layers = adapter.num_layers()
        n = layers_to_remove(ratio, n_layers)
        drop = sorted(random.Random(self.seed).sample(range(n_layers), n))
        return PrunePlan(method="random_layers", ratio=ratio, ratio_unit=self.ratio_unit, drop_layers=drop,
                         info={"rounding": ROUNDING, "layers_removed": n, "seed": self.seed})
