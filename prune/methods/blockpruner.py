"""BlockPruner (Zhong, Wan, Chen, Quan, Li; ACL 2025 Findings, arXiv 2406.10594).

Each decoder layer holds two minimal residual blocks, MHA (pre-norm + attention) and MLP (pre-norm + MLP),
so L layers give 2L candidates (Eq. 1-2). Removing a block deletes the sub-layer with its own norm; the
residual passes through (`prune.models.blocks`). Greedy iterative forward selection (Alg. 1): at step j
every remaining block is scored by the whole model's calibration perplexity with the already removed blocks
and that block removed (Eq. 3),

    PPL = exp( (1/N) Σ_s (1/T_s) Σ_t -log p(x_{s,t} | x_{s,<t}) ),

and the lowest one is removed; ties keep the first candidate in the official order (every MHA block by
ascending layer, then every MLP block). The removal order is a list of nested prefixes; the search stops at
the first step whose removed parameters (over ALL parameters, embeddings included) reach the ratio.

Options: ``block_type`` mix (paper) | mha | mlp; ``score`` ppl (paper) | block_influence |
relative_magnitude (§5.3: the same iterative search with ShortGPT's BI or RM of each block, one forward pass
per step) | nll_per_param (an extension, not in the paper: the block whose removal raises the calibration NLL
least per parameter it removes, for models whose blocks differ in size, e.g. GQA attention); ``search=false``
the one-shot "- search" ablation (the K lowest single-block scores); ``unit=layer`` the "- block" ablation
(whole layers are the candidates; Table 2).

This module names the candidates and the options; the search is `prune.methods.greedy.GreedySearch` (the
loop, its cached and resumable removal order, its cost record), scored by `prune.methods.block_scorers`:
``search_impl=fast`` selects exactly what ``search_impl=plain``, the official loop with a full forward pass
per candidate, selects, several times faster (how: `prune.methods.block_search`). One search serves every
ratio: the order is cached under a key of the model, the calibration tokens and the search options, and saved
after every step (an interrupted search resumes; another ratio reuses or extends it).

Official code followed: github.com/MrGGLS/BlockPruner @ 8210707 (``block_search.py``,
``utils.evaluate_ppl``).

NOTE(faithfulness): the official ``evaluate_ppl`` ignores targets equal to ``config.pad_token_id`` when that
id is truthy; here every target of the calibration set counts (joined-text chunks carry no padding).
NOTE(faithfulness): a layer whose two blocks are both removed is deleted whole (``drop_layers``): the same
function as two removed blocks, with fewer modules.
NOTE(faithfulness): the official search uses batch size 2; ``batch_size`` defaults to 1 here (per-sequence
losses differ between batch sizes only by float rounding; the fast and plain searches share it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prune.data.calibration import CalibrationSet
from prune.methods.block_scorers import LOSS_SCORES, STATISTICS
from prune.methods.block_search import Block, mask_sets
from prune.methods.greedy import GreedyMethod, GreedySearch, SearchOptions, plain_evaluations, plan_sets
from prune.models.adapter import ModelAdapter
from prune.options import bounded
from prune.types import PrunePlan

__all__ = ["LOSS_SCORES", "STATISTICS", "Block", "BlockPruner", "BlockPrunerOptions", "candidate_blocks",
           "mask_sets", "plain_evaluations", "plan_sets"]


@dataclass(frozen=True)
class BlockPrunerOptions(SearchOptions):
    """BlockPruner's options (`BlockPruner` describes each); the engine's come from `SearchOptions`."""

    block_type: Literal["mix", "mha", "mlp"] = "mix"
    score: Literal["ppl", "nll_per_param", "block_influence", "relative_magnitude"] = "ppl"
    search: bool = True
    unit: Literal["block", "layer"] = "block"
    num_blocks: int | None = bounded(None, ge=0)

    def check(self) -> None:
        if self.unit == "layer" and self.block_type != "mix":
            raise self.error("unit", "removes whole layers; set block_type=mix")


def candidate_blocks(num_layers: int, unit: str, block_type: str) -> list[Block]:
    """Every candidate in the official order: all MHA blocks by ascending layer, then all MLP blocks."""
    if unit == "layer":
        return [Block("layer", i) for i in range(num_layers)]
    mha = [Block("mha", i) for i in range(num_layers)] if block_type != "mlp" else []
    mlp = [Block("mlp", i) for i in range(num_layers)] if block_type != "mha" else []
    return mha + mlp


class BlockPruner(GreedyMethod[BlockPrunerOptions]):
    """Greedy removal of attention / MLP blocks by calibration perplexity.

    Options (`BlockPrunerOptions`, validated once; read back as attributes, e.g. ``method.score``):
        block_type: candidate blocks: ``mix`` (MHA and MLP; the paper), ``mha`` or ``mlp`` only.
        score: ``ppl`` (the paper), ``block_influence`` or ``relative_magnitude`` (§5.3 alternatives), or
            ``nll_per_param`` (extension: the rise of Σ mean NLL over the current model's, per removed
            parameter).
        search: iterative greedy search (the paper); ``False`` ranks blocks once ("- search" ablation).
        unit: ``block`` (the paper) or ``layer`` ("- block" ablation: whole layers are the candidates).
        num_blocks: remove exactly this many blocks (overrides the ratio).
        search_impl: ``fast`` (exact speed-ups) or ``plain`` (a full forward pass per candidate).
        batch_size: calibration sequences per forward pass.
        cache: reuse, extend and resume the cached removal order.
        cache_key: identify the model by this string instead of its weight fingerprint.
        cache_device: where the fast search keeps its hidden states (default: the model's device): the
            current model's layer inputs (layers x sequences x seqlen x hidden values) and the candidates'
            kept states (``resume_gb``); ``cpu`` keeps them off the GPU.
        stack_tokens: tokens per layer call of the fast search, which runs candidates that share their
            remaining layers as one stack (1: one candidate at a time).
        resume_gb: memory for the states the candidates keep between steps (all layers when they fit, else
            the layers of the likely removals) and for one step's final states held for the LM heads.
        max_sequences, max_seqlen: search on the first calibration sequences, cut to their first tokens (a
            CPU preset; ``None`` = all, the paper).
    """

    name = "blockpruner"
    ratio_unit = "params"

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        o = self.options
        search = GreedySearch(
            method=self.name, ratio_unit=self.ratio_unit, options=o,
            candidates=candidate_blocks(adapter.num_layers(), o.unit, o.block_type), count=o.num_blocks,
            unit=o.unit, block_type=o.block_type, score=o.score, iterative=o.search, on_step=self.on_step)
        return search.run(adapter, calib, ratio)
