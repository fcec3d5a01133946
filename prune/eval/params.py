"""Parameter counts: what "smaller" means, measured on the model in memory."""

from __future__ import annotations

import torch
from torch import nn

from prune.models.adapter import ModelAdapter


def _unique_numel(params: list[nn.Parameter]) -> int:
    # Tied weights (embed_tokens and lm_head) are one tensor: count each storage once.
    seen: dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def count_params(adapter: ModelAdapter) -> dict[str, int]:
    """Total, embedding (input embeddings plus an untied LM head) and non-embedding parameter counts."""
    model = adapter.model
    total = _unique_numel(list(model.parameters()))
    embedding_modules = [*adapter.embeddings(), adapter.lm_head()]
    embedding = _unique_numel([p for m in embedding_modules for p in m.parameters()])
    return {"params/total": total, "params/embedding": embedding, "params/non_embedding": total - embedding}


def removed_fraction(dense: dict[str, int], pruned: dict[str, int]) -> dict[str, float]:
    """Achieved ratios: over all parameters (the papers' usual unit) and over non-embedding ones."""
    return {
        "params/removed_frac": 1.0 - pruned["params/total"] / dense["params/total"],
        "params/removed_frac_non_embedding": 1.0
        - pruned["params/non_embedding"] / dense["params/non_embedding"],
    }


def sparsity(adapter: ModelAdapter) -> dict[str, float | int]:
    """Zeros, a unit apart from removal: ``sparsity/linear`` is the fraction of zeros among the decoder
    layers' ``nn.Linear`` weights (what Wanda's and SparseGPT's codes count as sparsity), ``params/nonzero``
    the non-zero parameters of the whole model (tied weights once) and ``params/nonzero_frac`` their share.
    A dense checkpoint stores the zeros: only a sparse format or kernel turns them into savings."""
    zeros = total = 0
    for layer in adapter.layers():
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    params = {id(p): p for p in adapter.model.parameters()}.values()
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    numel = sum(p.numel() for p in params)
    return {"sparsity/linear": zeros / total if total else 0.0, "params/nonzero": nonzero,
            "params/nonzero_frac": nonzero / numel if numel else 0.0}
