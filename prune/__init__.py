"""prune: structured pruning of large language models under one protocol.

Importing the package is cheap; heavy modules (torch, transformers) load on first use.
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """``${dirname:...}``: a Hydra override string made safe as one directory name ("" -> "default")."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("dirname"):
        OmegaConf.register_new_resolver("dirname", _dirname)


def _dirname(overrides: str) -> str:
    # Long override strings keep a readable head plus a hash of the whole, so two cells never share a folder.
    import hashlib

    name = (overrides or "default").replace("/", "_")
    if len(name) <= 200:
        return name
    return f"{name[:180]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


_register_resolvers()


def _load_blockpruned_checkpoints() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained`` load exported BlockPruner / DISP models.

    Their config has ``model_type="<family>_blockpruned"`` (`prune.models.blocks`) or ``"<family>_disp"``
    (`prune.models.width`). Registering those types imports torch and six HF model classes, so it is
    deferred to the first ``AutoConfig.from_pretrained`` call (which ``AutoModelForCausalLM.from_pretrained``
    makes): that method is wrapped as soon as transformers' auto-config module is imported (now, if it
    already is).
    """
    import functools
    import importlib.abc
    import importlib.util
    import sys
    from types import ModuleType

    target = "transformers.models.auto.configuration_auto"

    def wrap(module: ModuleType) -> None:
        auto = module.AutoConfig
        original = auto.from_pretrained.__func__

        @functools.wraps(original)
        def from_pretrained(cls: type, *args: object, **kwargs: object) -> object:
            from prune.models import blocks, width

            blocks.register()
            width.register()
            return original(cls, *args, **kwargs)

        auto.from_pretrained = classmethod(from_pretrained)

    if target in sys.modules:
        wrap(sys.modules[target])
        return

    class AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: object, target_: object = None) -> object:
            if fullname != target:
                return None
            sys.meta_path.remove(self)  # one-shot; the remaining finders locate the real module
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_then_wrap(module: ModuleType) -> None:
                    exec_module(module)
                    wrap(module)

                spec.loader.exec_module = exec_then_wrap  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, AfterImport())


_load_blockpruned_checkpoints()
