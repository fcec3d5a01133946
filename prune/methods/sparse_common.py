"""Shared by the weight-sparsity methods (magnitude, Wanda, SparseGPT): the sparsity patterns, the mask rules
and the sequential layer loop.

Patterns: ``unstructured`` (a fraction ``ratio`` of the weights zeroed) or ``N:M`` (at most N non-zero
weights in every M consecutive weights of a row, along the input dimension: NVIDIA's semi-structured
sparsity; ``2:4`` and ``4:8`` zero half the weights, so ``ratio`` must be 0.5).

NOTE(faithfulness): both official codes read ``N:M`` as "prune N of every M" (wanda ``prune_n``, sparsegpt
``prunen``); the papers and NVIDIA read it as "keep N of every M". The two agree for 2:4 and 4:8, the
patterns the papers run; here ``N`` is the number *kept* (the papers'), so ``1:4`` keeps one weight in four.

The loop (`prune_in_sequence`) is the official codes' layer-by-layer procedure: the decoder layers are
visited in order, each on the outputs of the already pruned layers before it (the pruned model's own
inputs); a layer's linears see the calibration windows one at a time (batch 1, as both codes run), its
statistics are gathered, its linears pruned, and its outputs recomputed with the pruned weights. The model
itself is never edited: each layer is pruned on a copy, and the pruned weights come back in the plan.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.models.adapter import ModelAdapter
from prune.options import Options

PATTERN_RE = re.compile(r"^(\d+):(\d+)$")
RATIO_UNIT = "params"
# What the ratio counts, recorded in every plan: zeros among the decoder layers' linear weights (the codes'
# check_sparsity), never parameters removed.
RATIO_MEANS = "fraction of the decoder layers' linear weights zeroed (sparsity/linear); no parameter removed"


@dataclass(frozen=True)
class SparsityOptions(Options):
    """What every weight-sparsity method takes: the pattern (``unstructured`` or ``N:M``)."""

    pattern: str = "unstructured"

    def check(self) -> None:
        if self.pattern != "unstructured":
            match = PATTERN_RE.match(self.pattern)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise self.error("pattern", "must be unstructured or N:M with 0 < N < M (e.g. 2:4, 4:8)")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N kept, M) of an N:M pattern; None when unstructured."""
        match = PATTERN_RE.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None


def check_ratio(options: SparsityOptions, ratio: float) -> None:
    """An N:M pattern fixes the sparsity at 1 - N/M: another ratio is an error naming the one to pass."""
    if not 0.0 <= ratio < 1.0:
        raise PruneError(f"ratio={ratio} is a sparsity: pass 0 <= ratio < 1")
    nm = options.n_m
    if nm is not None and abs(ratio - (1 - nm[0] / nm[1])) > 1e-9:
        raise PruneError(f"method.pattern={options.pattern} zeroes {1 - nm[0] / nm[1]:g} of the weights; "
                         f"pass ratio={1 - nm[0] / nm[1]:g} (or method.pattern=unstructured)")


def check_columns(name: str, weight: torch.Tensor, nm: tuple[int, int] | None) -> None:
    if nm is not None and weight.shape[1] % nm[1]:
        raise PruneError(f"{name} has {weight.shape[1]} input columns, not a multiple of M={nm[1]}; "
                         "use another pattern or method.pattern=unstructured")


# -- mask rules (True = zeroed, the papers' convention) ----------------------------------------------------

