"""The greedy block search that BlockPruner and SLEB compose (Alg. 1 of BlockPruner; SLEB's loop).

`GreedySearch` is the recipe: at each step a `Scorer` (`prune.methods.block_scorers`: plain, fast or a
statistic) picks the remaining candidate whose removal scores lowest on the model with the earlier choices
removed, until a stop rule holds (a count of candidates, or a fraction of all parameters). ``search=false`` is
the one-shot ablation: one ranking of single-candidate scores on the dense model. The methods supply the
candidates (`Block`), the count rule and the options; the search returns the plan.

The removal order is one list of nested prefixes, so one search serves every ratio: it is cached as a
`SearchState` in ``prune.paths.cache_dir()/blockpruner/<digest of its key>.json`` (`prune.store.KeyedFile`)
under a key of the model (its config plus name, shape, dtype and 64 strided values of every weight tensor,
which is cheap even for 7B models; or ``cache_key``), the calibration tokens (the hash of ``input_ids``, i.e.
``info["tokens_hash"]``, and of the target mask), dtype, device, batch size and the search's options. The
file is rewritten atomically after every step: an interrupted search resumes, and a run with another ratio
extends the order only if it needs more steps. What each step cost is kept with it (`StepCost` records);
`RunCost` is what this run added.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import torch

from prune.data.calibration import CalibrationSet
from prune.data.tokens import tensor_hash
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods import WithOptions, require_calibration
from prune.methods.block_scorers import LOSS_SCORES, Scorer, Step, scorer_for
from prune.methods.block_search import Block, BlockSearch, StepCost, mask_sets
from prune.models import blocks
from prune.models.adapter import ModelAdapter
from prune.options import Options, bounded
from prune.paths import cache_dir
from prune.provenance import model_fingerprint
from prune.quality import FEW_TOKENS, raised
from prune.store import KeyedFile, digest
from prune.types import PrunePlan

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# The run totals a plan reports (`search_total`): summed over every step of the cached order.
TOTALS = ("evaluations", "completed", "aborted", "bound_stops", "full_heads", "plain_evaluations",
          "layer_passes", "plain_layer_passes", "cache_layer_passes", "seconds")
RATIO_RULE = "the first step whose removed parameters (of all parameters) reach the ratio"
# The documented minimum of scored calibration tokens for a search (below it the plan is flagged
# ``few_tokens``): 14 x 2048 Alpaca tokens, BlockPruner's paper calibration, put its removal order below
# ShortGPT's on the embedded model; the CPU preset's 4 x 128 did not (experiments/reference_gpu).
MIN_SEARCH_TOKENS = 28_000
FEW_TOKENS_COST = "14 x 2048 tokens: BlockPruner's search took 95 s on one H200, ~9 h on a 2-core CPU"
# How to reach the minimum: calibration styles that draw rows (Alpaca's row chunks) count rows in nsamples.
FEW_TOKENS_FIX = {
    "row_chunks": "method.max_sequences=null method.max_seqlen=null calib.nsamples=256 calib.pool=all (the "
                  f"paper's 256 Alpaca rows, ~{FEW_TOKENS_COST})",
    "windows": f"method.max_sequences=null method.max_seqlen=null calib.nsamples=14 ({FEW_TOKENS_COST})",
}


@dataclass(frozen=True)
class SearchOptions(Options):
    """The search engine's knobs, shared by BlockPruner and SLEB (their docstrings describe each)."""

    search_impl: Literal["fast", "plain"] = "fast"
    batch_size: int = bounded(1, ge=1)
    cache: bool = True
    cache_key: str | None = None
    cache_device: str | None = None
    stack_tokens: int = bounded(8192, ge=1)
    resume_gb: float = bounded(4.0, ge=0)
    max_sequences: int | None = bounded(None, ge=1)
    max_seqlen: int | None = bounded(None, ge=1)


SearchOptionsT = TypeVar("SearchOptionsT", bound=SearchOptions)


class GreedyMethod(WithOptions[SearchOptionsT]):
    """What BlockPruner and SLEB share as pruning methods: their options (``GreedyMethod[XOptions]``, read
    back as attributes: ``method.search_impl``) and the `on_step` hook. Each builds its `GreedySearch` in
    ``prune``."""

    needs_calibration = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.on_step: Callable[[int], None] | None = None  # after each saved step (tests interrupt here)


def plan_sets(removed: list[Block]) -> tuple[list[int], list[int], list[int]]:
    """(layers deleted whole, layers losing only attention, layers losing only the MLP) for removed blocks:
    a layer whose both blocks are gone is deleted whole (the same function)."""
    attn, mlp = mask_sets(removed)
    whole = attn & mlp
    return sorted(whole), sorted(attn - whole), sorted(mlp - whole)


