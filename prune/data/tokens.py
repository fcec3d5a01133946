"""Tokenise once, cache by content hash.

The cache key covers the tokenizer (its serialised vocabulary and rules) and the exact text, so a changed
tokenizer or text never reuses stale ids.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from prune.paths import cache_dir
from prune.store import atomic_target


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{tokenizer.name_or_path}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's values (recorded in the provenance of every run)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def encode_cached(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor, from the cache when the same text was seen before."""
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}\n".encode() + text.encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    ids = torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)
    with atomic_target(path) as tmp:
        torch.save(ids, tmp)
    return ids
