"""ELDeR / TRSP (Feng, Wu, Liu, Zhang, Fang, Jin, Che, Shao, Wen, Tao; arXiv 2505.18232, v1 "ELDeR: Getting
Efficient LLMs through Data-Driven Regularized Layer-wise Pruning", v2+ "TRSP: Two-Stage Regularization-Based
Structured Pruning for LLMs", ACL 2026). Ratio unit: layers, ⌈ratio·L⌉ removed (`layers_to_remove`).

Stage 1, layer weights. Every decoder layer gets a learnable scalar S[i] (init 1) multiplying its whole
output, residual included: x_{i+1} = S[i]·Layer_i(x_i). Loss = CE + λ1·Σ_{i alive} |S[i]| (λ1 = 5e-3).
After each round the alive, selectable layer with the smallest |S| is masked (skipped: output = input) and S
is re-learned for the rest, until ⌈ratio·L⌉ layers are masked; they form P.

Two exact properties of this parametrisation (tests/test_elder.py checks both): (1) the final norm is
scale-invariant, so the CE never sees the scale of the last alive layer; L1 alone drives it down, and once it
is masked the next one becomes last, and so on: unprotected, stage 1 drifts to the top layers (on the
embedded model, 8 of 30 layers, CPU preset: the top 8 with ``l1_form=abs``, 7 of the top 9 and layer 18 with
``split``; under the paper's protocol on an H100, ``split`` took 27-29 and five lower layers: layers that the
CE itself wants smaller compete with them). The code's ``alive_list[3:-4]``
(``protect_last=4``) is what prevents this. (2) An identity layer k is not singled
out: only S[k-1]·S[k] reaches the loss, so the two scales stay equal. ``scale_site=delta`` (scale only what a
layer adds) makes an identity layer's scale invisible to the loss instead; it is a deviation, off by default.

Stage 2, regularisation. The scalars are discarded, the layers of P are active again, and all weights train on
CE + λ2·Σ_{i∈P} ‖X_out^i − X_in^i‖ (ℓ2 default, ℓ1 option; λ2 = 1e-3) with AdamW (lr 2e-5, linear schedule,
3% warm-up, weight decay 0), which pushes the P layers toward the identity and moves what they do into the
kept layers. The returned plan drops P; the weights are updated in place, so the pruned model is a stock HF
model with fewer layers.

Official code read as a hint only (it does not run as released): github.com/fmk345/TRSP @ 9fb3435
(``finetune.py``, ``utils/opt/modeling_opt.py``, ``utils/onoff_utils/onoff_{opt,llama}.py``).

NOTE(faithfulness), paper (as summarised in specs/methods.md §3) vs code vs here:
- Stage-1 trainables: the paper learns the layer weights S; the code's optimiser holds S *and* every model
  weight (one AdamW, lr 2e-5). Default here: S only (``stage1_trainable=scales``); ``all`` is the code's
  choice (weights then use ``stage1_weight_lr``).
- S learning rate: not given by the paper; the code's 2e-5 moves S by ~2e-5 per step, so its ranking is set
  by the signs of the first Adam steps. ``stage1_lr`` (own default 5e-2) lets S move; on the embedded model
  its ranking still does not settle with more steps (experiments/table2/README.md).
- Selection: smallest |S| here; the code sorts the signed S. The code never selects the first 3 or last 4
  layers (``alive_list[3:-4]``); here ``protect_first`` / ``protect_last`` (default 0, code 3 / 4).
- L1 form: the paper handles the L1 term "via an equivalent constrained form with auxiliary variables"
  (specs/methods.md §3.2; the form itself is not given). Here ``l1_form=split`` (default): S = u − v with
  u, v ≥ 0, penalty Σ(u + v), u and v clamped at 0 after every step. The code differentiates ‖S‖₁ directly;
  that is ``l1_form=abs``. With Adam the two differ: a split scale stops at exactly 0 instead of crossing it,
  and when the CE gradient on S exceeds λ1, v grows too and S falls about twice as fast.
- L1 weight: paper λ1 = 5e-3; the code hard-codes 100·‖S‖₁. Stage-2 weight: paper λ2 = 1e-3; the code
  multiplies by 1e-4 and (as released) never activates the term; here it is active for all of P at once.
- ‖X_out − X_in‖: the code takes the Frobenius norm of the whole batch tensor with per-device batch 1; here
  the Frobenius (ℓ2) or entrywise ℓ1 norm of each sequence's [T, d] difference, averaged over sequences, so
  the loss does not depend on how a batch is split across micro-batches or processes.
- Labels: full next-token CE over every token (``labels=all``); ``last_token`` reproduces the code's
  SLEB-style labels (all but the last position ignored).
- Schedule: one fresh AdamW + linear schedule per stage-1 round (the code shares one schedule over both
  stages). Steps default to one epoch over the calibration windows per round and for stage 2 (the code
  accumulates to a global batch of 1024).
- The S scalars only select P: stage 2 and the exported model run without them (the code's stage-2 OPT layer
  never applies its scale either).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods import WithOptions, require_calibration
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.methods.training import (
    DataLoss,
    Dist,
    LoopSettings,
    Windows,
    calibration_pieces,
    masked_ce,
    train_loop,
    training_mode,
)
from prune.models.adapter import ModelAdapter
from prune.models.hooks import layer_io, layer_scales
from prune.options import Options, bounded
from prune.quality import UNSETTLED, raised
from prune.types import PrunePlan

log = logging.getLogger(__name__)

# (input_ids[B, T], target_mask[B, T]) -> named scalar loss terms of one micro-batch.
# How many times its stage-1 steps per round an unsettled run's fix asks for: the next budget to try, not one
# known to settle (on the embedded model none measured did; experiments/table2, ELDeR).
FIX_STEPS_FACTOR = 4


class LayerScales:
    """The stage-1 layer weights S (init 1) and their L1 term, in one of two forms.

    ``split`` (paper: the L1 term "via an equivalent constrained form with auxiliary variables"): S = u − v
    with u, v ≥ 0 (u = 1, v = 0 at the start) and the penalty Σ(u + v), which equals Σ|S| at the optimum.
    After every optimiser step u and v are projected back onto ≥ 0, so a scale can settle at exactly 0 and
    changes sign only through v. ``abs`` (the code: ``torch.norm(scale, 1)``): S itself and Σ|S|, whose
    autograd subgradient lets S pass through 0.

    Indexing gives S[i] as a tensor that carries gradients, which is what the `layer_scales` hooks read.
    """

    def __init__(self, num_layers: int, device: torch.device, form: str) -> None:
        self.pos = nn.Parameter(torch.ones(num_layers, device=device, dtype=torch.float32))
        self.neg = nn.Parameter(torch.zeros_like(self.pos)) if form == "split" else None

    def tensor(self) -> torch.Tensor:
        """S as one Tensor[num_layers] that carries gradients."""
        return self.pos if self.neg is None else self.pos - self.neg

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensor()[i]

    def params(self) -> list[nn.Parameter]:
        return [self.pos] if self.neg is None else [self.pos, self.neg]

    def values(self) -> list[float]:
        return self.tensor().detach().cpu().tolist()

    def l1(self, idx: torch.Tensor) -> torch.Tensor:
        """Σ|S| over the layers `idx` (split form: Σ(u + v), the same value whenever u·v = 0)."""
        return self.pos[idx].abs().sum() if self.neg is None else (self.pos[idx] + self.neg[idx]).sum()

    @torch.no_grad()
    def project(self) -> None:
        if self.neg is not None:
            self.pos.clamp_(min=0)
            self.neg.clamp_(min=0)


@dataclass(frozen=True)
class ElderOptions(Options):
    """ELDeR/TRSP's knobs (``conf/method/elder.yaml``); paper vs code choices as in the module docstring."""

    lambda1: float = 5e-3  # weight of the L1 term on the layer scalars (stage 1)
    lambda2: float = 1e-3  # weight of the I/O-difference term on the selected layers (stage 2)
    reg_norm: Literal["l1", "l2"] = "l2"  # l2 (Frobenius, paper) | l1 (entrywise) of each X_out − X_in
    iterative: bool = True  # mask one layer per round (paper); False: the "w/o W" ablation, one shot
    stage2: bool = True  # False: the "w/o R" ablation
    stage1_trainable: Literal["scales", "all"] = "scales"  # all: the code, model weights train in stage 1 too
    # all (paper) | neighbours (memory-light deviation: only the layers of P and their neighbours train;
    # embeddings and head frozen)
    stage2_trainable: Literal["all", "neighbours"] = "all"
    # output (paper: S multiplies the whole output, residual included) | delta (deviation: S multiplies only
    # what the layer adds, x + S·(Layer(x) − x))
    scale_site: Literal["output", "delta"] = "output"
    protect_first: int = bounded(0, ge=0)  # never select the first this many layers (code: 3)
    protect_last: int = bounded(0, ge=0)  # never select the last this many layers (code: 4)
    labels: Literal["all", "last_token"] = "all"  # all next-token targets | last_token (code: SLEB's labels)
    stage1_lr: float = 5e-2  # AdamW lr of the scalars
    stage1_weight_lr: float = 2e-5  # lr of the weights when stage1_trainable=all
    stage2_lr: float = 2e-5  # AdamW lr of stage 2
    warmup_ratio: float = bounded(0.03, ge=0, le=1)  # both stages' linear schedule
    weight_decay: float = 0.0  # both stages' AdamW decay
    # optimiser steps; None derives them from the epochs (passes over the calibration windows)
    stage1_steps_per_round: int | None = bounded(None, ge=0)
    stage1_epochs_per_round: float = 1.0
    stage2_steps: int | None = bounded(None, ge=0)
    stage2_epochs: float = 1.0
    batch_size: int = bounded(1, ge=1)  # sequences per forward pass (micro-batch) and process
    # micro-batches per optimiser step *in total*: under ``accelerate launch`` they are split over the
    # processes, so the global batch (batch_size·grad_accum) does not depend on the process count
    grad_accum: int = bounded(8, ge=1)
    seqlen: int | None = None  # cut each calibration window into pieces of this many tokens (None: whole)
    bf16: bool = True  # autocast to bfloat16 on CUDA (trainable weights in float32 meanwhile); not on CPU
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward pass
    ce_chunk: int = bounded(1024, ge=1)  # positions per LM-head slice in the loss (recomputed in backward)
    seed: int = 0  # order of the calibration windows
    progress: bool = True  # tqdm progress bars (main process only)
    # extension, not in the paper: skip stage 1 and regularise and remove these layers (e.g. another
    # method's selection, to tell the selection's share from stage 2's); the ratio is ignored
    layers: list[int] | None = None
    # split (paper: S = u − v, u, v ≥ 0 projected after each step, penalty Σ(u + v)) | abs (code: Σ|S| by
    # autograd's subgradient); see `LayerScales`
    l1_form: Literal["split", "abs"] = "split"

    @property
    def fixed_layers(self) -> list[int] | None:
        """``layers`` sorted, each once (``None``: stage 1 selects)."""
        return None if self.layers is None else sorted(set(self.layers))

    @property
    def global_batch(self) -> int:
        """Sequences per optimiser step, over all processes."""
        return self.batch_size * self.grad_accum


