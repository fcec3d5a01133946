"""Drop the last k layers before the final one (the "reassessing layer pruning" baseline, Lu et al. 2024).

The final decoder layer is kept because it shapes the output distribution; layers L-1-k .. L-2 go.
Ratio unit: layers, k = ⌈ratio·L⌉, at most L-1.
"""

from __future__ import annotations

from prune.data.calibration import CalibrationSet
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


class LastLayers:
    """Remove the k layers just below the final one; needs no data."""

    ratio_unit = "layers"
    needs_calibration = False

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        n_layers = adapter.num_layers()
        k = layers_to_remove(ratio, n_layers)
        drop = list(range(n_layers - 1 - k, n_layers - 1))
        return PrunePlan(method="last_layers", ratio=ratio, ratio_unit=self.ratio_unit, drop_layers=drop,
                         info={"rounding": ROUNDING, "layers_removed": k})
