"""Typed method options: one frozen dataclass per method, checked once where the values enter.

A method declares its knobs as a frozen dataclass deriving from `Options`; `Literal[...]` annotations are
the allowed choices, `bounded(...)` fields carry their ranges. Building the dataclass validates every field
(choices, types, ranges, then the class's own `check` for rules that tie fields together) and raises a
`PruneError` naming ``method.<field>`` and what to pass instead. The same object then feeds the plan's
``info["options"]`` (`as_dict`), cache keys and error messages, so a knob is named in one place only::

    @dataclass(frozen=True)
    class MyOptions(Options):
        score: Literal["ppl", "loss"] = "ppl"
        steps: int = bounded(100, ge=0)

        def check(self) -> None:
            if self.score == "loss" and self.steps == 0:
                raise self.error("steps", "must be >= 1 with score=loss")

    class MyMethod:
        def __init__(self, **options: Any) -> None:
            self.options = MyOptions.parse(options)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from prune.errors import PruneError

OptionsT = TypeVar("OptionsT", bound="Options")


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with a range; ``None`` values are not range-checked."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every method's options (see the module docstring)."""

    prefix: ClassVar[str] = "method"  # how fields are named in messages: method.<field>

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerced(getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            self._check_type(f.name, value, hints[f.name])
            self._check_range(f, value)
        self.check()

    @classmethod
    def parse(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
        """The options from a mapping (Hydra's keyword arguments); unknown names are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise PruneError(f"{cls.prefix}.{unknown[0]} is not an option here; the options are "
                             f"{', '.join(names)}")
        return cls(**values)

    def check(self) -> None:
        """Rules between fields; raise `error(...)` when one is broken."""

    def error(self, name: str, problem: str) -> PruneError:
        return PruneError(f"{self.prefix}.{name}={getattr(self, name)!r} {problem}")

    def as_dict(self, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """Field values as a JSON-able dict (plan info, cache keys)."""
        fields = dataclasses.fields(self)
        return {f.name: _plain(getattr(self, f.name)) for f in fields if f.name not in exclude}

    # ---- checks ---------------------------------------------------------------------------------------

    def _check_type(self, name: str, value: Any, hint: Any) -> None:
        allowed = _alternatives(hint)
        if value is None:
            if type(None) not in allowed:
                raise self.error(name, "must be set (null is not allowed)")
            return
        choices = [a for alt in allowed if get_origin(alt) is Literal for a in get_args(alt)]
        if choices and value in choices and type(value) in {type(c) for c in choices}:
            return
        if any(_is_instance(value, alt) for alt in allowed if get_origin(alt) is not Literal):
            return
        if choices:
            raise self.error(name, f"is not one of {', '.join(map(str, choices))}")
        expected = " or ".join(getattr(a, "__name__", str(a)) for a in allowed if a is not type(None))
        raise self.error(name, f"must be {_article(expected)}")

    def _check_range(self, f: dataclasses.Field, value: Any) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        rules = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
                 "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
        for key, (holds, sign) in rules.items():
            bound = f.metadata.get(key)
            if bound is not None and not (holds(value, bound) and not math.isnan(value)):
                raise self.error(f.name, f"must be {sign} {bound}")


def _alternatives(hint: Any) -> tuple[Any, ...]:
    if get_origin(hint) in (Union, types.UnionType):
        return get_args(hint)
    return (hint,)


def _is_instance(value: Any, hint: Any) -> bool:
    origin = get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        inner = get_args(hint)
        items_ok = not inner or all(_is_instance(v, inner[0]) for v in value)
        return isinstance(value, (list, tuple)) and items_ok
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, origin) if isinstance(origin, type) else True


def _coerced(value: Any, hint: Any) -> Any:
    """Hydra hands over ListConfig / DictConfig: plain Python values in their place (values are not
    otherwise converted, so an int given for a float keeps its JSON form in cache keys)."""
    if hasattr(value, "_metadata"):  # an OmegaConf container
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, list) and any(get_origin(a) is tuple for a in _alternatives(hint)):
        value = tuple(value)
    return value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _article(expected: str) -> str:
    return f"an {expected}" if expected[:1] in "aeiou" else f"a {expected}"
