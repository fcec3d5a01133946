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

Speed-ups (exact: ``search_impl=fast`` selects what ``search_impl=plain``, the official loop with a full
forward pass per candidate, selects; both compute every complete score with the same arithmetic per
sequence):
- The hidden state entering every layer is cached once per step for every calibration batch (forward
  pre-hooks). A candidate at layer i runs the model's own forward with layers < i swapped for a stub that
  outputs the cached state, so masks and position embeddings come from HF and only layers i..L-1 and the
  head run. After a step only the states after the removed block's layer are refreshed.
- Each candidate keeps its own state entering every layer above its own (or, past the ``resume_gb`` budget,
  the layers of the likely removals). When the removed block sits at layer g, the layers below g are
  unchanged for every candidate below it, so next step they restart at g.
- Past its own layer a candidate runs the current model's layers, the same for all of them: the fast search
  runs the decoder layer by layer with every candidate that reached the layer in one stack (``stack_tokens``
  per call). Rows of a stack do not interact; on CPU the values are bitwise those of one candidate at a time
  (the tests check it), larger matrix products are just faster (1.15x per token on one thread, 1.5x on two,
  for SmolLM2 at 64 tokens; more on a GPU). On a GPU, kernels may round differently for another batch size.
- The score is a sum of non-negative per-sequence terms, added in the same order as in the plain search: a
  candidate stops once a lower bound of its partial sum exceeds the best complete score of the step. The
  candidate with the best previous-step score (bound for a stopped one) is scored first, alone, so the others
  can stop.
