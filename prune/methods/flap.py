"""FLAP (An, Zhao, Yu, Tang, Wang; AAAI 2024, arXiv 2312.11983): fluctuation-based adaptive structured
pruning, and Wanda-sp, the structured Wanda baseline of the same repository. Retraining-free: one
calibration pass, then attention heads (KV groups under GQA) and MLP intermediate channels are removed
for real, and FLAP adds the mean contribution of what it removed to the output biases of o_proj / down_proj.

Official code followed: github.com/CASIA-IVA-Lab/FLAP @ 3bb57db (``lib/prune.py``: ``prune_flap``,
``prune_wanda_sp``, ``compress``, ``cal_remove_neuron``; ``lib/layerwrapper.py``: ``BiasGPT``,
``WrappedGPT``).

Scores, per input channel j of o_proj (attention) and down_proj (MLP), over the calibration tokens X:

- ``metric=fluctuation`` (FLAP's WIFV): Var_tokens(X_j) · ‖W_:,j‖², the input's fluctuation times the squared
  norm of the weight column it multiplies.
- ``metric=wanda_sp``: mean_i |W_ij| · ‖X_j‖₂ (Wanda's score, averaged over the output rows).

Heads (KV groups) and channels are then chosen by ``structure``, the four options of the paper's ablation:

- ``UL-UM``: uniform per layer and module: each layer loses ⌊p·G⌋ groups and ⌊p·C⌋ channels (group score:
  the sum over its channels). Wanda-sp's structure.
- ``UL-MM``: uniform per layer, heads set by hand: ``remove_heads // L`` groups per layer, the rest of each
  layer's budget in channels (``cal_remove_neuron``).
- ``AL-MM``: adaptive over layers, heads set by hand: ``remove_heads`` groups over the whole model,
  channels for the rest of the budget, each chosen globally on the standardised scores.
- ``AL-AM``: adaptive everywhere (FLAP's default): scores standardised per layer and module ((s − mean) / std
  over the layer's channels; a group's score is the mean over its channels), one global threshold over groups
  and channels, each unit weighted by the parameters it holds, so that the kept units add up to the kept
  fraction of parameters.

Bias compensation (``compensate``; FLAP yes, Wanda-sp no): a layer whose o_proj (down_proj) loses input
channels R gets W[:, R] · mean(X_R) added to its output bias (the plan's ``added_biases``; a bias is created
where the linear has none, and the saved model records it so that it reloads without remote code).

Wanda-sp prunes the layers in sequence (layer i's statistics are taken on the outputs of the already pruned
layers 0..i-1), as ``prune_wanda_sp`` does; FLAP takes every statistic from the dense model. `masked` runs a
plan's effect by hooks (the removed channels zeroed, the biases added), the reference the physically pruned
model must equal.

Ratio (``ratio_params``): ``all`` (default), the fraction of all the model's parameters removed, as the tables
compare methods; ``linear``, the code's unit: the fraction of the parameters heads and channels hold (q/k/v/o
and MLP weights, and the q/k/v and MLP input biases). The budget is converted once into the fraction p of the
prunable parameters, which every structure then uses.

NOTE(faithfulness), code vs here (``arithmetic=code`` restores the code's own arithmetic, item by item below):
- The code squares the attention score of ``metric=fluctuation`` (``W_metric = metrics[...](...) ** 2`` for
  o_proj only); the paper's formula does not. paper: not squared; code: squared.
- The code's running variance (``BiasGPT.add_batch``) is not the sample variance: the first sequence's spread
  is dropped, and its update aliases the old and new means. paper: the unbiased variance over all calibration
  tokens; code: its recurrence, one sequence at a time.
- AL-AM weighs a head as 512/3 channels (LLaMA's 4·128·d / 3·d, stored in an int64 tensor: 170) and keeps
  the units scoring strictly above the unit where the kept weight meets the budget, so that unit is removed
  too (even at ratio 0). paper: each unit weighs its parameter count, and that unit is kept; code: the weight
  ⌊group params / channel params⌋ per group, 1 per channel, and the strict threshold.
- GQA (the code is MHA only): the unit is a KV group (its query heads, its k/v head, its o_proj columns); its
  score aggregates all its channels as the code aggregates a head's (sum under UL-*, mean of the
  standardised scores under AL-*). ``remove_heads`` counts KV groups.
- A layer keeps at least one group and one channel (the code can empty a layer, which the HF attention then
  cannot run): the best-scored unit is kept back; ``plan.info["kept_back"]`` counts them.
- The code's ⌊p·n⌋ and ``sort(...)[k]`` index fails when k reaches n; here k is capped at n − 1.
- Calibration: the run's calib set cut into ``seqlen``-token pieces (default 128, the code's ``model.seqlen``)
  in the model's dtype; the code casts the mean inputs used for the biases to fp16 (its model's dtype).
- Wanda-sp with an AL-* structure, or UL-MM, has no reference; AL-* structures need every layer's scores
  before any decision, so only UL-* structures with ``metric=wanda_sp`` prune in sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods import WithOptions, require_calibration
from prune.methods.training import calibration_pieces
from prune.models.adapter import ModelAdapter
from prune.options import Options, bounded
from prune.types import PrunePlan

log = logging.getLogger(__name__)

Structure = Literal["AL-AM", "AL-MM", "UL-MM", "UL-UM"]
# What each metric's reference function does when the options leave it open.
REFERENCE_STRUCTURE = {"fluctuation": "AL-AM", "wanda_sp": "UL-UM"}
REFERENCE_COMPENSATION = {"fluctuation": True, "wanda_sp": False}
HEADS, CHANNELS = "attn_heads", "mlp_mid"  # the keep_dims sites (prune.models.width.SITES)


@dataclass(frozen=True)
class FlapOptions(Options):
    """FLAP's and Wanda-sp's knobs (module docstring)."""

    metric: Literal["fluctuation", "wanda_sp"] = "fluctuation"
    structure: Structure | None = None  # None: the metric's reference (fluctuation AL-AM, wanda_sp UL-UM)
    remove_heads: int | None = bounded(None, ge=0)  # UL-MM / AL-MM: heads (KV groups) removed in all
    compensate: bool | None = None  # None: the metric's reference (fluctuation yes, wanda_sp no)
    ratio_params: Literal["all", "linear"] = "all"
    arithmetic: Literal["paper", "code"] = "paper"
    seqlen: int | None = bounded(128, ge=2)  # calibration piece length (null: the windows as they are)
    nsamples: int | None = bounded(None, ge=1)  # cap on calibration pieces (null: all)
    batch_size: int = bounded(8, ge=1)

    @property
    def layout(self) -> str:
        return self.structure or REFERENCE_STRUCTURE[self.metric]

    @property
    def bias(self) -> bool:
        return REFERENCE_COMPENSATION[self.metric] if self.compensate is None else self.compensate

    @property
    def sequential(self) -> bool:
        """Wanda-sp's layer-by-layer pruning; AL-* decisions need every layer's scores first."""
        return self.metric == "wanda_sp" and self.layout.startswith("UL")

    def check(self) -> None:
        manual = self.layout.endswith("MM")
        if manual and self.remove_heads is None:
            raise self.error("remove_heads", f"must be set with structure={self.layout}: the number of heads "
                             "(KV groups under GQA) to remove over all layers")
        if not manual and self.remove_heads is not None:
            raise self.error("remove_heads", f"is only read by structure UL-MM or AL-MM, not {self.layout}; "
                             "drop it")


# ----------------------------------------------------------------------------------------------------------
# Units: what a KV group and a channel are, and what they cost
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Units:
    """The prunable units of one decoder layer.

    Attributes:
        groups: KV groups (the heads of an MHA model).
        group_channels: o_proj input channels per group (query heads per group x head_dim).
        channels: MLP intermediate channels.
        group_params: parameters one group holds (its q/k/v rows with their biases, its o_proj columns).
        channel_params: parameters one channel holds (its MLP input rows with biases, its down_proj column).
    """

    groups: int
    group_channels: int
    channels: int
    group_params: int
    channel_params: int

    @property
    def params(self) -> int:
        return self.groups * self.group_params + self.channels * self.channel_params

    def channel_mask(self, group_mask: torch.Tensor) -> torch.Tensor:
        """o_proj input channels of the groups `group_mask` marks (HF orders them head by head)."""
        return group_mask.repeat_interleave(self.group_channels)


def _rows(linear: nn.Linear, n: int) -> int:
    return n * (linear.in_features + (linear.bias is not None))


def layer_units(adapter: ModelAdapter, i: int) -> Units:
    q, k, v = adapter.attn_in(i)
    o, down = adapter.attn_out(i), adapter.mlp_out(i)
    heads = adapter.model.config.num_attention_heads
    head_dim = q.out_features // heads
    groups = k.out_features // head_dim
    if heads % groups or q.out_features != heads * head_dim:
        raise PruneError(f"layer {i}: {heads} query heads do not split into {groups} KV groups; flap needs a "
                         "stock (unpruned) attention")
    per_group = heads // groups * head_dim
    group_params = _rows(q, per_group) + _rows(k, head_dim) + _rows(v, head_dim) + per_group * o.out_features
    channel_params = sum(_rows(m, 1) for m in adapter.mlp_in(i)) + down.out_features
    return Units(groups, per_group, down.in_features, group_params, channel_params)


# ----------------------------------------------------------------------------------------------------------
# Statistics of the o_proj / down_proj inputs
# ----------------------------------------------------------------------------------------------------------


class InputStats:
    """Per-channel statistics of one linear's input over the calibration tokens.

    Exact sums in float64 (mean, unbiased variance, sum of squares), and the code's running mean and
    "fluctuation" (``BiasGPT.add_batch``), updated one sequence at a time as the code's batch of one.
    """

    def __init__(self, width: int) -> None:
        self.tokens, self.sequences = 0, 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.squares = torch.zeros(width, dtype=torch.float64)
        self.running_mean = torch.zeros(width)
        self.running_fluctuation = torch.zeros(width)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        flat = x.reshape(-1, x.shape[-1]).double()
        self.sum += flat.sum(0)
        self.squares += (flat * flat).sum(0)
        self.tokens += flat.shape[0]
        for seq in x.reshape(-1, x.shape[-2], x.shape[-1]):
            n = self.sequences
            self.running_mean = self.running_mean * (n / (n + 1)) + seq.mean(0) / (n + 1)
            if n == 0:  # the code sets the fluctuation to 0 after the first sequence: its spread is dropped
                self.running_fluctuation = torch.zeros_like(self.running_mean)
            else:  # the code's old mean aliases the updated one: both factors use the new mean
                centred = seq - self.running_mean
                self.running_fluctuation = self.running_fluctuation * ((n - 1) / n) \
                    + (centred * centred).sum(0) / (n + 1)
            self.sequences += 1

    def mean(self, code: bool) -> torch.Tensor:
        return self.running_mean.double() if code else self.sum / self.tokens

    def variance(self, code: bool) -> torch.Tensor:
        if code:
            return self.running_fluctuation.double()
        if self.tokens < 2:
            raise PruneError("flap needs at least two calibration tokens")
        return ((self.squares - self.sum * self.sum / self.tokens) / (self.tokens - 1)).clamp_min(0)

    def mean_square_norm(self) -> torch.Tensor:
        """Wanda's ``scaler_row``: Σ_tokens x² / sequences (its square root is ‖X_j‖ up to scale)."""
        return self.squares / self.sequences


