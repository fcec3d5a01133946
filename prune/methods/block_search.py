"""The passes behind the greedy block search (`prune.methods.greedy`; BlockPruner and SLEB): a full
calibration pass of the model as it stands (plain search), and cached-prefix, layer-by-layer passes with loss
bounds (fast search). The scorers that drive them live in `prune.methods.block_scorers`.

The fast search is exact: ``search_impl=fast`` selects what ``search_impl=plain`` (the official loop, one
full forward pass per candidate) selects, and both compute every complete score with the same arithmetic
per sequence. Where its speed comes from (the step is ``FastScorer.best``):
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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.eval.nll import hidden_nll, likely_token_sets, nll_lower_bound, subset_rows
from prune.models import blocks
from prune.models.adapter import ModelAdapter


class Block(NamedTuple):
    """A candidate of the greedy search: one sub-layer block, or a whole layer (``unit=layer``)."""

    kind: str  # "mha" | "mlp" | "layer"
    layer: int  # its dense layer index

    @property
    def name(self) -> str:
        """``kind:layer``, how the search state's hints name it."""
        return f"{self.kind}:{self.layer}"


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


def mask_sets(removed: list[Block]) -> tuple[set[int], set[int]]:
    """(layers without attention, layers without MLP) for a set of removed blocks."""
    attn = {i for kind, i in removed if kind in ("mha", "layer")}
    return attn, {i for kind, i in removed if kind in ("mlp", "layer")}


@dataclass
class StepCost:
    """The work of one greedy step, counted by the passes below (a step's record in the search state)."""

    evaluations: int = 0  # candidates scored, stopped ones included
    completed: int = 0  # ... scored to the end (exact sums)
    aborted: int = 0  # ... stopped once a bound lost
    bound_stops: int = 0  # stops by a vocabulary-subset bound, before or instead of a full LM head
    full_heads: int = 0  # candidates whose full LM heads ran
    layer_passes: int = 0  # decoder layer x sequence forwards of the scoring
    sequence_passes: int = 0  # sequences run through (part of) the decoder
    cache_layer_passes: int = 0  # layer x sequence forwards that (re)built the cached layer inputs

    def record(self, plain: int, num_layers: int, num_seq: int, seconds: float, impl: str) -> dict[str, Any]:
        """The step's record in the search state: these counts, what the official loop would have spent on
        the step (``plain`` evaluations of every layer and sequence), its time and scorer."""
        return asdict(self) | {
            "plain_evaluations": plain, "plain_layer_passes": plain * num_layers * num_seq,
            "plain_sequence_passes": plain * num_seq, "seconds": seconds, "impl": impl}


class _Replay(nn.Module):
    """Stands in for the layers before a candidate: outputs the cached hidden state entering its layer."""

    def __init__(self, hidden: torch.Tensor, template: Any) -> None:
        super().__init__()
        self.hidden, self.template = hidden, template

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.hidden if self.template is None else ModelAdapter.with_hidden(self.template, self.hidden)


class _LayerDone(Exception):
    """Raised by a forward hook to end the model's forward pass after one layer (`layer_output`)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class BlockSearch:
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
        if hidden is None:  # invariant: `capture` cached the inputs of every layer a candidate starts at
            hidden = self.inputs[b][layer]  # type: ignore[index]
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

    def ensure_inputs(self, cost: StepCost) -> float | None:
        """Build or refresh the cached layer inputs for the current model; a full build returns Σ terms."""
        if self.inputs is None:
            cost.cache_layer_passes += self.num_layers * self.num_seq
            return self.capture(0, with_head=True)
        if self.stale_from is not None:
            cost.cache_layer_passes += (self.num_layers - self.stale_from) * self.num_seq
            self.capture(self.stale_from, with_head=False)
        return None

    def keep_layers(self, ranked: list[Block], budget_bytes: float) -> set[int]:
        """Layers whose entering states every candidate keeps for the next step (`resume`).

        All layers when the states fit in `budget_bytes`; otherwise the layers of the best-ranked candidates
        (the likely removals), as many as fit.
        """
        def cost(layer: int) -> int:  # every candidate below `layer` keeps one state entering it
            return self.state_bytes() * sum(c.layer < layer for c in ranked)

        if sum(cost(g) for g in range(1, self.num_layers)) <= budget_bytes:
            return set(range(1, self.num_layers))
        kept: set[int] = set()
        for layer in dict.fromkeys(c.layer for c in ranked):
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
               cost: StepCost, keep: set[int]) -> tuple[dict[Block, list], dict[Block, list[float]]]:
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
            for c, final in self.advance(alive, b, keep, cost).items():
                finals[c].append(final)
                if bounded:
                    bounds[c].append(self.lower_bound(b, final))
            cost.sequence_passes += len(alive) * len(self.batches[b][0])
            if bounded:
                lost = [c for c in alive if beaten(c, sum(bounds[c]))]  # type: ignore[misc]
                for c in lost:
                    del finals[c]
                cost.bound_stops += len(lost)
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
                cost: StepCost) -> dict[Block, torch.Tensor]:
        """Run batch b through the decoder with each candidate removed; return their normed final states.

        A candidate starts at its own layer from the current model's cached input, or further on from its
        own state kept by an earlier step (`resume`). Past its own layer a candidate runs the current model's
        layers, the same for every candidate, so layer by layer the candidates that reached it run as one
        stack (rows are independent: the same values as one candidate at a time). States entering the `keep`
        layers are kept for the next step.
        """
        kept = {c: self.resume.setdefault(c, {}).setdefault(b, {}) for c in candidates}
        start = {c: max(kept[c], default=c.layer) for c in candidates}
        frontier: dict[Block, torch.Tensor] = {}
        for m in range(min(start.values()), self.num_layers):
            frontier |= {c: kept[c][m] for c in candidates if start[c] == m > c.layer}
            outputs = self.run_layer(m, b, frontier, cost) if frontier else {}
            for c in [c for c in candidates if start[c] == m == c.layer]:  # its own layer, with c removed
                with self.removed([c]):
                    outputs |= self.run_layer(m, b, {c: None}, cost)
            frontier = outputs
            if m + 1 in keep:
                for c, state in frontier.items():
                    kept[c][m + 1] = state.to(self.cache_device)
        return frontier

    def run_layer(self, m: int, b: int, states: dict[Block, torch.Tensor | None],
                  cost: StepCost) -> dict[Block, torch.Tensor]:
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
            cost.layer_passes += len(stack)
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
                for g in [g for g in kept if g > block.layer]:
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
                y = y if c.kind == "layer" else x + y.view_as(x)
                d = x.shape[-1]
                values = statistic(x.reshape(-1, d).float(), y.reshape(-1, d).float())
                sums[c] += values.sum(dtype=torch.float64).cpu()
            return hook

        sites = {"layer": (a.layer, a.layer), "mha": (a.attn_norm, a.attn_out),
                 "mlp": (a.mlp_norm, a.mlp_out)}
        handles = []
        for c in candidates:
            site_in, site_out = (get(c.layer) for get in sites[c.kind])
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