- The LM head on a vocabulary subset (the targets and the 4096 tokens of most probability mass under the
  current model) bounds each batch's NLL from below (logsumexp over a subset <= over all). After each
  calibration batch, candidates whose bounds already lose stop (their later batches are not run). The
  survivors, mostly within ~1% of the best, get a tighter bound from 16384 tokens; only those it does not
  stop run full LM heads (on a 49k-token vocabulary the head costs ~8 of SmolLM2's 30 layers per token).

One search serves every ratio: the order is cached in `prune.paths.cache_dir`/blockpruner under a key of the
model (its config plus name, shape, dtype and 64 strided values of every weight tensor, which is cheap even
for 7B models; or ``cache_key``), the calibration tokens (the hash of ``input_ids``, i.e.
``info["tokens_hash"]``, and of the target mask), dtype, device, batch size and the search options. The file
is rewritten atomically after every step: an interrupted search resumes, and a run with another ratio
extends the order only if it needs more steps.

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

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.data.tokens import tensor_hash
from prune.errors import PruneError
from prune.eval.nll import hidden_nll, likely_token_sets, nll_lower_bound, subset_rows
from prune.eval.params import count_params
from prune.methods.relative_magnitude import relative_magnitude
from prune.methods.shortgpt import block_influence
from prune.models import blocks
from prune.models.adapter import ModelAdapter
from prune.paths import cache_dir
from prune.types import PrunePlan

log = logging.getLogger(__name__)

Block = tuple[str, int]  # ("mha" | "mlp" | "layer", dense layer index)
STATISTICS = {"block_influence": block_influence, "relative_magnitude": relative_magnitude}
# Scores computed from the calibration loss of the model with the candidate removed (the search's passes).
LOSS_SCORES = ("ppl", "nll_per_param")
CACHE_VERSION = 1
STEP_COUNTERS = ("evaluations", "completed", "aborted", "bound_stops", "full_heads", "layer_passes",
                 "sequence_passes", "cache_layer_passes")
# Vocabulary subset of the loss lower bound: the targets and the tokens of most probability mass under the
# current model (8% of SmolLM2's LM head, 12.5% of Llama-2's). Measured on the reference model (2 x 64 Alpaca
# tokens, step 1): it leaves ~1% between bound and loss; the bound alone rules out 57 of the 60 candidates
# (the top 8 tokens per position: 8 of 60).
BOUND_VOCAB = 4096
# The second bound, for candidates the first leaves (those within ~1% of the best): a third of SmolLM2's head,
# ~0.1% from the loss on the same data. Both subsets' head rows are kept per batch (gathering 16384 rows costs
# as much as the bound itself; 38 MB a batch for SmolLM2, 134 MB for Llama-2-7B in bf16).
FINE_BOUND_VOCAB = 16384
BOUND_MARGIN = 1e-3  # nats per sequence subtracted from the bound: ~1000x the float32 rounding of a mean NLL


def candidate_blocks(num_layers: int, unit: str, block_type: str) -> list[Block]:
    """Every candidate in the official order: all MHA blocks by ascending layer, then all MLP blocks."""
    if unit == "layer":
        return [("layer", i) for i in range(num_layers)]
    mha = [("mha", i) for i in range(num_layers)] if block_type != "mlp" else []
    mlp = [("mlp", i) for i in range(num_layers)] if block_type != "mha" else []
    return mha + mlp


def mask_sets(removed: list[Block]) -> tuple[set[int], set[int]]:
    """(layers without attention, layers without MLP) for a set of removed blocks."""
    attn = {i for kind, i in removed if kind in ("mha", "layer")}
    return attn, {i for kind, i in removed if kind in ("mlp", "layer")}


def plan_sets(removed: list[Block]) -> tuple[list[int], list[int], list[int]]:
    """(layers deleted whole, layers losing only attention, layers losing only the MLP) for removed blocks:
    a layer whose both blocks are gone is deleted whole (the same function)."""
    attn, mlp = mask_sets(removed)
    whole = attn & mlp
    return sorted(whole), sorted(attn - whole), sorted(mlp - whole)


def plain_evaluations(num_candidates: int, first_step: int, steps: int) -> int:
    """Evaluations of the plain greedy search for steps first_step+1..first_step+steps: Σ (C - j + 1)."""
    return sum(num_candidates - j for j in range(first_step, first_step + steps))


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the weights: the config; name, shape, dtype, 64 strided values of each tensor."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "architectures")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class _Replay(nn.Module):
    """Stands in for the layers before a candidate: outputs the cached hidden state entering its layer."""

    def __init__(self, hidden: torch.Tensor, template: Any) -> None:
        super().__init__()
        self.hidden, self.template = hidden, template

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.hidden if self.template is None else ModelAdapter.with_hidden(self.template, self.hidden)


class _LayerDone(Exception):
    """Raised by a forward hook to end the model's forward pass after one layer (`_Search.layer_output`)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Search:
    """Scoring over one model and calibration set: full passes (plain) and cached-prefix passes (fast)."""

    def __init__(self, adapter: ModelAdapter, calib: CalibrationSet, batch_size: int,
                 cache_device: str | None, stack_tokens: int = 1) -> None:
        self.adapter, self.model = adapter, adapter.model
        self.stack_tokens = stack_tokens  # tokens per stacked layer call of the fast search (`run_layer`)
        self.device = next(self.model.parameters()).device
        self.num_layers, self.num_seq = adapter.num_layers(), len(calib)
        self.batches = [
            (calib.input_ids[s : s + batch_size].to(self.device),
             calib.target_mask[s : s + batch_size].to(self.device))
            for s in range(0, len(calib), batch_size)
        ]
        self.cache_device = torch.device(cache_device) if cache_device else self.device
        self.inputs: list[list[torch.Tensor | None]] | None = None  # [batch][layer]: the state entering it
        self.stale_from: int | None = None  # layer whose block was removed since the inputs were cached
        self.template: Any = None  # a decoder layer's output, when it is a tuple (older transformers)
        self.dense_total: float | None = None  # Σ terms of the dense model (logged as its calibration PPL)
        # Per candidate and batch: {g: the state entering layer g with that candidate removed}, kept from its
        # last evaluation. Valid while every removal since then sits at a layer >= g.
        self.resume: dict[Block, dict[int, dict[int, torch.Tensor]]] = {}
        self.head = self.model.get_output_embeddings()
        # Per batch: every target token and the BOUND_VOCAB tokens of most probability mass under the current
        # model (refreshed with the cached inputs), sorted, with their LM-head rows; the head on these rows
        # alone bounds a candidate's loss from below (`lower_bound`). The FINE_BOUND_VOCAB set tightens the
        # bound of candidates the first one does not stop.
        self.subsets: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]] = []
        self.fine_subsets: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]] = []

    @contextmanager
    def removed(self, removed_blocks: list[Block]) -> Iterator[None]:
        with blocks.masked(self.adapter, *mask_sets(removed_blocks)):
            yield

    def terms(self, b: int) -> list[float]:
        """Per-sequence mean NLL of batch b under the model as it stands (float64 values)."""
        return self.terms_from(b, self.final_hidden(b))

    def final_hidden(self, b: int) -> torch.Tensor:
        """The decoder's normed output for batch b at positions 0..T-2 (what the LM head reads)."""
        return self.model.base_model(input_ids=self.batches[b][0], use_cache=False).last_hidden_state[:, :-1]

    def terms_from(self, b: int, hidden: torch.Tensor) -> list[float]:
        """`terms` from `final_hidden` (the same arithmetic as `sequence_nll`)."""
        ids, mask = self.batches[b]
        nll, count = hidden_nll(self.head, hidden, ids, mask)
        return (nll / count.clamp_min(1)).tolist()

    def lower_bound(self, b: int, hidden: torch.Tensor, fine: bool = False) -> float:
        """A lower bound of Σ terms of batch b from the LM-head rows of the batch's likely tokens, less a
        margin far above float rounding (so a candidate is never stopped by rounding)."""
        ids, mask = self.batches[b]
        subset, rows = self.fine_subsets[b] if fine else self.subsets[b]
        bounds = nll_lower_bound(self.head, hidden, ids, mask, subset, rows)
        return max(float(bounds.sum()) - BOUND_MARGIN * len(ids), 0.0)  # the terms are >= 0 anyway

    def refine(self, finals: list[torch.Tensor], bounds: list[float],
               stop: Callable[[float], bool]) -> tuple[list[float], bool]:
        """Tighter bounds (the FINE_BOUND_VOCAB subset) for a candidate that survived the first ones, batch
        by batch. Returns (the bounds, True) or, once their sum loses, (the bounds so far, False)."""
        bounds = list(bounds)
        for b, final in enumerate(finals):
            if len(self.fine_subsets[b][0]) > len(self.subsets[b][0]):
                bounds[b] = max(bounds[b], self.lower_bound(b, final, fine=True))
                if stop(sum(bounds)):
                    return bounds, False
        return bounds, True

    def full_score(self) -> float:
        """Σ_s mean NLL_s over every sequence, in sequence order (the plain search's score)."""
        total = 0.0
        for b in range(len(self.batches)):
            for t in self.terms(b):
                total += t
        return total

    @contextmanager
    def start_at(self, layer: int, b: int, hidden: torch.Tensor | None = None) -> Iterator[None]:
        """Layers before `layer` swapped for a stub emitting `hidden` (default: the current model's cached
        input of `layer` for batch b)."""
        if layer == 0:
            yield
            return
        if hidden is None:
            assert self.inputs is not None
            hidden = self.inputs[b][layer]
        assert hidden is not None
        layers = self.adapter.layers()
        stub = _Replay(hidden.to(self.device), self.template)
        originals = [layers[k] for k in range(layer)]
        for k in range(layer):
            layers[k] = stub
        try:
            yield
        finally:
            for k, module in enumerate(originals):
                layers[k] = module

    def capture(self, start: int, with_head: bool) -> float | None:
        """Cache the inputs of layers after `start` (all layers when start is 0) for the current model.

        Returns Σ terms when `with_head` (the model's calibration score comes with the pass), else None.
        """
        if self.inputs is None:
            self.inputs = [[None] * self.num_layers for _ in self.batches]
        self.stale_from = None
        if start >= self.num_layers - 1 and not with_head:  # no layer after it: nothing changed (the
            return None                                       # bound's vocabulary stays a step older)
        store, current = self.inputs, [0]
        first = start + 1 if start > 0 else 0

        def keep_input(k: int) -> Callable:
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                state = self.adapter.layer_input(args, kwargs).detach()
                store[current[0]][k] = state.to(self.cache_device, copy=True)
            return hook

        def keep_template(_m: nn.Module, _a: tuple, _k: dict, out: Any) -> None:
            self.template = out if isinstance(out, tuple) else None

        layers = self.adapter.layers()
        handles = [layers[k].register_forward_pre_hook(keep_input(k), with_kwargs=True)
                   for k in range(first, self.num_layers)]
        handles.append(layers[self.num_layers - 1].register_forward_hook(keep_template, with_kwargs=True))
        total, self.subsets, self.fine_subsets = 0.0, [], []
        try:
            for b in range(len(self.batches)):
                current[0] = b
                with self.start_at(start, b):
                    hidden = self.final_hidden(b)
                if with_head:
                    for t in self.terms_from(b, hidden):
                        total += t
                coarse, fine = likely_token_sets(self.head, hidden, self.batches[b][0],
                                                 (BOUND_VOCAB, FINE_BOUND_VOCAB))
                self.subsets.append((coarse, subset_rows(self.head, coarse)))
                self.fine_subsets.append((fine, subset_rows(self.head, fine)))
        finally:
            for h in handles:
                h.remove()
        return total if with_head else None

    def ensure_inputs(self, stats: dict[str, Any]) -> float | None:
        """Build or refresh the cached layer inputs for the current model; a full build returns Σ terms."""
        if self.inputs is None:
            stats["cache_layer_passes"] += self.num_layers * self.num_seq
            return self.capture(0, with_head=True)
        if self.stale_from is not None:
            stats["cache_layer_passes"] += (self.num_layers - self.stale_from) * self.num_seq
            self.capture(self.stale_from, with_head=False)
        return None

    def keep_layers(self, ranked: list[Block], budget_bytes: float) -> set[int]:
        """Layers whose entering states every candidate keeps for the next step (`resume`).

        All layers when the states fit in `budget_bytes`; otherwise the layers of the best-ranked candidates
        (the likely removals), as many as fit.
        """
        def cost(layer: int) -> int:  # every candidate below `layer` keeps one state entering it
            return self.state_bytes() * sum(c[1] < layer for c in ranked)

        if sum(cost(g) for g in range(1, self.num_layers)) <= budget_bytes:
            return set(range(1, self.num_layers))
        kept: set[int] = set()
        for layer in dict.fromkeys(c[1] for c in ranked):
            if layer > 0 and sum(cost(g) for g in kept | {layer}) <= budget_bytes:
                kept.add(layer)
        return kept

    def state_bytes(self) -> int:
        """Bytes of one candidate's hidden states over the calibration set (one layer)."""
        tokens = sum(ids.numel() for ids, _ in self.batches)
        return tokens * self.model.config.hidden_size * self.head.weight.element_size()

    def groups(self, candidates: list[Block], budget_bytes: float) -> list[list[Block]]:
        """`candidates` in consecutive groups whose final states (`decode`) fit in `budget_bytes`."""
        size = max(1, int(budget_bytes // self.state_bytes()))
        return [candidates[s : s + size] for s in range(0, len(candidates), size)]

    def decode(self, candidates: list[Block], beaten: Callable[[Block, float], bool] | None,
               stats: dict[str, Any], keep: set[int]) -> tuple[dict[Block, list], dict[Block, list[float]]]:
        """Every candidate's final hidden states, batch by batch (`advance`), with loss lower bounds.

        After each batch a candidate whose summed bounds are already `beaten` is dropped (its states are not
        returned; its later batches are not run). Returns (finals per batch, bounds per batch) by candidate.
        """
        bounded = beaten is not None and bool(self.subsets)
        alive, finals = list(candidates), {c: [] for c in candidates}
        bounds: dict[Block, list[float]] = {c: [] for c in candidates}
        for b in range(len(self.batches)):
            if not alive:
                break
            for c, final in self.advance(alive, b, keep, stats).items():
                finals[c].append(final)
                if bounded:
                    bounds[c].append(self.lower_bound(b, final))
            stats["sequence_passes"] += len(alive) * len(self.batches[b][0])
            if bounded:
                lost = [c for c in alive if beaten(c, sum(bounds[c]))]  # type: ignore[misc]
                for c in lost:
                    del finals[c]
                stats["bound_stops"] += len(lost)
                alive = [c for c in alive if c not in lost]
        return finals, bounds

    def head_score(self, finals: list[torch.Tensor], bounds: list[float],
                   stop: Callable[[float], bool] | None) -> tuple[float, bool]:
        """Σ terms from a candidate's final states, full LM heads in batch order (the plain search's
        arithmetic), stopping once the exact partial sum plus the remaining bounds loses.
        Returns (the sum, True) or, when stopped, (a lower bound of the sum, False)."""
        total = 0.0
        for b, final in enumerate(finals):
            for t in self.terms_from(b, final):
                total += t
            rest = sum(bounds[b + 1 :])
            if stop is not None and b < len(finals) - 1 and stop(total + rest):
                return total + rest, False
        return total, True

    def advance(self, candidates: list[Block], b: int, keep: set[int],
                stats: dict[str, Any]) -> dict[Block, torch.Tensor]:
        """Run batch b through the decoder with each candidate removed; return their normed final states.

        A candidate starts at its own layer from the current model's cached input, or further on from its
        own state kept by an earlier step (`resume`). Past its own layer a candidate runs the current model's
        layers, the same for every candidate, so layer by layer the candidates that reached it run as one
        stack (rows are independent: the same values as one candidate at a time). States entering the `keep`
        layers are kept for the next step.
        """
        kept = {c: self.resume.setdefault(c, {}).setdefault(b, {}) for c in candidates}
        start = {c: max(kept[c], default=c[1]) for c in candidates}
        frontier: dict[Block, torch.Tensor] = {}
        for m in range(min(start.values()), self.num_layers):
            frontier |= {c: kept[c][m] for c in candidates if start[c] == m > c[1]}
            outputs = self.run_layer(m, b, frontier, stats) if frontier else {}
            for c in [c for c in candidates if start[c] == m == c[1]]:  # its own layer, with c removed
                with self.removed([c]):
                    outputs |= self.run_layer(m, b, {c: None}, stats)
            frontier = outputs
            if m + 1 in keep:
                for c, state in frontier.items():
                    kept[c][m + 1] = state.to(self.cache_device)
        return frontier

    def run_layer(self, m: int, b: int, states: dict[Block, torch.Tensor | None],
                  stats: dict[str, Any]) -> dict[Block, torch.Tensor]:
        """The states leaving layer m for batch b, one per candidate (``None``: the current model's cached
        input of layer m); after the last layer, the normed final states at positions 0..T-2."""
        ids, last = self.batches[b][0], m == self.num_layers - 1
        names, out = list(states), []
        per_call = max(1, self.stack_tokens // ids.numel())
        for s in range(0, len(names), per_call):
            chunk = [states[c] for c in names[s : s + per_call]]
            hidden = None if chunk[0] is None else torch.cat([h.to(self.device) for h in chunk])
            stack = ids.repeat(len(chunk), 1)
            with self.start_at(m, b, hidden):
                if last:
                    final = self.model.base_model(input_ids=stack, use_cache=False).last_hidden_state
                    out.append(final[:, :-1])
                else:
                    out.append(self.layer_output(m, stack))
            stats["layer_passes"] += len(stack)
        return dict(zip(names, (out[0] if len(out) == 1 else torch.cat(out)).split(len(ids))))

    def layer_output(self, m: int, ids: torch.Tensor) -> torch.Tensor:
        """The model's forward on `ids`, stopped after layer m: the state leaving it."""
        def stop(_m: nn.Module, _a: tuple, _k: dict, output: Any) -> None:
            raise _LayerDone(self.adapter.hidden(output))

        handle = self.adapter.layer(m).register_forward_hook(stop, with_kwargs=True)
        try:
            self.model.base_model(input_ids=ids, use_cache=False)
        except _LayerDone as done:
            return done.hidden
        finally:
            handle.remove()
        raise AssertionError(f"layer {m} never ran")

    def removed_at(self, block: Block) -> None:
        """`block` was removed: kept states entering layers after it are stale, and its own are useless."""
        self.resume.pop(block, None)
        for per_batch in self.resume.values():
            for kept in per_batch.values():
                for g in [g for g in kept if g > block[1]]:
                    del kept[g]

    def statistics(self, candidates: list[Block], statistic: Callable) -> dict[Block, float]:
        """Mean per-token BI / RM of each candidate block (or layer) in the current model; one pass.

        A block's input x is its norm's input and its output x + f, f being its output projection's
        result; a layer's are the layer's own input and output.
        """
        sums = {c: torch.zeros((), dtype=torch.float64) for c in candidates}
        seen: dict[Block, torch.Tensor] = {}
        a, count = self.adapter, 0

        def remember(c: Block) -> Callable:
            return lambda _m, args, kwargs: seen.__setitem__(c, a.layer_input(args, kwargs))

        def accumulate(c: Block) -> Callable:
            def hook(_m: nn.Module, _a: tuple, _k: dict, out: Any) -> None:
                x, y = seen.pop(c), a.hidden(out)
                y = y if c[0] == "layer" else x + y.view_as(x)
                d = x.shape[-1]
                values = statistic(x.reshape(-1, d).float(), y.reshape(-1, d).float())
                sums[c] += values.sum(dtype=torch.float64).cpu()
            return hook

        sites = {"layer": (a.layer, a.layer), "mha": (a.attn_norm, a.attn_out),
                 "mlp": (a.mlp_norm, a.mlp_out)}
        handles = []
        for c in candidates:
            site_in, site_out = (get(c[1]) for get in sites[c[0]])
            handles.append(site_in.register_forward_pre_hook(remember(c), with_kwargs=True))
            handles.append(site_out.register_forward_hook(accumulate(c), with_kwargs=True))
        try:
            for ids, _mask in self.batches:
                self.model.base_model(input_ids=ids, use_cache=False)
                count += ids.numel()
        finally:
            for h in handles:
                h.remove()
        return {c: float(s) / count for c, s in sums.items()}


class BlockPruner:
    """Greedy removal of attention / MLP blocks by calibration perplexity.

    Args:
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
    needs_calibration = True

    def __init__(self, block_type: str = "mix", score: str = "ppl", search: bool = True, unit: str = "block",
                 num_blocks: int | None = None, search_impl: str = "fast", batch_size: int = 1,
                 cache: bool = True, cache_key: str | None = None, cache_device: str | None = None,
                 stack_tokens: int = 8192, resume_gb: float = 4.0,
                 max_sequences: int | None = None, max_seqlen: int | None = None) -> None:
        choices = {"block_type": (block_type, ("mix", "mha", "mlp")), "unit": (unit, ("block", "layer")),
                   "score": (score, (*LOSS_SCORES, *STATISTICS)),
                   "search_impl": (search_impl, ("fast", "plain"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise PruneError(f"blockpruner: {name}={value} is not one of {', '.join(allowed)}")
        if unit == "layer" and block_type != "mix":
            raise PruneError("blockpruner: unit=layer removes whole layers; set block_type=mix")
        negative = (num_blocks is not None and num_blocks < 0) or resume_gb < 0
        if negative or batch_size < 1 or stack_tokens < 1:
            raise PruneError("blockpruner: num_blocks, resume_gb must be >= 0; batch_size, stack_tokens "
                             ">= 1")
        self.block_type, self.score, self.search, self.unit = block_type, score, bool(search), unit
        self.num_blocks, self.search_impl, self.batch_size = num_blocks, search_impl, batch_size
        self.cache, self.cache_key, self.cache_device = cache, cache_key, cache_device
        self.stack_tokens, self.resume_bytes = stack_tokens, resume_gb * 2**30
        self.max_sequences, self.max_seqlen = max_sequences, max_seqlen
        self.on_step: Callable[[int], None] | None = None  # after each saved step (tests interrupt here)

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        if calib is None or len(calib) == 0:
            raise PruneError(f"{self.name} needs calibration data: set calib= (not null)")
        calib = calib.limited(self.max_sequences, self.max_seqlen)
        candidates = self._candidates(adapter.num_layers())
        total = count_params(adapter)["params/total"]

        def removed_params(order: list[Block]) -> int:
            return blocks.removed_param_count(adapter, *mask_sets(order))

        def reached(order: list[Block]) -> bool:
            if self.num_blocks is not None:
                return len(order) >= self.num_blocks
            return removed_params(order) + 1e-9 * total >= ratio * total

        self._check_reachable(candidates, ratio, removed_params(candidates) / total)
        path, key = self._cache_path(adapter, calib)
        state = self._load(path, key)
        started, steps_before = time.perf_counter(), len(state["order"])
        with torch.inference_mode():
            done = self._run(adapter, calib, candidates, state, reached, path)
        done |= {"seconds": time.perf_counter() - started, "steps_reused": steps_before}
        order = [tuple(b) for b in state["order"]]
        k = next(k for k in range(len(order) + 1) if reached(order[:k]))
        fracs = [removed_params(order[: j + 1]) / total for j in range(k)]
        return self._plan(ratio, order[:k], fracs, state, done, path)

    def _candidates(self, num_layers: int) -> list[Block]:
        return candidate_blocks(num_layers, self.unit, self.block_type)

    def _check_reachable(self, candidates: list[Block], ratio: float, max_frac: float) -> None:
        if self.num_blocks is not None:
            if self.num_blocks > len(candidates):
                raise PruneError(f"{self.name}: num_blocks={self.num_blocks} but the model has only "
                                 f"{len(candidates)} candidates; use num_blocks <= {len(candidates)}")
        elif ratio > max_frac + 1e-12:
            hint = " or block_type=mix" if self.block_type != "mix" else ""
            raise PruneError(
                f"ratio={ratio} cannot be reached: removing all {len(candidates)} candidates "
                f"(unit={self.unit}, block_type={self.block_type}) removes {max_frac:.4f} of all parameters "
                f"(embeddings and LM head stay); use ratio <= {math.floor(max_frac * 1000) / 1000}{hint}"
            )

    # ---------------------------------------------------------------------------------------------- search
    def _run(self, adapter: ModelAdapter, calib: CalibrationSet, candidates: list[Block],
             state: dict[str, Any], reached: Callable[[list[Block]], bool],
             path: Path | None) -> dict[str, Any]:
        """Extend ``state["order"]`` until `reached` (or nothing is left), saving after every step."""
        done = {"evaluations": 0, "plain_evaluations": 0, "steps": 0}
        index = {c: n for n, c in enumerate(candidates)}
        if state["complete"] or reached([tuple(b) for b in state["order"]]):
            return done
        search = _Search(adapter, calib, self.batch_size, self.cache_device, self.stack_tokens)
        fast_ppl = self.score in LOSS_SCORES and self.search_impl == "fast"
        if state["dense_ppl"] is None and not state["order"] and not fast_ppl:
            search.dense_total = search.full_score()  # the fast search gets it from its first cache pass
        while True:
            order = [tuple(b) for b in state["order"]]
            remaining = [c for c in candidates if c not in set(order)]
            if reached(order) or not remaining:
                break
            t0 = time.perf_counter()
            stats: dict[str, Any] = dict.fromkeys(STEP_COUNTERS, 0)
            sizes = self._sizes(adapter, order, remaining)  # counted on the unmasked model
            with search.removed(order):
                if not self.search:  # one shot: the whole order from single-block scores of the dense model
                    chosen, ppls, totals = self._one_shot(search, remaining, index, state, stats, sizes)
                elif self.score not in LOSS_SCORES:
                    chosen, ppls, totals = self._statistic_step(search, remaining, index, stats)
                elif self.search_impl == "plain":
                    chosen, ppls, totals = self._plain_step(search, remaining, state, stats, sizes)
                else:
                    chosen, ppls, totals = self._fast_step(search, remaining, index, state, stats, sizes)
            plain = len(remaining) if self.score in LOSS_SCORES else 1  # the official loop scores every block
            n = search.num_seq
            stats |= {"plain_evaluations": plain, "plain_layer_passes": plain * search.num_layers * n,
                      "plain_sequence_passes": plain * n, "seconds": time.perf_counter() - t0,
                      "impl": self.search_impl if self.score in LOSS_SCORES else self.score}
            state["order"] += [list(c) for c in chosen]
            state["step_ppl"] += ppls
            state.setdefault("step_total", []).extend(totals)  # exact sums: nll_per_param's baseline
            state["steps"].append(stats)
            state["complete"] = not self.search
            if state["dense_ppl"] is None and search.dense_total is not None:
                state["dense_ppl"] = math.exp(search.dense_total / n)
            done["evaluations"] += stats["evaluations"]
            done["plain_evaluations"] += plain
            done["steps"] += 1
            if path is not None:
                _write_atomic(path, state)
            log.info("%s step %d: removed %s, calibration PPL %.4f", self.name, len(state["order"]), chosen[-1],
                     ppls[-1])
            if self.on_step is not None:
                self.on_step(len(state["order"]))
            if not self.search:
                break
        return done

    def _sizes(self, adapter: ModelAdapter, order: list[Block], remaining: list[Block]) -> dict[Block, int]:
        """Parameters each remaining block would remove after `order` (nll_per_param only)."""
        if self.score != "nll_per_param":
            return {}
        before = blocks.removed_param_count(adapter, *mask_sets(order))
        return {c: blocks.removed_param_count(adapter, *mask_sets([*order, c])) - before for c in remaining}

    def _objective(self, search: _Search, state: dict[str, Any],
                   sizes: dict[Block, int]) -> Callable[[float, Block], float]:
        """What a step minimises, from Σ mean NLL of the model with candidate c removed.

        ``ppl``: the sum itself (PPL is monotone in it). ``nll_per_param``: the sum's rise over the current
        model's, per parameter c removes. Both never decrease as the sum grows, so the value of a partial sum
        bounds a candidate's value from below (the early stops stay exact).
        """
        if self.score == "ppl":
            return lambda total, _c: total
        current = state["step_total"][-1] if state["order"] else search.dense_total
        assert current is not None, "nll_per_param needs the current model's calibration sum"
        return lambda total, c: (total - current) / max(sizes[c], 1)

    def _plain_step(self, search: _Search, remaining: list[Block], state: dict[str, Any],
                    stats: dict[str, Any], sizes: dict[Block, int]) -> tuple[list[Block], list[float], list]:
        """The official loop: each remaining block, a full forward pass each; strict < keeps the first tie."""
        objective = self._objective(search, state, sizes)
        best, best_score, best_value = remaining[0], math.inf, math.inf
        state["hints"] = {}  # the values order a resumed fast search's candidates
        for c in remaining:
            with search.removed([c]):
                score = search.full_score()
            value = objective(score, c)
            state["hints"][_name(c)] = value
            stats["evaluations"] += 1
            stats["completed"] += 1
            stats["layer_passes"] += search.num_layers * search.num_seq
            stats["sequence_passes"] += search.num_seq
            if value < best_value:
                best, best_score, best_value = c, score, value
        return [best], [math.exp(best_score / search.num_seq)], [best_score]

    def _fast_step(self, search: _Search, remaining: list[Block], index: dict[Block, int],
                   state: dict[str, Any], stats: dict[str, Any],
                   sizes: dict[Block, int]) -> tuple[list[Block], list[float], list]:
        """The choice of `_plain_step` from cached layer inputs, previous-value order and early stops."""
        total = search.ensure_inputs(stats)
        if total is not None and not state["order"]:
            search.dense_total = total
        objective = self._objective(search, state, sizes)
        hints: dict[str, float] = state["hints"]
        ranked = sorted(remaining, key=lambda c: (hints.get(_name(c), math.inf), index[c]))
        keep = search.keep_layers(ranked, self.resume_bytes)
        # The best so far: ties go to the first candidate in the official order, so values compare as
        # (value, index) pairs.
        best: dict[str, Any] = {"block": remaining[0], "score": math.inf, "key": (math.inf, len(index))}

        # The unseen terms are >= 0, so a partial sum's value bounds c's value from below.
        def beaten(c: Block, partial: float) -> bool:
            return (objective(partial, c), index[c]) > best["key"]

        new_hints: dict[str, float] = {}
        # The best-ranked candidate first, alone: its score lets the others stop at their bounds. The rest go
        # in groups whose final states fit in the memory budget.
        for group in [ranked[:1], *search.groups(ranked[1:], self.resume_bytes)]:
            finals, bounds = search.decode(group, beaten, stats, keep)
            for c in group:
                if c in finals:
                    stop = partial(beaten, c)
                    bounds[c], alive = search.refine(finals[c], bounds[c], stop)
                    stats["bound_stops" if not alive else "full_heads"] += 1
                    score, complete = (search.head_score(finals.pop(c), bounds[c], stop) if alive
                                       else (sum(bounds[c]), False))
                else:
                    score, complete = sum(bounds[c]), False
                stats["evaluations"] += 1
                stats["completed" if complete else "aborted"] += 1
                value = new_hints[_name(c)] = objective(score, c)
                if complete and (value, index[c]) < best["key"]:
                    best = {"block": c, "score": score, "key": (value, index[c])}
        state["hints"] = new_hints
        chosen = best["block"]
        search.stale_from = chosen[1]  # the inputs of the layers after it change
        search.removed_at(chosen)
        return [chosen], [math.exp(best["score"] / search.num_seq)], [best["score"]]

    def _one_shot(self, search: _Search, remaining: list[Block], index: dict[Block, int],
                  state: dict[str, Any], stats: dict[str, Any],
                  sizes: dict[Block, int]) -> tuple[list[Block], list[float], list]:
        """'- search': rank every block once on the dense model (ties: official order)."""
        if self.score not in LOSS_SCORES:
            scores = search.statistics(remaining, STATISTICS[self.score])
            values = scores
            stats["evaluations"] += 1
        else:
            if self.search_impl == "fast":
                search.dense_total, scores = search.ensure_inputs(stats), {}
                for group in search.groups(remaining, self.resume_bytes):
                    finals, _ = search.decode(group, None, stats, set())
                    scores |= {c: search.head_score(f, [], None)[0] for c, f in finals.items()}
            else:
                scores = {}
                for c in remaining:
                    with search.removed([c]):
                        scores[c] = search.full_score()
            stats["evaluations"] += len(remaining)
            stats["completed"] += len(remaining)
            objective = self._objective(search, state, sizes)
            values = {c: objective(scores[c], c) for c in remaining}
        order = sorted(remaining, key=lambda c: (values[c], index[c]))
        # The one-shot ranking never scores the cumulative removals: each entry is its single-block score.
        as_ppl = self.score in LOSS_SCORES
        per_block = [math.exp(scores[c] / search.num_seq) if as_ppl else scores[c] for c in order]
        return order, per_block, [scores[c] if as_ppl else None for c in order]

    def _statistic_step(self, search: _Search, remaining: list[Block], index: dict[Block, int],
                        stats: dict[str, Any]) -> tuple[list[Block], list[float], list]:
        """§5.3: the iterative search with BI / RM of each block in the current model (one forward pass)."""
        scores = search.statistics(remaining, STATISTICS[self.score])
        best = min(remaining, key=lambda c: (scores[c], index[c]))
        with search.removed([best]):
            total = search.full_score()
        stats["evaluations"] += 1
        return [best], [math.exp(total / search.num_seq)], [total]

    # ----------------------------------------------------------------------------------------------- cache
    def _cache_path(self, adapter: ModelAdapter,
                    calib: CalibrationSet) -> tuple[Path | None, dict[str, Any]]:
        param = next(adapter.model.parameters())
        key = {
            "version": CACHE_VERSION, "model": self.cache_key or model_fingerprint(adapter.model),
            "calibration": tensor_hash(calib.input_ids), "target_mask": tensor_hash(calib.target_mask),
            "dtype": str(param.dtype).removeprefix("torch."), "device": param.device.type,
            "batch_size": self.batch_size, "block_type": self.block_type, "score": self.score,
            "calibration_used": {"sequences": len(calib), "seqlen": int(calib.input_ids.shape[1])},
            "search": self.search, "unit": self.unit, "candidates": [_name(c) for c in self._candidates(adapter.num_layers())],
        }
        if not self.cache:
            return None, key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cache_dir() / "blockpruner" / f"{digest}.json", key

    @staticmethod
    def _load(path: Path | None, key: dict[str, Any]) -> dict[str, Any]:
        fresh = {"key": key, "order": [], "step_ppl": [], "step_total": [], "steps": [], "hints": {},
                 "complete": False, "dense_ppl": None}
        if path is None or not path.is_file():
            return fresh
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("blockpruner: unreadable cache %s; searching again", path)
            return fresh
        return state if state.get("key") == key else fresh

    def _plan(self, ratio: float, order: list[Block], fracs: list[float], state: dict[str, Any],
              done: dict[str, Any], path: Path | None) -> PrunePlan:
        whole, attn_only, mlp_only = plan_sets(order)
        k = len(order)
        ppls = state["step_ppl"][:k]
        totals = ("evaluations", "completed", "aborted", "bound_stops", "full_heads", "plain_evaluations",
                  "layer_passes", "plain_layer_passes", "cache_layer_passes", "seconds")
        info = {
            "removal_order": [list(b) for b in order],
            "step_ppl": ppls if self.search else None,
            "block_ppl": ppls if not self.search and self.score in LOSS_SCORES else None,
            "step_removed_frac": fracs,
            "removal_table": {
                "columns": ["step", "block", "layer", "calib_ppl", "removed_frac"],
                "rows": [[j + 1, kind, layer, ppls[j], fracs[j]] for j, (kind, layer) in enumerate(order)],
            },
            "blocks_removed": k, "mha_removed": sum(b[0] == "mha" for b in order),
            "mlp_removed": sum(b[0] == "mlp" for b in order), "layers_removed_whole": whole,
            "target_ratio": None if self.num_blocks is not None else ratio, "num_blocks": self.num_blocks,
            "achieved_ratio": fracs[-1] if k else 0.0,
            "ratio_rule": "the first step whose removed parameters (of all parameters) reach the ratio",
            "dense_calib_ppl": state["dense_ppl"],
            "search_seconds": done["seconds"], "search_impl": self.search_impl,
            "evaluations": done["evaluations"], "plain_evaluations": done["plain_evaluations"],
            "steps_searched": done["steps"], "steps_reused": min(done["steps_reused"], k),
            "search_total": {key: sum(s.get(key, 0) for s in state["steps"]) for key in totals},
            "cache": {"path": str(path) if path else None, "key": state["key"],
                      "order_length": len(state["order"])},
            "options": {"block_type": self.block_type, "score": self.score, "search": self.search,
                        "unit": self.unit, "batch_size": self.batch_size},
            "search_calibration": state["key"]["calibration_used"],
        }
        return PrunePlan(
            method=self.name, ratio=ratio, ratio_unit=self.ratio_unit, drop_layers=whole,
            drop_attn=attn_only, drop_mlp=mlp_only,
            scores={"step_ppl": list(ppls)}, info=info,
        )


def _name(block: Block) -> str:
    return f"{block[0]}:{block[1]}"


def _write_atomic(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
