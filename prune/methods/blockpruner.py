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

The search passes (plain and fast) live in `prune.methods.block_search`: ``search_impl=fast`` selects
exactly what ``search_impl=plain``, the official loop with a full forward pass per candidate, selects, several
times faster (how: that module's docstring).

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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from prune.data.calibration import CalibrationSet
from prune.data.tokens import tensor_hash
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods.block_search import Block, BlockSearch, mask_sets
from prune.methods.relative_magnitude import relative_magnitude
from prune.methods.shortgpt import block_influence
from prune.models import blocks
from prune.models.adapter import ModelAdapter
from prune.paths import cache_dir
from prune.provenance import model_fingerprint
from prune.types import PrunePlan

log = logging.getLogger(__name__)

STATISTICS = {"block_influence": block_influence, "relative_magnitude": relative_magnitude}
# Scores computed from the calibration loss of the model with the candidate removed (the search's passes).
LOSS_SCORES = ("ppl", "nll_per_param")
CACHE_VERSION = 1
STEP_COUNTERS = ("evaluations", "completed", "aborted", "bound_stops", "full_heads", "layer_passes",
                 "sequence_passes", "cache_layer_passes")


def candidate_blocks(num_layers: int, unit: str, block_type: str) -> list[Block]:
    """Every candidate in the official order: all MHA blocks by ascending layer, then all MLP blocks."""
    if unit == "layer":
        return [("layer", i) for i in range(num_layers)]
    mha = [("mha", i) for i in range(num_layers)] if block_type != "mlp" else []
    mlp = [("mlp", i) for i in range(num_layers)] if block_type != "mha" else []
    return mha + mlp


def plan_sets(removed: list[Block]) -> tuple[list[int], list[int], list[int]]:
    """(layers deleted whole, layers losing only attention, layers losing only the MLP) for removed blocks:
    a layer whose both blocks are gone is deleted whole (the same function)."""
    attn, mlp = mask_sets(removed)
    whole = attn & mlp
    return sorted(whole), sorted(attn - whole), sorted(mlp - whole)


def plain_evaluations(num_candidates: int, first_step: int, steps: int) -> int:
    """Evaluations of the plain greedy search for steps first_step+1..first_step+steps: Σ (C - j + 1)."""
    return sum(num_candidates - j for j in range(first_step, first_step + steps))


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
        search = BlockSearch(adapter, calib, self.batch_size, self.cache_device, self.stack_tokens)
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

    def _objective(self, search: BlockSearch, state: dict[str, Any],
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

    def _plain_step(self, search: BlockSearch, remaining: list[Block], state: dict[str, Any],
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

    def _fast_step(self, search: BlockSearch, remaining: list[Block], index: dict[Block, int],
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

    def _one_shot(self, search: BlockSearch, remaining: list[Block], index: dict[Block, int],
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

    def _statistic_step(self, search: BlockSearch, remaining: list[Block], index: dict[Block, int],
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