def channel_scores(metric: str, stats: InputStats, weight: torch.Tensor, code: bool,
                   attention: bool) -> torch.Tensor:
    """One score per input channel of o_proj / down_proj (float64)."""
    w = weight.detach().double().cpu()
    if metric == "wanda_sp":
        return (w.abs() * stats.mean_square_norm().sqrt()).mean(0)
    score = stats.variance(code) * (w * w).sum(0)
    return score * score if code and attention else score  # the code squares the attention score


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over one layer's channels (unbiased std, as torch.std in the code)."""
    return (x - x.mean()) / x.std()


# ----------------------------------------------------------------------------------------------------------
# Selection: the four structures with the code's rounding
# ----------------------------------------------------------------------------------------------------------


def drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The code's per-layer rule: keep scores >= the (k+1)-th smallest (k capped below the count)."""
    k = min(max(k, 0), scores.numel() - 1)
    return scores >= torch.sort(scores)[0][k]


def drop_global(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The code's AL-MM rule over all layers: keep scores above the k-th smallest (nothing removed at k=0)."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = torch.sort(scores.flatten(), descending=True)[0]
    return scores > flat[-min(k, flat.numel())]


def global_budget(attn: torch.Tensor, mlp: torch.Tensor, weights: tuple[float, float], keep_fraction: float,
                  strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AL-AM: one threshold over all groups and channels such that the kept units' weight is closest to
    ``keep_fraction`` of the total. ``strict`` (code): keep scores above the unit where the cumulative weight
    meets the budget (that unit goes too); else keep the units up to and including it."""
    scores = torch.cat([attn.flatten(), mlp.flatten()])
    unit_weight = torch.cat([torch.full((attn.numel(),), weights[0], dtype=torch.float64),
                             torch.full((mlp.numel(),), weights[1], dtype=torch.float64)])
    ordered, order = torch.sort(scores, descending=True)
    cumulative = torch.cumsum(unit_weight[order], 0)
    k = int(torch.argmin((cumulative - cumulative[-1] * keep_fraction).abs()))
    if strict:
        keep = scores > ordered[k]
    else:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[: k + 1]] = True
    return keep[: attn.numel()].view_as(attn), keep[attn.numel():].view_as(mlp)


# ----------------------------------------------------------------------------------------------------------
# Running the calibration pieces
# ----------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends a forward pass after a chosen layer, carrying that layer's output hidden state."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Replay(nn.Module):
    """Stands in for the layers before the current one: emits the cached state entering it."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden


class Passes:
    """The calibration pieces, in batches, through the whole model or one layer at a time (Wanda-sp)."""

    def __init__(self, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int) -> None:
        self.adapter = adapter
        self.device = next(adapter.model.parameters()).device
        self.batches = [ids[s : s + batch_size].to(self.device) for s in range(0, len(ids), batch_size)]
        self.states: list[torch.Tensor] | None = None  # per batch: the hidden state entering `self.layer`
        self.layer = 0

    def full(self) -> None:
        """Every batch through the decoder (no LM head)."""
        for ids in self.batches:
            self.adapter.model.base_model(input_ids=ids, use_cache=False)

    def through(self, i: int) -> list[torch.Tensor]:
        """Every batch through layer i only (layers before it replayed from cached states); its outputs."""
        if i != self.layer and self.states is not None:
            raise AssertionError("layers are run in order")
        layers, outputs = self.adapter.layers(), []
        handle = layers[i].register_forward_hook(_stop_after, with_kwargs=True)
        try:
            for b, ids in enumerate(self.batches):
                outputs.append(self._run(layers, i, ids, None if self.states is None else self.states[b]))
        finally:
            handle.remove()
        return outputs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.states, self.layer = outputs, self.layer + 1

    def _run(self, layers: nn.ModuleList, i: int, ids: torch.Tensor, state: torch.Tensor | None
             ) -> torch.Tensor:
        originals = [layers[k] for k in range(i)]
        if i:
            stub = _Replay(state)
            for k in range(i):
                layers[k] = stub
        try:
            self.adapter.model.base_model(input_ids=ids, use_cache=False)
        except _Stop as stop:
            return stop.hidden
        finally:
            for k, module in enumerate(originals):
                layers[k] = module
        raise AssertionError(f"layer {i} never ran")


def _stop_after(_m: nn.Module, _a: tuple, _k: dict, out: Any) -> None:
    raise _Stop(ModelAdapter.hidden(out).detach())


@contextmanager
def recording(adapter: ModelAdapter, layers: list[int], stats: dict[tuple[int, str], InputStats]
              ) -> Iterator[None]:
    """Feed the inputs of o_proj ("attn") and down_proj ("mlp") of `layers` into `stats`."""
    handles = []
    for i in layers:
        for site, module in (("attn", adapter.attn_out(i)), ("mlp", adapter.mlp_out(i))):
            entry = stats.setdefault((i, site), InputStats(module.in_features))

            def hook(_m: nn.Module, args: tuple, entry: InputStats = entry) -> None:
                entry.add(args[0])

            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def masked(adapter: ModelAdapter, plan: PrunePlan) -> Iterator[None]:
    """The plan's effect by hooks, weights untouched: the inputs of o_proj from removed groups and of
    down_proj from removed channels are zeroed, and the plan's added biases are added to the outputs. The
    physically pruned model must compute the same (tests)."""
    handles = []

    def zero_inputs(mask: torch.Tensor) -> Callable[..., tuple]:
        def hook(_m: nn.Module, args: tuple) -> tuple:
            return (args[0] * mask.to(args[0].device, args[0].dtype), *args[1:])
        return hook

    def add_output(bias: torch.Tensor) -> Callable[..., torch.Tensor]:
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + bias.to(out.device, out.dtype)
        return hook

    for key, sites in plan.keep_dims.items():
        i = int(key)
        units = layer_units(adapter, i)
        for site, module, width, expand in ((HEADS, adapter.attn_out(i), units.groups, units.channel_mask),
                                            (CHANNELS, adapter.mlp_out(i), units.channels, lambda m: m)):
            if site in sites:
                keep = torch.zeros(width, dtype=torch.bool)
                keep[sites[site]] = True
                handles.append(module.register_forward_pre_hook(zero_inputs(expand(keep))))
    for name, bias in plan.tensors_of("added_biases").items():
        handles.append(adapter.model.get_submodule(name).register_forward_hook(add_output(bias)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LayerDecision:
    keep_groups: torch.Tensor  # bool [G]
    keep_channels: torch.Tensor  # bool [C]


class Flap(WithOptions[FlapOptions]):
    """FLAP and Wanda-sp (module docstring). Ratio unit: params (``ratio_params``)."""

    name = "flap"
    ratio_unit = "params"
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        o = self.options
        calib = require_calibration(self.name, calib)
        started = time.perf_counter()
        units = [layer_units(adapter, i) for i in range(adapter.num_layers())]
        p = self._prunable_fraction(adapter, units, ratio)
        ids, _ = calibration_pieces(calib, o.seqlen)
        ids = ids[: o.nsamples]
        passes = Passes(adapter, ids, o.batch_size)
        with torch.no_grad():
            if o.sequential:
                decisions, stats, scores = self._sequential(adapter, passes, units, p)
            else:
                stats = {}
                with recording(adapter, list(range(adapter.num_layers())), stats):
                    passes.full()
                scores = self._scores(adapter, stats, units)
                decisions = self._decide(scores, units, p)
        kept_back = self._keep_one(decisions, scores)
        plan = self._plan(adapter, ratio, units, decisions, stats)
        plan.info |= {
            "options": o.as_dict(), "structure": o.layout, "compensate": o.bias, "sequential": o.sequential,
            "prunable_fraction": p, "kept_back": kept_back, "calibration_pieces": len(ids),
            "calibration_seqlen": int(ids.shape[1]), "score_s": time.perf_counter() - started,
            **self._achieved(adapter, units, decisions),
        }
        return plan

    # -- budget -----------------------------------------------------------------------------------------

    def _prunable_fraction(self, adapter: ModelAdapter, units: list[Units], ratio: float) -> float:
        """The fraction p of the prunable parameters to remove, from the ratio in its unit."""
        prunable = sum(u.params for u in units)
        if self.options.ratio_params == "linear":
            p = ratio
        else:
            p = ratio * count_params(adapter)["params/total"] / prunable
        if not 0 <= p < 1:
            raise PruneError(f"ratio={ratio} of all parameters is {p:.1%} of the {prunable} parameters heads "
                             f"and channels hold; lower the ratio (at most "
                             f"{prunable / count_params(adapter)['params/total']:.3f})")
        return p

    def _manual_channels(self, units: list[Units], p: float, per_layer: bool, n: int) -> tuple[int, int]:
        """UL-MM / AL-MM (``cal_remove_neuron``): groups removed (per layer of the n, or in all), and channels
        for the rest of the same budget."""
        heads = self.options.remove_heads or 0
        u = units[0]
        if per_layer:
            heads, budget = heads // n, p * u.params
        else:
            budget = p * sum(x.params for x in units)
        channels = int((budget - heads * u.group_params) / u.channel_params)
        if channels < 0:
            raise PruneError(f"method.remove_heads={self.options.remove_heads} removes more parameters than "
                             "the ratio allows; lower it or raise the ratio")
        return heads, channels

    # -- scores -----------------------------------------------------------------------------------------

    def _scores(self, adapter: ModelAdapter, stats: dict[tuple[int, str], InputStats], units: list[Units]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the group scores and the channel scores the structure compares."""
        pairs = [self._layer_scores(adapter, i, stats, u) for i, u in enumerate(units)]
        return [a for a, _ in pairs], [m for _, m in pairs]

    def _layer_scores(self, adapter: ModelAdapter, i: int, stats: dict[tuple[int, str], InputStats],
                      u: Units) -> tuple[torch.Tensor, torch.Tensor]:
        o, code = self.options, self.options.arithmetic == "code"
        attn = channel_scores(o.metric, stats[i, "attn"], adapter.attn_out(i).weight, code, attention=True)
        mlp = channel_scores(o.metric, stats[i, "mlp"], adapter.mlp_out(i).weight, code, attention=False)
        if o.layout.startswith("AL"):  # standardised per layer; a group is the mean over its channels
            return standardise(attn).view(u.groups, -1).mean(1), standardise(mlp)
        return attn.view(u.groups, -1).sum(1), mlp  # raw; a group is the sum over its channels

    def _decide(self, scores: tuple[list[torch.Tensor], list[torch.Tensor]], units: list[Units], p: float,
                num_layers: int | None = None) -> list[LayerDecision]:
        """Kept groups and channels of the layers `units` describes (all of them, or one of `num_layers`)."""
        o = self.options
        attn, mlp = scores
        if o.layout == "UL-UM":
            return [LayerDecision(drop_lowest(a, int(p * u.groups)), drop_lowest(m, int(u.channels * p)))
                    for a, m, u in zip(attn, mlp, units)]
        if o.layout == "UL-MM":
            heads, channels = self._manual_channels(units, p, per_layer=True, n=num_layers or len(units))
            return [LayerDecision(drop_lowest(a, heads), drop_lowest(m, channels)) for a, m in zip(attn, mlp)]
        if o.layout == "AL-MM":
            heads, channels = self._manual_channels(units, p, per_layer=False, n=len(units))
            keep_a, keep_m = drop_global(torch.stack(attn), heads), drop_global(torch.stack(mlp), channels)
        else:
            u = units[0]
            code = o.arithmetic == "code"
            weights = (float(u.group_params // u.channel_params), 1.0) if code \
                else (float(u.group_params), float(u.channel_params))
            keep_a, keep_m = global_budget(torch.stack(attn), torch.stack(mlp), weights, 1 - p, strict=code)
        return [LayerDecision(a, m) for a, m in zip(keep_a, keep_m)]

    def _sequential(self, adapter: ModelAdapter, passes: Passes, units: list[Units], p: float
                    ) -> tuple[list[LayerDecision], dict[tuple[int, str], InputStats],
                               tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Wanda-sp: layer i scored on the outputs of the pruned layers before it, then pruned (masked)."""
        stats: dict[tuple[int, str], InputStats] = {}
        decisions: list[LayerDecision] = []
        attn_all: list[torch.Tensor] = []
        mlp_all: list[torch.Tensor] = []
        done = PrunePlan(method=self.name, ratio=0.0, ratio_unit=self.ratio_unit)
        for i in range(len(units)):
            with recording(adapter, [i], stats):
                passes.through(i)
            attn, mlp = self._layer_scores(adapter, i, stats, units[i])
            decision = self._decide(([attn], [mlp]), [units[i]], p, num_layers=len(units))[0]
            self._keep_one([decision], ([attn], [mlp]))
            decisions.append(decision)
            attn_all.append(attn)
            mlp_all.append(mlp)
            done = self._plan(adapter, 0.0, units[: i + 1], decisions, stats)
            with masked(adapter, done):
                passes.advance(passes.through(i))
        return decisions, stats, (attn_all, mlp_all)

    @staticmethod
    def _keep_one(decisions: list[LayerDecision], scores: tuple[list[torch.Tensor], list[torch.Tensor]]
                  ) -> int:
        """A layer keeps at least its best group and channel (NOTE(faithfulness)); how many were kept back."""
        kept_back = 0
        for d, a, m in zip(decisions, *scores):
            for keep, score in ((d.keep_groups, a), (d.keep_channels, m)):
                if not keep.any():
                    keep[int(torch.argmax(score))] = True
                    kept_back += 1
        return kept_back

    # -- the plan ---------------------------------------------------------------------------------------

    def _plan(self, adapter: ModelAdapter, ratio: float, units: list[Units], decisions: list[LayerDecision],
              stats: dict[tuple[int, str], InputStats]) -> PrunePlan:
        o, code = self.options, self.options.arithmetic == "code"
        keep_dims: dict[str, dict[str, list[int]]] = {}
        tensors: dict[str, torch.Tensor] = {}
        prefix = adapter.layout.layers
        for i, (u, d) in enumerate(zip(units, decisions)):
            sites = {}
            for site, keep, linear_path, removed in (
                (HEADS, d.keep_groups, adapter.layout.attn_out, ~u.channel_mask(d.keep_groups)),
                (CHANNELS, d.keep_channels, adapter.layout.mlp_out, ~d.keep_channels),
            ):
                if keep.all():
                    continue
                sites[site] = torch.nonzero(keep).flatten().tolist()
                if o.bias:
                    module = adapter.model.get_submodule(f"{prefix}.{i}.{linear_path}")
                    kind = "attn" if site == HEADS else "mlp"
                    tensors[f"added_biases/{prefix}.{i}.{linear_path}"] = compensation(
                        module.weight, stats[i, kind].mean(code), removed)
            if sites:
                keep_dims[str(i)] = sites
        return PrunePlan(method=self.name, ratio=ratio, ratio_unit=self.ratio_unit, keep_dims=keep_dims,
                         tensors=tensors)

    def _achieved(self, adapter: ModelAdapter, units: list[Units], decisions: list[LayerDecision]
                  ) -> dict[str, Any]:
        prunable = sum(u.params for u in units)
        removed = sum((u.groups - int(d.keep_groups.sum())) * u.group_params
                      + (u.channels - int(d.keep_channels.sum())) * u.channel_params
                      for u, d in zip(units, decisions))
        return {"achieved_linear": removed / prunable,
                "achieved_all": removed / count_params(adapter)["params/total"],
                "kept_groups": [int(d.keep_groups.sum()) for d in decisions],
                "kept_channels": [int(d.keep_channels.sum()) for d in decisions]}


def compensation(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's bias: the removed input channels' mean contribution, W[:, R] · mean(X_R)."""
    w = weight.detach().double().cpu()
    return (w[:, removed] @ mean[removed].double()).to(weight.dtype)