def plain_evaluations(num_candidates: int, first_step: int, steps: int) -> int:
    """Evaluations of the plain greedy search for steps first_step+1..first_step+steps: Σ (C - j + 1)."""
    return sum(num_candidates - j for j in range(first_step, first_step + steps))


def few_tokens_flags(calib: CalibrationSet) -> list[dict[str, str]]:
    """``few_tokens`` when the search scores fewer calibration tokens than MIN_SEARCH_TOKENS."""
    tokens = int(calib.target_mask.sum())
    if tokens >= MIN_SEARCH_TOKENS:
        return []
    detail = f"searched on {tokens} scored tokens ({len(calib)} sequences), minimum {MIN_SEARCH_TOKENS}"
    fix = FEW_TOKENS_FIX["row_chunks" if calib.info.get("style") == "row_chunks" else "windows"]
    return [raised(FEW_TOKENS, detail, fix)]


@dataclass
class SearchState:
    """The cached removal order and what each step found and cost (the cache file's JSON layout)."""

    key: dict[str, Any]
    order: list[Block] = field(default_factory=list)
    step_ppl: list[float] = field(default_factory=list)  # calibration PPL after each step (one-shot: alone)
    step_total: list[float | None] = field(default_factory=list)  # the exact sums behind them
    steps: list[dict[str, Any]] = field(default_factory=list)  # each step's `StepCost` record
    hints: dict[str, float] = field(default_factory=dict)  # the last step's values, by block name
    complete: bool = False  # a one-shot ranking: nothing more to search
    dense_ppl: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in names})
        state.order = [Block(*b) for b in state.order]
        return state

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"order": [list(b) for b in self.order]}

    def add(self, outcome: StepOutcome, record: dict[str, Any], complete: bool, dense_total: float | None,
            num_seq: int) -> None:
        """Record a step: its removals, their PPLs and sums, its cost, the next step's hints."""
        self.order += outcome.blocks
        self.step_ppl += outcome.ppl
        self.step_total += outcome.total
        self.steps.append(record)
        if outcome.hints is not None:
            self.hints = outcome.hints
        self.complete = complete
        if self.dense_ppl is None and dense_total is not None:
            self.dense_ppl = math.exp(dense_total / num_seq)


def load_state(cache: KeyedFile | None, key: dict[str, Any]) -> SearchState:
    """The cached state of this key, or a fresh one (no cache, no file, or an unreadable one)."""
    stored = cache.load_json() if cache is not None else None
    if stored is not None:
        return SearchState.from_json(stored)
    if cache is not None and cache.path.is_file():
        log.warning("blockpruner: unreadable cache %s; searching again", cache.path)
    return SearchState(key=key)


@dataclass
class RunCost:
    """What this run searched (the steps it took from the cache cost nothing here)."""

    steps_reused: int
    steps: int = 0
    evaluations: int = 0
    plain_evaluations: int = 0  # what the official loop would have run for the same steps
    seconds: float = 0.0

    def add(self, record: dict[str, Any]) -> None:
        self.steps += 1
        self.evaluations += record["evaluations"]
        self.plain_evaluations += record["plain_evaluations"]


class StepOutcome(NamedTuple):
    """What a step removes (one block; a one-shot ranking: all of them), with the calibration PPL and the
    exact sum each entry records (a statistic's ranking: the statistic, and no sum)."""

    blocks: list[Block]
    ppl: list[float]
    total: list[float | None]
    hints: dict[str, float] | None = None  # every candidate's value this step, when the scorer has them


def greedy_step(scorer: Scorer, step: Step, engine: BlockSearch) -> StepOutcome:
    """One step of Alg. 1: the scorer's best removal and the model's calibration PPL without it."""
    choice = scorer.best(step)
    ppl = math.exp(choice.total / engine.num_seq)
    return StepOutcome([choice.block], [ppl], [choice.total], hints=choice.values)


def one_shot(scorer: Scorer, step: Step, engine: BlockSearch) -> StepOutcome:
    """'- search': rank every candidate once on the dense model (ties: official order). The ranking never
    scores the cumulative removals: each entry is its single-candidate score."""
    scores = scorer.rank(step)
    if not scorer.loss:
        order = sorted(step.remaining, key=lambda c: (scores[c], step.index[c]))
        return StepOutcome(order, [scores[c] for c in order], [None for _ in order])
    objective = step.objective(engine.dense_total)
    values = {c: objective(scores[c], c) for c in step.remaining}
    order = sorted(step.remaining, key=lambda c: (values[c], step.index[c]))
    ppls = [math.exp(scores[c] / engine.num_seq) for c in order]
    return StepOutcome(order, ppls, [scores[c] for c in order])


