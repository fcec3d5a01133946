"""Pruning methods. One module per method, named like its ``conf/method/<name>.yaml``.

Contract (`PruningMethod`): ``prune(adapter, calib, ratio) -> PrunePlan``; the class attribute
``ratio_unit`` says what ``ratio`` counts, and ``needs_calibration`` whether ``calib`` must be given.

A method with knobs declares them once, as a frozen `prune.options.Options` dataclass, and derives from
``WithOptions[ThatClass]``: Hydra's keyword arguments become ``self.options`` (validated there), which the
method reads and records (``plan.info``, cache keys, error messages). `require_calibration` is the one
check of a method that cannot run with ``calib=null``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Protocol, TypeVar, get_args, get_origin, runtime_checkable

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.models.adapter import ModelAdapter
from prune.options import Options
from prune.types import PrunePlan

OptionsT = TypeVar("OptionsT", bound=Options)


@runtime_checkable
class PruningMethod(Protocol):
    ratio_unit: str
    needs_calibration: bool

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan: ...


def require_calibration(method: str, calib: CalibrationSet | None) -> CalibrationSet:
    """`calib`, or the error of a method that needs calibration data run with ``calib=null``."""
    if calib is None:
        raise PruneError(f"{method} needs calibration data; do not set calib=null")
    return calib


class WithOptions(Generic[OptionsT]):
    """A method configured by one `Options` object, built and validated once from its keyword arguments.

    ``class Disp(WithOptions[DispOptions])`` names the options class once: the constructor parses Hydra's
    keyword arguments into ``self.options`` (typed as that class). ``method.<knob>`` reads
    ``method.options.<knob>`` (read-only), so callers that inspect a method's settings need not know where
    they are kept.
    """

    options_type: ClassVar[type[Options]]
    options: OptionsT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # WithOptions[XOptions] (or a generic subclass such as GreedyMethod[XOptions]) among the bases
        for base in cls.__dict__.get("__orig_bases__", ()):
            origin, args = get_origin(base), get_args(base)
            if isinstance(origin, type) and issubclass(origin, WithOptions) and args \
                    and isinstance(args[0], type):
                cls.options_type = args[0]

    def __init__(self, **options: Any) -> None:
        self.options = self.options_type.parse(options)  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")  # absent while copy/pickle rebuild the object
        if options is None or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(options, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None
