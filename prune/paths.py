"""Where bundled files and caches live."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def bundled(relative: str) -> Path:
    """A file or folder under ``prune/data/files`` (the offline data shipped with the package)."""
    return PACKAGE_ROOT / "data" / "files" / relative


def cache_dir() -> Path:
    """The cache root: ``$PRUNE_CACHE_DIR``, else ``~/.cache/prune``. Safe to delete at any time."""
    root = Path(os.environ.get("PRUNE_CACHE_DIR", Path.home() / ".cache" / "prune"))
    root.mkdir(parents=True, exist_ok=True)
    return root
