"""LLM-Pruner (Ma, Fang, Wang, NeurIPS 2023, "LLM-Pruner: On the Structural Pruning of Large Language
Models"), block-wise mode: whole attention heads and MLP channels of the middle layers, ranked by
first-order Taylor importance, the same fraction removed in every pruned layer. Recovery fine-tuning (LoRA)
is out of scope.

Official code followed: horseee/LLM-Pruner @ 128a07d (``hf_prune.py --block_wise --pruner_type taylor``,
``LLMPruner/pruner/hf_llama_pruner.TaylorImportance``, ``LLMPruner/torch_pruning/pruner/algorithms/
metapruner.prune_local``; ``llama3.py`` for GQA). What it computes, per pruned layer:

- **Dependency groups.** Attention: one KV group (a head under MHA; under GQA a KV head with the query
  heads that read it) = its q/k/v output rows and the matching o-projection input columns. MLP: one
  intermediate channel = its gate/up (fc1) output row and down (fc2) input column. The layout is fixed by
  the architecture, so the groups are read from the adapter instead of traced (see "dependency graph"
  below).
- **Importance.** One backward pass of the mean next-token loss over the calibration pieces (official: 10
  BookCorpus samples of 64 tokens, one batch) gives each weight's salience s = w·∂L/∂w (``param_first``,
  the official default). ``param_second`` uses w·F·w and ``param_mix`` w·g − ½·w·F·w, F the mean over the
  samples of the squared per-sample gradient (one backward per sample, as the code). Per weight matrix and
  channel: the element-wise form sums |s| over the channel's row / column (``param_*``); ``vectorize``
  takes |Σ s| over it. The per-channel values of the group's matrices are reduced (``grouping``: sum, the
  official default; mean, max, prod, first = the root projection q / gate only), then summed over the
  head_dim channels of a head.
- **How many.** With r the per-layer group ratio (the code's ``--pruning_ratio``): heads removed = ⌊(C −
  int(C·(1−r))) / head_dim⌋ with C the KV channels (q channels under MHA, k channels under GQA:
  ``llama3.py``), MLP channels removed = I − int(I·(1−r)); the lowest scores go (``prune_local``, no global
  ranking, one iterative step).
- **Which layers.** ``[layer_start, layer_end)``, official 4..30 of LLaMA's 32 (README / scripts), scaled
  to the model's depth: round(4·L/32) .. round(30·L/32) (SmolLM2's 30 layers: 4..28).

Ratio: ``ratio_of=all`` (default) reads ``ratio`` as the fraction of *all* parameters to remove, as the
paper's tables state it ("20%" = 5.4B of LLaMA-7B's 6.7B) and as every other width method here counts; the
per-layer group ratio r is the one (over the rounding steps) whose all-parameter figure is nearest.
``ratio_of=layer`` passes ``ratio`` as the code's ``--pruning_ratio`` (0.25 removes ~20% of LLaMA-7B). Both
figures, and the fraction of the pruned layers' parameters, are in ``plan.info["achieved"]``.

The plan is a ``keep_dims`` plan (`prune.models.width`: sites ``attn_heads`` and ``mlp_mid``); the pruned
model is physically smaller, saved as ``<family>_disp`` and reloaded by ``from_pretrained`` after
``import prune``.

Dependency graph: torch-pruning (1.6.1, the maintained library whose 2023 fork LLM-Pruner vendors) traces
it; it is not used: the two group types of a decoder layer are fixed by the architecture and the adapter
names their parts in every family (OPT and Phi included), the framework's surgery must stay the only code
that edits models, and its GQA grouping is its own, not LLM-Pruner's.

NOTE(faithfulness):
- calibration: the first ``num_examples`` pieces of ``seqlen`` tokens of the run's calibration set (pieces
  taken round-robin over its windows, so 8 windows still give 10 pieces), not 10 random BookCorpus samples
  (not available offline). ``calib=c4_documents calib.seqlen=64 calib.seed=42`` is the official
  get_examples draw (random.seed(42) in hf_prune) on C4 shard 0 instead of BookCorpus.
- GQA (not in the official hf_prune; llama3.py roots the group at k_proj and removes the right query heads,
  but folds query channels onto KV channels with stride G·hd, i.e. scores group g with query heads g, g+G,
  ...): here the query heads removed with a group are the ones added to its score (``gqa_fold=grouped``);
  ``gqa_fold=llama3`` reproduces llama3.py. Under MHA both are the official computation.
- ties: a stable sort (the lower index goes first); the code's ``torch.argsort`` leaves ties unordered.
- a group ratio that removes some KV channels but fewer than one head (e.g. 0.25 with 2 or 3 KV groups)
  removes no head here; the official ``prune_local`` fails there (``torch.cat`` of an empty list).
- the code's ``vectorize`` sums the salience per row / column of one matrix (then |·|), not over the whole
  structure the paper's vector-wise formula names; the code's form is implemented.
- the README says param_mix is the default; ``hf_prune.py`` and every script use param_first, as here.
- gradients in the model's dtype on the run's device (the official CPU runs are fp32; GPU runs fp16).
- biases (OPT, Phi, Qwen2's q/k/v) go with their rows, as in the code, and do not enter the importance (the
  code scores ``weight`` only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods import WithOptions, require_calibration
from prune.models.adapter import ModelAdapter
from prune.models.width import HEAD_SITE, SITES, HeadGeometry, KeepDims, WidthCost
from prune.options import Options, bounded
from prune.types import PrunePlan

log = logging.getLogger(__name__)

# Official layer range on LLaMA's 32 layers (README, scripts/llama_prune.sh): range(4, 30).
OFFICIAL_RANGE, OFFICIAL_DEPTH = (4, 30), 32
MID = SITES.index("mlp_mid")

Taylor = Literal["param_first", "vectorize", "param_second", "param_mix"]
REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda t: t.sum(0), "mean": lambda t: t.mean(0), "max": lambda t: t.max(0).values,
    "prod": lambda t: t.prod(0), "first": lambda t: t[0],
}


@dataclass(frozen=True)
class LLMPrunerOptions(Options):
    """LLM-Pruner's knobs (``conf/method/llm_pruner.yaml``).

    Attributes:
        taylor: the salience (``--taylor``): param_first (official default), vectorize, param_second,
            param_mix.
        grouping: how a group's per-matrix channel values combine (``--grouping_strategy``, default sum).
        ratio_of: ``all``: ``ratio`` is the fraction of all parameters; ``layer``: the per-layer group ratio
            (the code's ``--pruning_ratio``).
        layer_start, layer_end: pruned layers ``[start, end)`` (attention and MLP alike, as every official
            script); ``None``: the official 4..30 of 32 scaled to the depth.
        num_examples, seqlen: calibration pieces and their length (official 10 x 64).
        gqa_fold: under GQA, how query-head channel values join their KV channel before the reduction:
            ``grouped`` (default) adds the query heads a KV head serves (heads g·P .. g·P+P−1, what is
            removed with it); ``llama3`` is the official ``llama3.py``'s alignment ``view(P, G·hd).sum(0)``,
            which adds query heads g, g+G, g+2G, ... (not the heads removed with group g). Same under MHA.
    """

    taylor: Taylor = "param_first"
    grouping: Literal["sum", "mean", "max", "prod", "first"] = "sum"
    ratio_of: Literal["all", "layer"] = "all"
    layer_start: int | None = bounded(None, ge=0)
    layer_end: int | None = bounded(None, ge=1)
    num_examples: int = bounded(10, ge=1)
    seqlen: int = bounded(64, ge=2)
    gqa_fold: Literal["grouped", "llama3"] = "grouped"

    def check(self) -> None:
        start, end = self.layer_start, self.layer_end
        if start is not None and end is not None and end <= start:
            raise self.error("layer_end", f"must be > method.layer_start={self.layer_start}")


def official_layer_range(n_layers: int) -> tuple[int, int]:
    """The official 4..30 of 32 scaled to `n_layers`: (round(4·L/32), round(30·L/32))."""
    start, end = (round(b * n_layers / OFFICIAL_DEPTH) for b in OFFICIAL_RANGE)
    return start, max(end, start + 1)


def removed_count(channels: int, ratio: float) -> int:
    """Channels ``prune_local`` removes from `channels` at group ratio `ratio`: C − int(C·(1−r))."""
    return channels - int(channels * (1 - ratio))


@dataclass(frozen=True)
class LayerShape:
    """A pruned layer's group counts: KV groups of `geometry`, `channels` MLP intermediate channels."""

    geometry: HeadGeometry
    channels: int

    def removed(self, ratio: float) -> tuple[int, int]:
        """(KV groups, MLP channels) removed at group ratio `ratio` (the official rounding)."""
        g = self.geometry
        return removed_count(g.groups * g.head_dim, ratio) // g.head_dim, removed_count(self.channels, ratio)


def calibration_pieces(calib: CalibrationSet, n: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` pieces of `seqlen` tokens: piece k is window k mod N at offset (k // N)·seqlen (round-robin over
    the N windows, so fewer windows than pieces still work); ids and their target masks."""
    windows, length = calib.input_ids.shape
    per_window = length // seqlen
    if per_window * windows < n:
        raise PruneError(f"llm_pruner needs {n} calibration pieces of {seqlen} tokens; the calibration set "
                         f"has {windows} x {length} tokens: lower method.num_examples / method.seqlen or "
                         "raise calib.nsamples / calib.seqlen")
    picks = [(k % windows, (k // windows) * seqlen) for k in range(n)]
    ids = torch.stack([calib.input_ids[w, o:o + seqlen] for w, o in picks])
    mask = torch.stack([calib.target_mask[w, o:o + seqlen] for w, o in picks])
    return ids, mask


@contextmanager
def _weights_with_grad(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Eval mode (as ``from_pretrained`` leaves the official model) with gradients for `params` only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def _loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = ids.masked_fill(~mask, -100)  # position 0 is never a target (HF shifts the labels)
    return model(input_ids=ids, labels=labels, use_cache=False).loss


def taylor_terms(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor, mask: torch.Tensor,
                 taylor: str) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """∂L/∂w of the mean loss over the batch, and (param_second / param_mix) F = Σ_j g_j² / N over samples."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with _weights_with_grad(model, params):
        fisher = None
        if taylor in ("param_second", "param_mix"):
            fisher = [torch.zeros_like(p) for p in params]
            for j in range(len(ids)):
                grads = torch.autograd.grad(_loss(model, ids[j:j + 1], mask[j:j + 1]), params)
                for acc, g in zip(fisher, grads):
                    acc += g * g / len(ids)
        grads = list(torch.autograd.grad(_loss(model, ids, mask), params))
    return grads, fisher


def salience(w: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None, taylor: str) -> torch.Tensor:
    """Per-weight salience (``TaylorImportance``): w·g, w·F·w or w·g − ½·w·F·w, in float32."""
    w, g = w.float(), g.float()
    if taylor == "param_second":
        return w * f.float() * w
    if taylor == "param_mix":
        return w * g - 0.5 * w * f.float() * w
    return w * g


def channel_values(s: torch.Tensor, dim: int, taylor: str) -> torch.Tensor:
    """One value per row (dim=1: output channels) or column (dim=0: input channels) of a salience matrix."""
    return s.sum(dim).abs() if taylor == "vectorize" else s.abs().sum(dim)


class LLMPruner(WithOptions[LLMPrunerOptions]):
    """LLM-Pruner block-wise: Taylor-ranked heads and MLP channels, one ratio per pruned layer."""

    needs_calibration = True

    @property
    def ratio_unit(self) -> str:  # type: ignore[override]
        return "params" if self.options.ratio_of == "all" else "groups_per_layer"

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("llm_pruner", calib)
        o = self.options
        layers = self._layers(adapter)
        cost = WidthCost.of(adapter)
        shapes = {i: LayerShape(HeadGeometry.of(adapter, i), cost.widths[i][MID]) for i in layers}
        group_ratio = ratio if o.ratio_of == "layer" else self._group_ratio(cost, shapes, ratio)
        self._check_keeps_something(shapes, group_ratio)
        ids, mask = calibration_pieces(calib, o.num_examples, o.seqlen)
        head_scores, channel_scores = self.scores(adapter, layers, ids, mask)
        keep: KeepDims = {}
        for i in layers:
            heads, channels = shapes[i].removed(group_ratio)
            sites = {HEAD_SITE: _lowest_removed(head_scores[i], heads),
                     "mlp_mid": _lowest_removed(channel_scores[i], channels)}
            sites = {s: kept for s, kept in sites.items() if len(kept) < len(
                head_scores[i] if s == HEAD_SITE else channel_scores[i])}
            if sites:
                keep[str(i)] = sites
        achieved = achieved_ratios(adapter, cost, shapes, group_ratio)
        log.info("llm_pruner: group ratio %.4f over layers %d..%d removes %.4f of all parameters (%.4f of "
                 "the pruned layers')", group_ratio, layers[0], layers[-1] + 1, achieved["all"],
                 achieved["pruned_layers"])
        info = {
            "options": o.as_dict(), "layers": layers, "group_ratio": group_ratio, "achieved": achieved,
            "removed_per_layer": {"heads_kv_groups": shapes[layers[0]].removed(group_ratio)[0],
                                  "mlp_channels": shapes[layers[0]].removed(group_ratio)[1]},
            "rounding": "prune_local: C - int(C*(1-r)) channels, heads = that // head_dim",
            "calibration_used": {"pieces": len(ids), "seqlen": int(ids.shape[1]), "of": calib.info},
            "head_scores": {str(i): head_scores[i].tolist() for i in layers},
        }
        return PrunePlan(method="llm_pruner", ratio=ratio, ratio_unit=self.ratio_unit, keep_dims=keep,
                         scores={"kept_heads": [len(keep.get(str(i), {}).get(HEAD_SITE, head_scores[i]))
                                                for i in layers]}, info=info)

    # ---- what and how much -----------------------------------------------------------------------------

    def _layers(self, adapter: ModelAdapter) -> list[int]:
        o, n = self.options, adapter.num_layers()
        start, end = official_layer_range(n)
        start = start if o.layer_start is None else o.layer_start
        end = end if o.layer_end is None else o.layer_end
        if not 0 <= start < end <= n:
            raise PruneError(f"llm_pruner prunes layers [{start}, {end}); the model has {n} layers: set "
                             f"method.layer_start / method.layer_end within 0..{n}")
        return list(range(start, end))

    def _group_ratio(self, cost: WidthCost, shapes: dict[int, LayerShape], target: float) -> float:
        """The per-layer group ratio whose all-parameter figure is nearest `target` (ties: the smaller)."""
        candidates = {0.0}
        for shape in shapes.values():
            g = shape.geometry
            candidates |= {k / g.groups for k in range(g.groups)}
            candidates |= {m / shape.channels for m in range(shape.channels)}
        best, best_gap, reachable = 0.0, math.inf, 0.0
        for r in sorted(candidates):
            if not _keeps_something(shapes, r):
                continue
            removed = _removed_fraction(cost, shapes, r)
            reachable = max(reachable, removed)
            if abs(removed - target) < best_gap:
                best, best_gap = r, abs(removed - target)
        if target > reachable + 1e-3:
            raise PruneError(f"ratio={target} of all parameters is out of reach: heads and MLP channels of "
                             f"layers {min(shapes)}..{max(shapes) + 1} hold at most {reachable:.4f}; widen "
                             "method.layer_start / method.layer_end or pass method.ratio_of=layer")
        return best

    def _check_keeps_something(self, shapes: dict[int, LayerShape], group_ratio: float) -> None:
        if not _keeps_something(shapes, group_ratio):
            raise PruneError(f"group ratio {group_ratio} removes every head or every MLP channel of a layer: "
                             "pass a smaller ratio (LLM-Pruner keeps each pruned layer's attention and MLP)")

    # ---- importance ------------------------------------------------------------------------------------

    def scores(self, adapter: ModelAdapter, layers: list[int], ids: torch.Tensor, mask: torch.Tensor
               ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per pruned layer: one score per KV group and one per MLP channel (low = removed first)."""
        o = self.options
        modules = {i: [*adapter.attn_in(i), adapter.attn_out(i), *adapter.mlp_in(i), adapter.mlp_out(i)]
                   for i in layers}  # q, k, v, o, gate/up (fc1), down (fc2)
        params = [m.weight for i in layers for m in modules[i]]
        grads, fisher = taylor_terms(adapter.model, params, ids, mask, o.taylor)
        terms = {id(p): (g, f) for p, g, f in zip(params, grads, fisher or [None] * len(params))}
        reduce = REDUCTIONS[o.grouping]
        heads, channels = {}, {}
        with torch.no_grad():
            for i in layers:
                q, k, v, out, *mlp_in, down = (salience(m.weight, *terms[id(m.weight)], o.taylor)
                                               for m in modules[i])
                geometry = HeadGeometry.of(adapter, i)
                heads[i] = _head_scores(geometry, q, k, v, out, o.taylor, reduce, o.gqa_fold)
                rows = [channel_values(m, 1, o.taylor) for m in mlp_in] + [channel_values(down, 0, o.taylor)]
                channels[i] = reduce(torch.stack(rows))
        return heads, channels


def _head_scores(g: HeadGeometry, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 taylor: str, reduce: Callable[[torch.Tensor], torch.Tensor], gqa_fold: str = "grouped"
                 ) -> torch.Tensor:
    """One score per KV group: per-channel values of q rows, k rows, v rows and o columns (q and o folded
    onto their KV channel: `LLMPrunerOptions.gqa_fold`), reduced over the four matrices, summed over
    head_dim."""
    def fold(x: torch.Tensor) -> torch.Tensor:  # query-head channels -> KV-group channels
        if gqa_fold == "llama3":
            return x.view(g.per_group, g.groups * g.head_dim).sum(0)
        return x.view(g.groups, g.per_group, g.head_dim).sum(1).flatten()

    per_channel = torch.stack([fold(channel_values(q, 1, taylor)), channel_values(k, 1, taylor),
                               channel_values(v, 1, taylor), fold(channel_values(out, 0, taylor))])
    return reduce(per_channel).view(g.groups, g.head_dim).sum(1)


def _lowest_removed(scores: torch.Tensor, n: int) -> list[int]:
    """The kept indices once the `n` lowest scores are removed (stable: ties remove the lower index)."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[n:].tolist())


def _keeps_something(shapes: dict[int, LayerShape], r: float) -> bool:
    return all(h < s.geometry.groups and c < s.channels for s in shapes.values() for h, c in [s.removed(r)])


def _sizes(cost: WidthCost, shapes: dict[int, LayerShape], r: float) -> tuple[list[list[int]], list[int]]:
    sizes, heads = [list(w) for w in cost.widths], list(cost.heads)
    for i, shape in shapes.items():
        h, c = shape.removed(r)
        heads[i] -= h
        sizes[i][MID] -= c
    return sizes, heads


def _removed_fraction(cost: WidthCost, shapes: dict[int, LayerShape], r: float) -> float:
    sizes, heads = _sizes(cost, shapes, r)
    return 1 - cost.count(sizes, False, heads) / cost.total


def achieved_ratios(adapter: ModelAdapter, cost: WidthCost, shapes: dict[int, LayerShape], r: float
                    ) -> dict[str, Any]:
    """Removed fraction of all parameters, of the pruned layers' parameters, and the group ratio applied."""
    sizes, heads = _sizes(cost, shapes, r)
    removed = cost.total - cost.count(sizes, False, heads)
    in_layers = sum(p.numel() for i in shapes for p in adapter.layer(i).parameters())
    return {"all": removed / cost.total, "pruned_layers": removed / in_layers, "group_ratio": r,
            "params_removed": int(removed)}
