"""prune: structured pruning of large language models under one protocol.

Importing the package is cheap; heavy modules (torch, transformers) load on first use.
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """``${dirname:...}``: a Hydra override string made safe as one directory name ("" -> "default")."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("dirname"):
        OmegaConf.register_new_resolver("dirname", lambda s: (s or "default").replace("/", "_")[:200])


_register_resolvers()
