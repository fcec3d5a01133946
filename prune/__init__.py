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


def _register_pruned_model_types() -> None:
    """Let ``AutoModelForCausalLM.from_pretrained(saved_dir)`` load pruned models saved by this package.

    Sub-block removal and width pruning save configs with ``model_type="<family>_blockpruned"`` /
    ``"<family>_disp"``, types transformers does not know; `prune.models.export.register_auto_classes` adds
    them to ``AutoConfig`` / ``AutoModelForCausalLM``. That needs torch and transformers, so importing the
    package only arranges it (`prune.models.export.register_on_first_load`): it runs just before the first
    ``AutoConfig.from_pretrained``.
    """
    from prune.models.export import register_on_first_load

    register_on_first_load()


_register_pruned_model_types()
