"""How the greedy block search (`prune.methods.greedy`) scores its candidates: one `Scorer` per score kind.

- `PlainScorer`: the official loop, one full calibration pass per candidate (``search_impl=plain``).
- `FastScorer`: the same choice from cached layer inputs, previous-value order and early stops
  (``search_impl=fast``; the passes and why they are exact: `prune.methods.block_search`).
- `StatisticScorer`: §5.3's alternatives, ShortGPT's BI or RM of every block in one forward pass.

Each answers `best` (one greedy step: the block to remove next) and `rank` (every candidate's score on the
model as it stands: the one-shot "- search" ablation), counting its work in the step's `StepCost`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Protocol

from prune.methods.block_search import Block, BlockSearch, StepCost
from prune.methods.relative_magnitude import relative_magnitude
from prune.methods.shortgpt import block_influence

STATISTICS = {"block_influence": block_influence, "relative_magnitude": relative_magnitude}
# Scores computed from the calibration loss of the model with the candidate removed (the search's passes).
LOSS_SCORES = ("ppl", "nll_per_param")


@dataclass
class Step:
    """What one greedy step knows: the candidates left and how the previous steps went."""

    remaining: list[Block]  # in the official order
    index: dict[Block, int]  # every candidate's place in the official order: ties go to the lower
    score: str  # the score option (`LOSS_SCORES` or `STATISTICS`)
    hints: dict[str, float]  # the previous step's values by block name (a fast search ranks by them)
    on_dense_model: bool  # no block is removed yet
    current_total: float | None  # Σ mean NLL of the model as it stands, when a previous step recorded it
    sizes: dict[Block, int]  # parameters each candidate would remove (nll_per_param only)
    cost: StepCost

    def objective(self, dense_total: float | None) -> Callable[[float, Block], float]:
        """What the step minimises, from Σ mean NLL of the model with candidate c removed.

        ``ppl``: the sum itself (PPL is monotone in it). ``nll_per_param``: the sum's rise over the current
        model's, per parameter c removes. Both never decrease as the sum grows, so the value of a partial sum
        bounds a candidate's value from below (the early stops stay exact).
        """
        if self.score == "ppl":
            return lambda total, _c: total
        current = dense_total if self.on_dense_model else self.current_total
        if current is None:  # invariant: the scorers compute the dense sum before the first step's objective
            raise RuntimeError("nll_per_param needs the current model's calibration sum")
        return lambda total, c: (total - current) / max(self.sizes[c], 1)


class Choice(NamedTuple):
    """A step's removal: the block, Σ mean NLL of the model without it, and every candidate's value this
    step (the next step's hints; ``None`` when the scorer has none)."""

    block: Block
    total: float
    values: dict[str, float] | None


class Scorer(Protocol):
    impl: str  # how the step records name it
    loss: bool  # scores are calibration-loss sums (else statistics, lower = less important)

    def prepare(self, needs_dense: bool) -> None:
        """Before the first step of a run; ``needs_dense``: the dense model's sum is not known yet."""

    def best(self, step: Step) -> Choice:
        """The block a greedy step removes from the model as it stands."""

    def rank(self, step: Step) -> dict[Block, float]:
        """Every remaining candidate's score on the model as it stands (one-shot ranking)."""


class PlainScorer:
    """The official loop: each remaining block, a full forward pass each; strict < keeps the first tie."""

    impl, loss = "plain", True

    def __init__(self, engine: BlockSearch) -> None:
        self.engine = engine

    def prepare(self, needs_dense: bool) -> None:
        if needs_dense:
            self.engine.dense_total = self.engine.full_score()

    def full_score_without(self, c: Block, cost: StepCost) -> float:
        engine = self.engine
        with engine.removed([c]):
            total = engine.full_score()
        cost.evaluations += 1
        cost.completed += 1
        cost.layer_passes += engine.num_layers * engine.num_seq
        cost.sequence_passes += engine.num_seq
        return total

    def best(self, step: Step) -> Choice:
        objective = step.objective(self.engine.dense_total)
        best, best_total, best_value = step.remaining[0], math.inf, math.inf
        values: dict[str, float] = {}  # they order a resumed fast search's candidates
        for c in step.remaining:
            total = self.full_score_without(c, step.cost)
            values[c.name] = value = objective(total, c)
            if value < best_value:
                best, best_total, best_value = c, total, value
        return Choice(best, best_total, values)

    def rank(self, step: Step) -> dict[Block, float]:
        scores = {}
        for c in step.remaining:
            with self.engine.removed([c]):
                scores[c] = self.engine.full_score()
        step.cost.evaluations += len(step.remaining)
        step.cost.completed += len(step.remaining)
        return scores


class _Best(NamedTuple):
    block: Block
    total: float
    key: tuple[float, int]  # (value, official index): ties go to the first candidate in the official order


class FastScorer:
    """The choice of `PlainScorer` from cached layer inputs, previous-value order and early stops."""

    impl, loss = "fast", True

    def __init__(self, engine: BlockSearch, resume_bytes: float) -> None:
        self.engine, self.resume_bytes = engine, resume_bytes

    def prepare(self, needs_dense: bool) -> None:
        """Nothing: the first cache pass (`ensure_inputs`) yields the dense model's sum."""

    def best(self, step: Step) -> Choice:
        engine = self.engine
        total = engine.ensure_inputs(step.cost)
        if total is not None and step.on_dense_model:
            engine.dense_total = total
        objective = step.objective(engine.dense_total)
        ranked = sorted(step.remaining, key=lambda c: (step.hints.get(c.name, math.inf), step.index[c]))
        keep = engine.keep_layers(ranked, self.resume_bytes)
        best = _Best(step.remaining[0], math.inf, (math.inf, len(step.index)))

        # The unseen terms are >= 0, so a partial sum's value bounds c's value from below.
        def beaten(c: Block, partial_total: float) -> bool:
            return (objective(partial_total, c), step.index[c]) > best.key

        values: dict[str, float] = {}
        # The best-ranked candidate first, alone: its score lets the others stop at their bounds. The rest go
        # in groups whose final states fit in the memory budget.
        for group in [ranked[:1], *engine.groups(ranked[1:], self.resume_bytes)]:
            finals, bounds = engine.decode(group, beaten, step.cost, keep)
            for c in group:
                total, complete = self._finish(c, finals, bounds, partial(beaten, c), step.cost)
                step.cost.evaluations += 1
                if complete:
                    step.cost.completed += 1
                else:
                    step.cost.aborted += 1
                value = values[c.name] = objective(total, c)
                if complete and (value, step.index[c]) < best.key:
                    best = _Best(c, total, (value, step.index[c]))
        engine.stale_from = best.block.layer  # the inputs of the layers after it change
        engine.removed_at(best.block)
        return Choice(best.block, best.total, values)

    def _finish(self, c: Block, finals: dict[Block, list], bounds: dict[Block, list[float]],
                stop: Callable[[float], bool], cost: StepCost) -> tuple[float, bool]:
        """c's sum from its final states (tighter bounds first, then full LM heads), or the bound at which it
        stopped: (sum, True) or (lower bound, False)."""
        if c not in finals:  # stopped while decoding
            return sum(bounds[c]), False
        bounds[c], alive = self.engine.refine(finals[c], bounds[c], stop)
        if not alive:
            cost.bound_stops += 1
            return sum(bounds[c]), False
        cost.full_heads += 1
        return self.engine.head_score(finals.pop(c), bounds[c], stop)

    def rank(self, step: Step) -> dict[Block, float]:
        engine = self.engine
        engine.dense_total, scores = engine.ensure_inputs(step.cost), {}
        for group in engine.groups(step.remaining, self.resume_bytes):
            finals, _ = engine.decode(group, None, step.cost, set())
            scores |= {c: engine.head_score(f, [], None)[0] for c, f in finals.items()}
        step.cost.evaluations += len(step.remaining)
        step.cost.completed += len(step.remaining)
        return scores


class StatisticScorer:
    """§5.3: BI / RM of each block in the current model (one forward pass); lower = removed first."""

    loss = False

    def __init__(self, engine: BlockSearch, score: str) -> None:
        self.engine, self.impl, self.statistic = engine, score, STATISTICS[score]

    def prepare(self, needs_dense: bool) -> None:
        if needs_dense:
            self.engine.dense_total = self.engine.full_score()

    def best(self, step: Step) -> Choice:
        scores = self.rank(step)
        best = min(step.remaining, key=lambda c: (scores[c], step.index[c]))
        with self.engine.removed([best]):
            total = self.engine.full_score()
        return Choice(best, total, None)

    def rank(self, step: Step) -> dict[Block, float]:
        step.cost.evaluations += 1
        return self.engine.statistics(step.remaining, self.statistic)


def scorer_for(score: str, search_impl: str, engine: BlockSearch, resume_bytes: float) -> Scorer:
    if score in STATISTICS:
        return StatisticScorer(engine, score)
    return PlainScorer(engine) if search_impl == "plain" else FastScorer(engine, resume_bytes)
