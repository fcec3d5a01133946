"""Next-token negative log-likelihood without materialising the full ``[B, T, vocab]`` logits.

The decoder's last hidden state goes through the LM head a slice of positions at a time, so peak memory
stays bounded by ``B x chunk x vocab`` floats instead of ``B x T x vocab`` (4 GB for a 2048 x 32000 fp32
batch of 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sequence_nll(
    model: nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor | None = None,
    chunk: int | None = None,
    max_logit_elements: int = 2**27,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and target count per sequence.

    Args:
        model: an HF ``*ForCausalLM``.
        input_ids: LongTensor[B, T].
        target_mask: BoolTensor[B, T]; position t counts as the target predicted from t-1. ``None`` counts
            every position 1..T-1.
        chunk: positions per LM-head slice; ``None`` = as many as keep ``B x chunk x vocab`` within
            ``max_logit_elements`` (512 MB of fp32 by default: one slice per window for small models).

    Returns:
        ``(nll_sum[B], n_targets[B])``, float64 and int64, on the CPU.
    """
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # [B, T-1, d]
    head = model.get_output_embeddings()
    return hidden_nll(head, hidden, input_ids, target_mask, chunk, max_logit_elements)


def hidden_nll(
    head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor | None = None,
    chunk: int | None = None, max_logit_elements: int = 2**27,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_nll` from the decoder's final hidden states ``hidden[B, T-1, d]`` (positions 0..T-2)."""
    if chunk is None:
        chunk = max(1, max_logit_elements // (input_ids.shape[0] * head.weight.shape[0]))
    targets = input_ids[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if target_mask is None else target_mask[:, 1:]
    nll = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for s in range(0, targets.shape[1], chunk):
        logits = head(hidden[:, s : s + chunk]).float()  # [B, c, V]
        tgt = targets[:, s : s + chunk]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        nll += (loss.view_as(tgt) * mask[:, s : s + chunk]).sum(dim=1, dtype=torch.float64)
    return nll.cpu(), mask.sum(dim=1).cpu()


def likely_token_sets(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, sizes: tuple[int, ...],
                      chunk: int = 256) -> list[torch.Tensor]:
    """For each size: the sorted ids of every target token and of the `size` tokens holding the most
    probability mass summed over every position of `hidden` (the vocabulary a lower bound of the NLL should
    cover). One pass of the LM head serves every size; the sets are nested."""
    mass = torch.zeros(head.weight.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[1], chunk):
        mass += torch.softmax(head(hidden[:, s : s + chunk]).float(), dim=-1).sum(dim=(0, 1))
    ranked = mass.argsort(descending=True)
    targets = input_ids[:, 1:].reshape(-1)
    return [torch.unique(torch.cat([ranked[:size], targets])) for size in sizes]  # sorted


def subset_rows(head: nn.Module, subset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight (and bias) rows of a vocabulary subset, for `nll_lower_bound` to reuse."""
    return head.weight[subset], None if head.bias is None else head.bias[subset]


def nll_lower_bound(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                    subset: torch.Tensor,
                    rows: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """Per-sequence mean NLL lower bound from the logits of a vocabulary `subset` holding every target.

    -log p(y) = logsumexp(all logits) - z_y >= logsumexp(subset logits) - z_y, because the subset's
    exponentials are a part of the full sum; it costs |subset| / vocab of the LM head. `rows`: the subset's
    head rows (`subset_rows`) when the caller reuses them. Returns float64[B].
    """
    weight, bias = subset_rows(head, subset) if rows is None else rows
    z = F.linear(hidden, weight, bias).float()  # [B, T-1, |S|]
    targets = input_ids[:, 1:]
    position = torch.searchsorted(subset, targets.contiguous())
    nll = torch.logsumexp(z, dim=-1) - z.gather(-1, position.unsqueeze(-1)).squeeze(-1)
    mask = target_mask[:, 1:]
    return ((nll * mask).sum(dim=1, dtype=torch.float64) / mask.sum(dim=1).clamp_min(1)).cpu()
