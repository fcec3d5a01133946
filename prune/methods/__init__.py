"""Pruning methods. One module per method, named like its ``conf/method/<name>.yaml``.

Contract (`PruningMethod`): ``prune(adapter, calib, ratio) -> PrunePlan``; the class attribute
``ratio_unit`` says what ``ratio`` counts, and ``needs_calibration`` whether ``calib`` must be given.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from prune.data.calibration import CalibrationSet
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


@runtime_checkable
class PruningMethod(Protocol):
    ratio_unit: str
    needs_calibration: bool

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan: ...
