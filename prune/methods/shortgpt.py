"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect").

Block Influence of layer i: BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)], the expected cosine similarity between a
layer's input and output hidden state over calibration tokens. The layers with the lowest BI are removed in
one shot (no re-scoring). Ratio unit: layers, ⌈ratio·L⌉ removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prune.methods.layer_common import OneShotLayerRanking


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """1 - cos(x_in, x_out) per token: Tensor[B, T]."""
    return 1.0 - F.cosine_similarity(x_in, x_out, dim=-1)


class ShortGPT(OneShotLayerRanking):
    """Remove the layers with the lowest Block Influence."""

    name, score_name = "shortgpt", "block_influence"
    statistic = staticmethod(block_influence)