@dataclass(frozen=True)
class GreedySearch:
    """One greedy search: the candidates in the official order (ties keep the first), the score, the stop
    rule (``count`` candidates, else the ratio of all parameters) and the engine options.

    ``unit``, ``block_type``, ``score`` and ``iterative`` (``search``) name the search in the cache key and
    ``plan.info["options"]``.
    """

    method: str  # names the plan and the messages
    ratio_unit: str
    candidates: list[Block]
    options: SearchOptions
    count: int | None = None
    unit: str = "block"
    block_type: str = "mix"
    score: str = "ppl"
    iterative: bool = True
    on_step: Callable[[int], None] | None = None  # after each saved step (tests interrupt here)

    def run(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration(self.method, calib)
        if len(calib) == 0:
            raise PruneError(f"{self.method} got an empty calibration set; raise calib.nsamples")
        calib = calib.limited(self.options.max_sequences, self.options.max_seqlen)
        total = count_params(adapter)["params/total"]

        def removed_params(order: list[Block]) -> int:
            return blocks.removed_param_count(adapter, *mask_sets(order))

        def reached(order: list[Block]) -> bool:
            if self.count is not None:
                return len(order) >= self.count
            return removed_params(order) + 1e-9 * total >= ratio * total

        self.check_reachable(ratio, removed_params(self.candidates) / total)
        key = self.cache_key(adapter, calib)
        cache = KeyedFile(cache_dir() / "blockpruner", key) if self.options.cache else None
        state = load_state(cache, key)
        if cache is not None and state.order:
            log.info("%s: resuming search from step %d of %s (key %s)", self.method, len(state.order),
                     cache.path, digest(key))
        started, cost = time.perf_counter(), RunCost(steps_reused=len(state.order))
        with torch.inference_mode():
            self.extend(adapter, calib, state, reached, cache, cost)
        cost.seconds = time.perf_counter() - started
        k = next(k for k in range(len(state.order) + 1) if reached(state.order[:k]))
        fracs = [removed_params(state.order[: j + 1]) / total for j in range(k)]
        plan = self.plan(ratio, state, k, fracs, cost, cache)
        plan.info["quality_flags"] = few_tokens_flags(calib)
        return plan

    def check_reachable(self, ratio: float, max_frac: float) -> None:
        n = len(self.candidates)
        if self.count is not None:
            if self.count > n:
                raise PruneError(f"{self.method}: num_blocks={self.count} but the model has only {n} "
                                 f"candidates; use num_blocks <= {n}")
        elif ratio > max_frac + 1e-12:
            hint = " or block_type=mix" if self.block_type != "mix" else ""
            raise PruneError(
                f"ratio={ratio} cannot be reached: removing all {n} candidates "
                f"(unit={self.unit}, block_type={self.block_type}) removes {max_frac:.4f} of all parameters "
                f"(embeddings and LM head stay); use ratio <= {math.floor(max_frac * 1000) / 1000}{hint}"
            )

    # ---------------------------------------------------------------------------------------------- search
    def extend(self, adapter: ModelAdapter, calib: CalibrationSet, state: SearchState,
               reached: Callable[[list[Block]], bool], cache: KeyedFile | None, cost: RunCost) -> None:
        """Extend ``state.order`` until `reached` (or nothing is left), saving after every step."""
        if state.complete or reached(state.order):
            return
        o = self.options
        engine = BlockSearch(adapter, calib, o.batch_size, o.cache_device, o.stack_tokens)
        scorer = scorer_for(self.score, o.search_impl, engine, o.resume_gb * 2**30)
        scorer.prepare(needs_dense=state.dense_ppl is None and not state.order)
        while not reached(state.order):
            remaining = [c for c in self.candidates if c not in set(state.order)]
            if not remaining:
                break
            outcome, record = self.step(adapter, engine, scorer, state, remaining)
            state.add(outcome, record, complete=not self.iterative, dense_total=engine.dense_total,
                      num_seq=engine.num_seq)
            cost.add(record)
            if cache is not None:
                cache.save_json(state.to_json())
            log.info("%s step %d: removed %s, calibration PPL %.4f", self.method, len(state.order),
                     outcome.blocks[-1].name, outcome.ppl[-1])
            if self.on_step is not None:
                self.on_step(len(state.order))
            if not self.iterative:
                break

    def step(self, adapter: ModelAdapter, engine: BlockSearch, scorer: Scorer, state: SearchState,
             remaining: list[Block]) -> tuple[StepOutcome, dict[str, Any]]:
        """One step on the model without ``state.order``: what it removes, and its cost record."""
        started = time.perf_counter()
        step = Step(remaining, {c: n for n, c in enumerate(self.candidates)}, self.score, state.hints,
                    on_dense_model=not state.order,
                    current_total=state.step_total[-1] if state.order and state.step_total else None,
                    sizes=self.sizes(adapter, state.order, remaining), cost=StepCost())
        with engine.removed(state.order):
            outcome = greedy_step(scorer, step, engine) if self.iterative else one_shot(scorer, step, engine)
        plain = len(remaining) if scorer.loss else 1  # the official loop scores every block
        seconds = time.perf_counter() - started
        return outcome, step.cost.record(plain, engine.num_layers, engine.num_seq, seconds, scorer.impl)

    def sizes(self, adapter: ModelAdapter, order: list[Block], remaining: list[Block]) -> dict[Block, int]:
        """Parameters each remaining block would remove after `order` (nll_per_param only), counted on the
        unmasked model."""
        if self.score != "nll_per_param":
            return {}
        before = blocks.removed_param_count(adapter, *mask_sets(order))
        return {c: blocks.removed_param_count(adapter, *mask_sets([*order, c])) - before for c in remaining}

    # ----------------------------------------------------------------------------------------------- cache
    def described(self) -> dict[str, Any]:
        """The search's options as the plan reports them (`plan.info["options"]`; the cache key has them)."""
        return {"block_type": self.block_type, "score": self.score, "search": self.iterative,
                "unit": self.unit, "batch_size": self.options.batch_size}

    def cache_key(self, adapter: ModelAdapter, calib: CalibrationSet) -> dict[str, Any]:
        """What the removal order depends on (the cache file is named by its digest)."""
        param = next(adapter.model.parameters())
        described = self.described()
        key = {
            "version": CACHE_VERSION, "model": self.options.cache_key or model_fingerprint(adapter.model),
            "calibration": tensor_hash(calib.input_ids), "target_mask": tensor_hash(calib.target_mask),
            "dtype": str(param.dtype).removeprefix("torch."), "device": param.device.type,
            "batch_size": described["batch_size"], "block_type": described["block_type"],
            "score": described["score"],
            "calibration_used": {"sequences": len(calib), "seqlen": int(calib.input_ids.shape[1])},
            "search": described["search"], "unit": described["unit"],
            "candidates": [c.name for c in self.candidates],
        }
        return key

    # ------------------------------------------------------------------------------------------------ plan
    def plan(self, ratio: float, state: SearchState, k: int, fracs: list[float], cost: RunCost,
             cache: KeyedFile | None) -> PrunePlan:
        """The plan of the first `k` removals, with the search's record in ``info``."""
        order = state.order[:k]
        whole, attn_only, mlp_only = plan_sets(order)
        ppls = state.step_ppl[:k]
        path = cache.path if cache is not None else None
        info = {
            "removal_order": [list(b) for b in order],
            "step_ppl": ppls if self.iterative else None,
            "block_ppl": ppls if not self.iterative and self.score in LOSS_SCORES else None,
            "step_removed_frac": fracs,
            "removal_table": {
                "columns": ["step", "block", "layer", "calib_ppl", "removed_frac"],
                "rows": [[j + 1, b.kind, b.layer, ppls[j], fracs[j]] for j, b in enumerate(order)],
            },
            "blocks_removed": k, "mha_removed": sum(b.kind == "mha" for b in order),
            "mlp_removed": sum(b.kind == "mlp" for b in order), "layers_removed_whole": whole,
            "target_ratio": None if self.count is not None else ratio, "num_blocks": self.count,
            "achieved_ratio": fracs[-1] if k else 0.0,
            "ratio_rule": RATIO_RULE,
            "dense_calib_ppl": state.dense_ppl,
            "search_seconds": cost.seconds, "search_impl": self.options.search_impl,
            "evaluations": cost.evaluations, "plain_evaluations": cost.plain_evaluations,
            "steps_searched": cost.steps, "steps_reused": min(cost.steps_reused, k),
            "search_total": {key: sum(s.get(key, 0) for s in state.steps) for key in TOTALS},
            "cache": {"path": str(path) if path else None, "key": state.key,
                      "order_length": len(state.order)},
            "options": self.described(),
            "search_calibration": state.key["calibration_used"],
        }
        return PrunePlan(method=self.method, ratio=ratio, ratio_unit=self.ratio_unit, drop_layers=whole,
                         drop_attn=attn_only, drop_mlp=mlp_only, scores={"step_ppl": list(ppls)}, info=info)
