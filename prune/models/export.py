"""Pruned models that stock HF calls save and reload: one derived HF type per structural edit and family.

A structural edit (sub-blocks removed: `prune.models.blocks`; widths pruned: `prune.models.width`) leaves
modules that a stock ``LlamaForCausalLM`` cannot rebuild from its config. An edit module declares the edit
once, as an `Edit` passed to `declare`; for every family in `LAYOUTS` this module then derives:

- ``<Stock><tag>Config``: the stock config plus the edit's fields (``pruned_attn_layers``, ...). Its
  ``model_type`` is ``<family><suffix>`` on the class (what config.json records and the Auto classes key on)
  and the family's own on instances, so adapters and transformers internals keyed on an instance's
  ``config.model_type`` treat the model as the architecture it is.
- ``<Stock><tag>ForCausalLM``: builds the stock model, then ``edit.rebuild`` redoes the edit the config
  records; ``save_pretrained`` first re-reads the fields from the modules (``edit.record``), so a later
  edit (layers dropped since) cannot leave them stale.

`convert` makes an edited model its derived type. `register_auto_classes` adds every derived type to
``AutoConfig`` / ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(saved_dir)`` rebuilds a
pruned model with no ``trust_remote_code``; ``import prune`` calls `register_on_first_load`, which runs it
just before the first ``AutoConfig.from_pretrained``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from prune.models.families import LAYOUTS, Layout

if TYPE_CHECKING:
    from torch import nn

# The modules whose import declares an edit (`declare`); a new structural edit adds its module here.
EDIT_MODULES = ("prune.models.blocks", "prune.models.width", "prune.models.rotation")


@dataclass(frozen=True)
class Edit:
    """A structural edit that a saved model replays on load.

    Attributes:
        suffix: appended to the family's ``model_type`` in config.json (``"_blockpruned"``).
        tag: the part of the class names after the stock prefix (``LlamaBlockPrunedForCausalLM``).
        fields: the config fields that record the edit, name -> annotation; ``None`` by default.
        rebuild: ``rebuild(model, layout, config)`` redoes the edit on a freshly built stock model.
        record: ``record(model, layout)`` -> the fields' values, read from the modules.
        module: the module the derived classes are published in, by name (pickle finds them there).
    """

    suffix: str
    tag: str
    fields: dict[str, str]
    rebuild: Callable[[nn.Module, Layout, Any], None]
    record: Callable[[nn.Module, Layout], dict[str, Any]]
    module: str


_EDITS: dict[str, Edit] = {}  # by suffix
_CLASSES: dict[tuple[str, str], tuple[type, type]] = {}  # (family, suffix) -> (config class, model class)


def declare(edit: Edit) -> Edit:
    """Make `edit` one that `register_auto_classes` registers for every family; returns it."""
    _EDITS[edit.suffix] = edit
    return edit


class _ModelType:
    """``model_type`` of a derived config: ``<family><suffix>`` on the class, the family's on instances."""

    def __init__(self, family: str, suffix: str) -> None:
        self.family, self.suffix = family, suffix

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        return self.family if obj is not None else self.family + self.suffix

    def __set__(self, obj: Any, value: str) -> None:
        """Loading passes config.json's ``model_type`` back as a keyword: the type is fixed, keep it."""


def derived_classes(family: str, edit: Edit) -> tuple[type, type]:
    """(config class, causal-LM class) of ``<family><edit.suffix>``, built once from the stock classes."""
    if (family, edit.suffix) in _CLASSES:
        return _CLASSES[family, edit.suffix]
    layout = LAYOUTS[family]
    base_config, base_model = layout.hf_classes()
    config_cls = type(
        layout.hf_name + edit.tag + "Config",
        (base_config,),
        {"__module__": edit.module, "__doc__": f"{layout.config_class} plus {', '.join(edit.fields)}.",
         "model_type": _ModelType(family, edit.suffix), "__annotations__": dict(edit.fields)}
        | dict.fromkeys(edit.fields),
    )

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base_model.__init__(self, config, *args, **kwargs)
        edit.rebuild(self, layout, config)

    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        for name, value in edit.record(self, layout).items():  # the modules are the truth
            setattr(self.config, name, value)
        return base_model.save_pretrained(self, *args, **kwargs)

    model_cls = type(
        layout.hf_name + edit.tag + "ForCausalLM",
        (base_model,),
        {"__module__": edit.module, "config_class": config_cls, "__init__": __init__,
         "save_pretrained": save_pretrained,
         "__doc__": f"{layout.model_class} rebuilt with the edit its config records ({edit.tag})."},
    )
    for cls in (config_cls, model_cls):
        setattr(sys.modules[edit.module], cls.__name__, cls)
    _CLASSES[family, edit.suffix] = (config_cls, model_cls)
    return config_cls, model_cls


def convert(model: nn.Module, edit: Edit, **fields: Any) -> None:
    """Make an edited stock model (or an already derived one) the derived type of `edit`, recording `fields`.

    The classes change in place, so every module holding this config object sees the new type.
    """
    config_cls, model_cls = derived_classes(model.config.model_type, edit)
    register_auto_classes()
    model.config.__class__ = config_cls
    for name, value in fields.items():
        setattr(model.config, name, value)
    model.__class__ = model_cls


_REGISTERED = False


def register_auto_classes() -> None:
    """Add the derived type of every declared edit and family to ``AutoConfig`` / ``AutoModelForCausalLM``.

    That is what lets ``AutoModelForCausalLM.from_pretrained`` load a saved pruned model (config.json says
    ``model_type="<family>_blockpruned"`` or ``"<family>_disp"``). It imports torch and the families' HF
    model classes; idempotent.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in EDIT_MODULES:
        importlib.import_module(name)  # runs its `declare`
    for edit in _EDITS.values():
        for family in LAYOUTS:
            config_cls, model_cls = derived_classes(family, edit)
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _REGISTERED = True


_AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"


def register_on_first_load() -> None:
    """Run `register_auto_classes` just before the first ``AutoConfig.from_pretrained`` (``import prune``).

    Registering imports torch and six HF model classes (seconds), which ``import prune`` must not pay:
    instead ``AutoConfig.from_pretrained`` (which ``AutoModelForCausalLM.from_pretrained`` calls) is wrapped
    to register first, as soon as transformers' auto-config module is imported (now, if it already is).
    """
    if _AUTO_CONFIG_MODULE in sys.modules:
        _register_before_from_pretrained(sys.modules[_AUTO_CONFIG_MODULE])
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _register_before_from_pretrained(module: ModuleType) -> None:
    auto = module.AutoConfig
    original = auto.from_pretrained.__func__
    if getattr(original, "registers_pruned_types", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        register_auto_classes()
        return original(cls, *args, **kwargs)

    from_pretrained.registers_pruned_types = True  # type: ignore[attr-defined]
    auto.from_pretrained = classmethod(from_pretrained)


class _AfterImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: wraps ``AutoConfig.from_pretrained`` once transformers' module has run."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> Any:
        if fullname != _AUTO_CONFIG_MODULE:
            return None
        sys.meta_path.remove(self)  # the remaining finders locate the real module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_wrap(module: ModuleType) -> None:
                exec_module(module)
                _register_before_from_pretrained(module)

            spec.loader.exec_module = exec_then_wrap  # type: ignore[method-assign]
        return spec
