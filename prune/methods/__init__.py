"""Pruning methods. One module per method, named like its ``conf/method/<name>.yaml``.

Contract (`PruningMethod`): ``prune(adapter, calib, ratio) -> PrunePlan``; the class attribute
``ratio_unit`` says what ``ratio`` counts, and ``needs_calibration`` whether ``calib`` must be given.

A method with knobs declares them once, as a frozen `prune.options.Options` dataclass, and derives from
`WithOptions`: Hydra's keyword arguments become ``self.options`` (validated there), which the method reads
and records (``plan.info``, cache keys, error messages).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from prune.data.calibration import CalibrationSet
from prune.models.adapter import ModelAdapter
from prune.options import Options
from prune.types import PrunePlan


@runtime_checkable
class PruningMethod(Protocol):
    ratio_unit: str
    needs_calibration: bool

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan: ...


class WithOptions:
    """A method configured by one `Options` object, built and validated once from its keyword arguments.

    ``method.<knob>`` reads ``method.options.<knob>`` (read-only), so callers that inspect a method's
    settings need not know where they are kept.
    """

    options_type: ClassVar[type[Options]]

    def __init__(self, **options: Any) -> None:
        self.options = self.options_type.parse(options)

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")  # absent while copy/pickle rebuild the object
        if options is None or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(options, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None
