"""Dense: the unpruned model, evaluated under the same protocol (the reference every table needs)."""

from __future__ import annotations

from prune.data.calibration import CalibrationSet
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


class Dense:
    """A no-op method; the ratio is ignored so ``method=dense,shortgpt ratio=0.25`` sweeps work."""

    ratio_unit = "none"
    needs_calibration = False

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        return PrunePlan(method="dense", ratio=0.0, ratio_unit=self.ratio_unit,
                         info={"requested_ratio": ratio})