class Elder(WithOptions[ElderOptions]):
    """ELDeR/TRSP layer pruning: iterative L1-regularised layer weights, then I/O-difference
    regularisation."""

    ratio_unit = "layers"
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("elder", calib)
        o = self.options
        num_layers = adapter.num_layers()
        n, candidates = self._selectable(ratio, num_layers)
        dist = Dist.create(adapter.model)
        if dist.n > o.grad_accum:
            raise PruneError(f"{dist.n} processes but method.grad_accum={o.grad_accum} micro-batches per "
                             f"step; set method.grad_accum to a multiple of {dist.n}")
        data = self._windows(calib)
        info: dict[str, Any] = {
            "rounding": ROUNDING, "layers_removed": n, "protect_first": o.protect_first,
            "protect_last": o.protect_last, "selectable": candidates, "iterative": o.iterative,
            "stage2": o.stage2, "stage1_trainable": o.stage1_trainable, "scale_site": o.scale_site,
            "l1_form": o.l1_form, "stage2_trainable": o.stage2_trainable, "labels": o.labels,
            "reg_norm": o.reg_norm,
            "train_windows": list(data.ids.shape), "global_batch": o.global_batch,
            "processes": dist.n, "fixed_layers": o.fixed_layers,
        }
        if n == 0:
            return PrunePlan(method="elder", ratio=ratio, ratio_unit=self.ratio_unit, info=info)
        scores: dict[str, list[float]] = {}
        with training_mode(adapter.model, o.gradient_checkpointing):
            if o.fixed_layers is None:
                t0 = time.perf_counter()
                order, rounds, curves1 = self._stage1(adapter, data, dist, n, candidates)
                info |= {"selection_order": order, "rounds": rounds, "stage1_curves": curves1,
                         "time_stage1_s": time.perf_counter() - t0}
                info["quality_flags"] = self._quality_flags(rounds, curves1, candidates,
                                                            info["time_stage1_s"])
                scores["abs_scale_round1"] = [abs(s) for s in rounds[0]["scales"]]
            else:
                order = o.fixed_layers
            if o.stage2:
                t1 = time.perf_counter()
                info["stage2_curves"] = self._stage2(adapter, data, dist, sorted(order))
                info["time_stage2_s"] = time.perf_counter() - t1
        return PrunePlan(method="elder", ratio=ratio, ratio_unit=self.ratio_unit, drop_layers=sorted(order),
                         scores=scores, info=info)

    def _selectable(self, ratio: float, num_layers: int) -> tuple[int, list[int]]:
        """How many layers go, and the layers stage 1 may pick (``layers`` fixes both)."""
        o = self.options
        fixed = o.fixed_layers
        if fixed is not None:
            if not fixed or fixed[0] < 0 or fixed[-1] >= num_layers:
                raise o.error("layers", f"must name layers in 0..{num_layers - 1}")
            return len(fixed), list(fixed)
        n = layers_to_remove(ratio, num_layers)
        candidates = list(range(o.protect_first, num_layers - o.protect_last))
        if len(candidates) < n:
            raise PruneError(f"ratio={ratio} removes {n} layers but protect_first={o.protect_first} and "
                             f"protect_last={o.protect_last} leave {len(candidates)}; lower them")
        return n, candidates

    # ---- stage 1 ---------------------------------------------------------------------------------------

    def _stage1(self, adapter: ModelAdapter, data: Windows, dist: Dist, n: int, candidates: list[int]
                ) -> tuple[list[int], list[dict[str, Any]], dict[str, list]]:
        """Learn the layer scalars round by round; mask the smallest |S| after each round (Eq. stage 1)."""
        o = self.options
        model = adapter.model
        num_layers, device = adapter.num_layers(), dist.device(model)
        scales = LayerScales(num_layers, device, o.l1_form)
        masked: list[int] = []  # read by the hooks on every call: masking takes effect at once
        rounds: list[dict[str, Any]] = []
        curves: dict[str, list] = {"ce": [], "l1": [], "loss": [], "lr": [], "scales": [], "round": []}
        weights = [p for p in model.parameters()] if o.stage1_trainable == "all" else []
        steps = self._steps(o.stage1_steps_per_round, o.stage1_epochs_per_round, len(data))
        stream = data.stream(o.seed)  # one stream over all rounds: later rounds see new windows

        def data_loss(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"ce": masked_ce(model, ids, mask, o.ce_chunk)}

        with layer_scales(adapter, scales, masked, o.scale_site):
            for r in range(n if o.iterative else 1):
                alive = [i for i in range(num_layers) if i not in masked]
                alive_t = torch.tensor(alive, device=device)

                def penalty() -> torch.Tensor:
                    return o.lambda1 * scales.l1(alive_t)

                groups = [{"params": scales.params(), "lr": o.stage1_lr}]
                if weights:
                    groups.append({"params": weights, "lr": o.stage1_weight_lr})
                self._train(model, data, stream, groups, steps, data_loss, penalty, dist, "stage1",
                            f"elder stage 1 round {r + 1}", curves,
                            lambda: {"round": r, "scales": scales.values()}, after_step=scales.project)
                values = scales.values()
                selectable = [i for i in candidates if i not in masked]
                ranked = sorted(selectable, key=lambda i: (abs(values[i]), i))
                picked = ranked[:1] if o.iterative else ranked[:n]
                masked.extend(picked)
                rounds.append({"round": r, "scales": values, "selected": picked})
                log.info("elder stage 1 round %d: masked %s (|S| = %s)", r + 1, picked,
                         [round(abs(values[i]), 4) for i in picked])
        return list(masked), rounds, curves

    def _quality_flags(self, rounds: list[dict[str, Any]], curves: dict[str, list], candidates: list[int],
                       seconds: float) -> list[dict[str, str]]:
        """``unsettled`` when some round's ranking was still moving at its end (`unsettled_rounds`), with the
        fix: more steps per round and their cost at this run's pace."""
        late = unsettled_rounds(rounds, curves, candidates)
        if not late:
            return []
        steps = len(curves["round"]) // len(rounds)
        more = (FIX_STEPS_FACTOR - 1) * seconds / 60
        detail = (f"the layer ranking was still moving at the end of round(s) {[r + 1 for r in late]} of "
                  f"{len(rounds)} ({steps} steps per round)")
        fix = (f"method.stage1_steps_per_round={FIX_STEPS_FACTOR * steps} (the next budget to try: about "
               f"{more:.0f} min more of stage 1 at this run's pace)")
        return [raised(UNSETTLED, detail, fix)]

    # ---- stage 2 ---------------------------------------------------------------------------------------

    def _stage2(self, adapter: ModelAdapter, data: Windows, dist: Dist, selected: list[int]
                ) -> dict[str, list]:
        """Train the weights on CE + λ2·Σ_{i∈P} ‖X_out^i − X_in^i‖, the layers of P active (Eq. stage 2)."""
        o = self.options
        model = adapter.model
        if o.stage2_trainable == "all":
            params = list(model.parameters())
        else:  # NOTE(faithfulness): memory-light deviation, not in the paper
            near = sorted({j for i in selected for j in (i - 1, i, i + 1) if 0 <= j < adapter.num_layers()})
            params = [p for j in near for p in adapter.layer(j).parameters()]
        terms: dict[int, torch.Tensor] = {}
        seen = {i: [0.0, 0] for i in selected}  # this process's per-layer ‖X_out − X_in‖ sums, for the curves

        def capture(i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
            if i in seen:
                terms[i] = self._io_norm(x_out, x_in)
                seen[i][0] += terms[i].item()
                seen[i][1] += 1

        def data_loss(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            terms.clear()
            ce = masked_ce(model, ids, mask, o.ce_chunk)
            return {"ce": ce, "reg": o.lambda2 * torch.stack(list(terms.values())).sum()}

        def per_layer() -> dict[str, Any]:
            norms = [total / max(count, 1) for total, count in seen.values()]
            for v in seen.values():
                v[:] = [0.0, 0]
            return {"io_norm_per_layer": norms}

        curves: dict[str, list] = {"ce": [], "reg": [], "loss": [], "lr": [], "io_norm_per_layer": [],
                                   "layers": selected}
        steps = self._steps(o.stage2_steps, o.stage2_epochs, len(data))
        with layer_io(adapter, capture):
            self._train(model, data, data.stream(o.seed + 1), [{"params": params, "lr": o.stage2_lr}],
                        steps, data_loss, None, dist, "stage2", "elder stage 2", curves, per_layer)
        return curves

    def _io_norm(self, x_out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """‖X_out − X_in‖ of each sequence's [T, d] matrix, averaged over the micro-batch: a scalar."""
        diff = (x_out - x_in).float().flatten(1)
        per_seq = diff.norm(dim=1) if self.options.reg_norm == "l2" else diff.abs().sum(dim=1)
        return per_seq.mean()

    # ---- shared training loop ---------------------------------------------------------------------------

    def _train(self, model: nn.Module, data: Windows, stream: Iterator[torch.Tensor],
               groups: list[dict[str, Any]], steps: int, data_loss: DataLoss,
               penalty: Callable[[], torch.Tensor] | None, dist: Dist, stage: str, desc: str,
               curves: dict[str, list], snapshot: Callable[[], dict[str, Any]],
               after_step: Callable[[], None] | None = None) -> None:
        """`prune.methods.training.train_loop` with this method's batch, schedule and precision options.

        Every step's point goes to `curves` and, when the runner opened a W&B run, live under
        ``elder/<stage>/`` (``stage1``: the round, CE, L1 and every scale; ``stage2``: CE, the regulariser and
        ‖X_out − X_in‖ of each layer of P, keyed by layer index; ``plan.info`` keeps them as lists
        (order: ``curves["layers"]``). ``after_step`` is the projection of the split L1 form.
        """
        o = self.options
        settings = LoopSettings(batch_size=o.batch_size, grad_accum=o.grad_accum, warmup_ratio=o.warmup_ratio,
                                weight_decay=o.weight_decay, bf16=o.bf16, progress=o.progress)
        train_loop(model, data, stream, groups, steps, data_loss, dist, settings, desc=desc,
                   live_prefix=f"elder/{stage}", curves=curves, snapshot=snapshot, penalty=penalty,
                   after_step=after_step)

    # ---- data -------------------------------------------------------------------------------------------

    def _windows(self, calib: CalibrationSet) -> Windows:
        ids, mask = calibration_pieces(calib, self.options.seqlen)  # every window longer than seqlen is cut
        if self.options.labels == "last_token":  # NOTE(faithfulness): the code's SLEB labels, only the last
            last = torch.zeros_like(mask)  # target counts
            last[:, -1] = mask[:, -1]
            mask = last
        return Windows(ids, mask, self.options.global_batch)

    def _steps(self, steps: int | None, epochs: float, n_windows: int) -> int:
        if steps is not None:
            return int(steps)
        return max(1, math.ceil(epochs * n_windows / self.options.global_batch))


def unsettled_rounds(rounds: list[dict[str, Any]], curves: dict[str, list], candidates: list[int]
                     ) -> list[int]:
    """The stage-1 rounds (0-based) whose ranking had not settled when they ended: the masked layers were not
    the smallest |S| at every step of the round's second half, or they were smaller than the next selectable
    scale by less than the scales still moved over that half (another step could have reordered them; a
    round of one step has no second half and counts as unsettled)."""
    late: list[int] = []
    masked: list[int] = []
    for r, done in enumerate(rounds):
        selectable = [i for i in candidates if i not in masked]
        snapshots = [s for s, k in zip(curves["scales"], curves["round"]) if k == r]
        if not _settled(snapshots, selectable, set(done["selected"])):
            late.append(r)
        masked.extend(done["selected"])
    return late


def _settled(snapshots: list[list[float]], selectable: list[int], picked: set[int]) -> bool:
    """One round (`unsettled_rounds`): its per-step scale snapshots, the layers it could mask and masked."""
    half = len(snapshots) // 2
    if half == 0:
        return False
    if any(_smallest(values, selectable, len(picked)) != picked for values in snapshots[half:]):
        return False
    before, end = snapshots[half - 1], snapshots[-1]
    moved = max(abs(abs(end[i]) - abs(before[i])) for i in selectable)
    rest = [abs(end[i]) for i in selectable if i not in picked]
    margin = min(rest) - max(abs(end[i]) for i in picked) if rest else math.inf
    return margin > moved


def _smallest(values: list[float], selectable: list[int], k: int) -> set[int]:
    """The k selectable layers stage 1 would mask at these scale values (smallest |S|, ties: lower index)."""
    return set(sorted(selectable, key=lambda i: (abs(values[i]), i))[:k])