def n_m_mask(score: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """Zero the M - N lowest scores of every M consecutive columns of each row."""
    rows, cols = score.shape
    groups = score.float().reshape(rows, cols // m, m)
    lowest = torch.topk(groups, m - n_keep, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def per_row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ⌊ratio·cols⌋ lowest scores of each row (Wanda's comparison group; stable sort for ties)."""
    k = int(score.shape[1] * ratio)
    order = torch.sort(score, dim=-1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)


def per_matrix_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the scores at or below the ⌊ratio·numel⌋-th smallest (0-based) of the whole matrix.

    NOTE(faithfulness): the codes' threshold rule (magnitude in wanda's prune_magnitude, SparseGPT's
    unstructured block mask): ``<=`` the sorted value at index ⌊ratio·numel⌋ zeroes one element more than
    the ratio (plus ties), kept so that masks match the official code's.
    """
    flat = score.flatten()
    threshold = torch.sort(flat).values[int(flat.numel() * ratio)]
    return score <= threshold


def pattern_mask(score: torch.Tensor, options: SparsityOptions, ratio: float,
                 unstructured: Literal["row", "matrix"]) -> torch.Tensor:
    """The mask of `score` under the options' pattern; ``unstructured`` picks the comparison group."""
    nm = options.n_m
    if nm is not None:
        return n_m_mask(score, *nm)
    if ratio == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    return per_row_mask(score, ratio) if unstructured == "row" else per_matrix_mask(score, ratio)


# -- the decoder layers' linears ----------------------------------------------------------------------------

def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside a decoder layer, by its path in the layer (the codes' find_layers)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def linear_weight_names(adapter: ModelAdapter) -> Iterator[tuple[str, nn.Linear]]:
    """(dense parameter name, linear) of every linear of every decoder layer: what the sparsity counts."""
    for i, layer in enumerate(adapter.layers()):
        for name, linear in layer_linears(layer).items():
            yield f"{adapter.layout.layers}.{i}.{name}.weight", linear


def sequential_groups(adapter: ModelAdapter, layer: nn.Module) -> list[list[str]]:
    """SparseGPT's ``--true-sequential`` groups of a layer: q/k/v, o, the MLP inputs, the MLP output (other
    linears, if a family has any, form a last group)."""
    layout, names = adapter.layout, list(layer_linears(layer))
    groups = [list(layout.attn_in), [layout.attn_out], list(layout.mlp_in), [layout.mlp_out]]
    groups = [[n for n in g if n in names] for g in groups]
    rest = [n for n in names if not any(n in g for g in groups)]
    return [g for g in [*groups, rest] if g]


# -- the sequential loop ---------------------------------------------------------------------------------

class _Captured(Exception):
    """Raised by the pre-hook of the first decoder layer once its input is kept (ends that forward)."""


@dataclass
class LayerInputs:
    """The first layer's hidden inputs, one Tensor[1, T, d] per calibration window, and the keyword
    arguments each decoder layer is called with (position embeddings, masks: the same for every window of
    one length)."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_inputs(adapter: ModelAdapter, calib: CalibrationSet) -> LayerInputs:
    """One full forward of the first window records every layer's keyword arguments (families with sliding
    windows give layers different masks); a forward stopped at the first layer keeps each window's input."""
    model, device = adapter.model, next(adapter.model.parameters()).device
    layers = adapter.layers()
    layer_kwargs: list[dict[str, Any]] = [{} for _ in layers]

    def keep_kwargs(i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            layer_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if args[1:]:
                raise PruneError("a decoder layer takes positional arguments besides its hidden state; "
                                 "the sparse methods' layer loop passes keywords only")
        return hook

    handles = [layer.register_forward_pre_hook(keep_kwargs(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        model.base_model(input_ids=calib.input_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    hidden: list[torch.Tensor] = []

    def keep_first(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden.append(adapter.layer_input(args, kwargs).detach().clone())
        raise _Captured

    handle = layers[0].register_forward_pre_hook(keep_first, with_kwargs=True)
    try:
        for j in range(len(calib)):
            try:
                model.base_model(input_ids=calib.input_ids[j : j + 1].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, layer_kwargs)


def run_layer(adapter: ModelAdapter, layer: nn.Module, hidden: list[torch.Tensor],
              kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The layer's output for every window, one window at a time."""
    return [adapter.hidden(layer(h, **kwargs)) for h in hidden]


@contextmanager
def observe_inputs(linears: dict[str, nn.Linear], add: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``add(name, x)`` with every input Tensor[..., in] a linear receives while the context is open."""
    handles = [lin.register_forward_hook(lambda _m, args, _out, n=name: add(n, args[0].detach()))
               for name, lin in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LinearStatistic:
    """What a method gathers from one linear's inputs (`add`), then turns into its pruned weight (`prune`)."""

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def prune(self, linear: nn.Linear) -> None:
        """Zero (and, for SparseGPT, update) ``linear.weight`` in place: it is the layer copy's."""
        raise NotImplementedError


@torch.no_grad()
def prune_in_sequence(adapter: ModelAdapter, calib: CalibrationSet,
                      make_statistic: Callable[[str, nn.Linear], LinearStatistic],
                      groups: Callable[[nn.Module], list[list[str]]] | None = None,
                      desc: str = "layers") -> dict[str, torch.Tensor]:
    """Prune every decoder layer in order on the pruned model's own inputs; returns ``{dense parameter
    name: pruned weight}`` for every linear of every layer (the model itself is left as it was).

    Args:
        make_statistic: ``(dense parameter name, linear) -> LinearStatistic`` for one linear.
        groups: the linears of a layer pruned one group after another, each group's statistics gathered
            after the previous group is pruned (SparseGPT's true-sequential); default: one group (the codes).
    """
    if len(calib) == 0:
        raise PruneError("the calibration set is empty; raise calib.nsamples")
    inputs = capture_inputs(adapter, calib)
    hidden, pruned = inputs.hidden, {}
    prefix = adapter.layout.layers
    for i in tqdm(range(adapter.num_layers()), desc=desc, leave=False):
        work = copy.deepcopy(adapter.layer(i))
        linears = layer_linears(work)
        for group in groups(work) if groups else [list(linears)]:
            stats = {n: make_statistic(f"{prefix}.{i}.{n}.weight", linears[n]) for n in group}
            with observe_inputs({n: linears[n] for n in group}, lambda n, x: stats[n].add(x)):
                run_layer(adapter, work, hidden, inputs.layer_kwargs[i])
            for n in group:
                stats[n].prune(linears[n])
        hidden = run_layer(adapter, work, hidden, inputs.layer_kwargs[i])  # the pruned layer's outputs
        pruned |= {f"{prefix}.{i}.{n}.weight": lin.weight.detach() for n, lin in linears.items()}
        del work
    return pruned
