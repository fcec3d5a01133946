"""LaCo (Yang et al., 2024, "LaCo: Large Language Model Pruning via Layer Collapse").

Reserving-Differences-while-Seeking-Common (RDSC) merge: layers l+1..l+m collapse into layer l,

    θ*_l = θ_l + Σ_{k=1..m} (θ_{l+k} − θ_l),

and layers l+1..l+m are removed. Scanning from the top (l = H − C) down to L, a merge is kept when the mean
cosine similarity between the final hidden states of the merged and the original model on a few calibration
sentences stays above T; after a kept merge l moves down by I, after a rejected one by 1. C (layers per merge,
m = C − 1), I, L, H and T are the paper's parameters.

Ratio unit: layers, ⌈ratio·L⌉ removed. To meet a target count, the last merge collapses only as many layers
as are still needed, and T is searched (bisection, the largest T that reaches the count) unless
``threshold`` is given.

NOTE(faithfulness): the released notebook updates θ_l in place inside the loop over k, so each step computes
θ_l + (θ_{l+k} − θ_l_current) = θ_{l+k}: the merge reduces to keeping the last layer of the group and dropping
the others (LaCo issue #5). ``merge_rule=released`` reproduces that; ``paper`` (default) is the formula above.
The released code merges only the linear weights; ``merge_params=linear`` does that, ``all`` (default, the
paper's θ) merges every parameter of the layer (norms and biases included). Calibration sentences: the
official code uses 5 short English Wikipedia prefixes; here the first ``n_sentences`` calibration sequences
truncated to ``sentence_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods import WithOptions, require_calibration
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.models.adapter import ModelAdapter
from prune.models.hooks import skip_layers
from prune.options import Options, bounded
from prune.types import PrunePlan


def rdsc_merge(base: dict[str, torch.Tensor], others: list[dict[str, torch.Tensor]], rule: str
               ) -> dict[str, torch.Tensor]:
    """Merged parameters of a base layer and the layers collapsing into it.

    Args:
        base: the base layer's parameters, name -> tensor.
        others: the parameters of layers l+1..l+m (same names).
        rule: ``paper`` (θ_l + Σ(θ_{l+k} − θ_l)) or ``released`` (the official notebook's in-place update).
    """
    merged = {}
    for name, theta in base.items():
        current = theta.clone()
        for layer in others:
            if rule == "paper":
                current += layer[name] - theta
            else:  # released: the difference is taken against the already-updated tensor
                current += layer[name] - current
        merged[name] = current
    return merged


@dataclass(frozen=True)
class LacoOptions(Options):
    """LaCo's knobs (``conf/method/laco.yaml``; C, I, L, H and T are the paper's names).

    Attributes:
        merge_layers: C, layers per merge (the base plus C − 1 collapsed into it).
        interval: I, how far the scan moves down after a kept merge.
        lowest: L, the lowest base layer the scan reaches.
        highest: H, the top of the scan (``None`` = the last layer).
        threshold: T; ``None`` = bisection for the largest T that reaches the target count.
        merge_rule: ``paper`` | ``released``.
        merge_params: ``all`` | ``linear``.
        n_sentences: calibration sequences used for the similarity.
        sentence_tokens: tokens kept of each.
        search_steps: bisection steps of the threshold search.
    """

    merge_layers: int = bounded(7, ge=2)
    interval: int = bounded(1, ge=1)
    lowest: int = bounded(0, ge=0)
    highest: int | None = bounded(None, ge=0)
    threshold: float | None = None
    merge_rule: Literal["paper", "released"] = "paper"
    merge_params: Literal["all", "linear"] = "all"
    n_sentences: int = bounded(5, ge=1)
    sentence_tokens: int = bounded(32, ge=1)
    search_steps: int = bounded(12, ge=0)


class LaCo(WithOptions[LacoOptions]):
    """Layer collapse by RDSC merges accepted on final-hidden-state similarity."""

    ratio_unit = "layers"
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("laco", calib)
        target = layers_to_remove(ratio, adapter.num_layers())
        o = self.options
        sentences = calib.input_ids[: o.n_sentences, : o.sentence_tokens]
        device = next(adapter.model.parameters()).device
        sentences = sentences.to(device)
        with torch.inference_mode():
            dense = adapter.model.base_model(input_ids=sentences, use_cache=False)
            reference = dense.last_hidden_state.clone()
        if o.threshold is not None:
            threshold, merges = o.threshold, self._scan(adapter, sentences, reference, o.threshold, target)
        else:
            threshold, merges = self._search_threshold(adapter, sentences, reference, target)
        removed = sum(len(m["collapsed"]) for m in merges)
        if removed < target:
            raise PruneError(f"laco reached only {removed} of {target} layers even at threshold "
                             f"{threshold:.3f}; lower the ratio or raise method.merge_layers")
        self._apply_merges(adapter, merges)  # weights of the base layers change in place
        return PrunePlan(
            method="laco", ratio=ratio, ratio_unit=self.ratio_unit,
            drop_layers=sorted(i for m in merges for i in m["collapsed"]),
            info={"rounding": ROUNDING, "layers_removed": removed, "threshold": threshold, "merges": merges,
                  "merge_rule": o.merge_rule, "merge_params": o.merge_params,
                  "note": "base layers carry merged weights: save the model, the plan alone cannot rebuild "
                          "it"},
        )

    # -- the scan -------------------------------------------------------------------------------------
    def _layer_params(self, adapter: ModelAdapter, i: int) -> dict[str, torch.Tensor]:
        params = dict(adapter.layer(i).named_parameters())
        if self.options.merge_params == "linear":
            linear = {n for n, m in adapter.layer(i).named_modules() if isinstance(m, torch.nn.Linear)}
            params = {n: p for n, p in params.items()
                      if n.rsplit(".", 1)[0] in linear and n.endswith("weight")}
        return {n: p.detach() for n, p in params.items()}

    def _similarity(self, adapter: ModelAdapter, sentences: torch.Tensor, reference: torch.Tensor,
                    skipped: list[int]) -> float:
        """Mean over sentences of cos(flattened final hidden states), merged model vs original."""
        with torch.inference_mode(), skip_layers(adapter, skipped):
            hidden = adapter.model.base_model(input_ids=sentences, use_cache=False).last_hidden_state
        cosine = F.cosine_similarity(hidden.flatten(1).float(), reference.flatten(1).float(), dim=1)
        return float(cosine.mean())

    def _scan(self, adapter: ModelAdapter, sentences: torch.Tensor, reference: torch.Tensor, threshold: float,
              target: int) -> list[dict[str, Any]]:
        """One top-down pass; returns the accepted merges. Weights are restored afterwards."""
        o = self.options
        alive = list(range(adapter.num_layers()))
        highest = len(alive) - 1 if o.highest is None else o.highest
        merges: list[dict[str, Any]] = []
        # The official scan starts at H − C; clamp for models with fewer than C layers above L.
        removed, pos = 0, max(highest - o.merge_layers, o.lowest)
        backups: list[tuple[int, dict[str, torch.Tensor]]] = []
        try:
            while pos >= o.lowest and removed < target:
                m = min(o.merge_layers - 1, len(alive) - pos - 1, target - removed)
                if m <= 0:
                    pos -= 1
                    continue
                base, collapsed = alive[pos], alive[pos + 1 : pos + 1 + m]
                backup = self._merge_into(adapter, base, collapsed)
                skipped = [i for mg in merges for i in mg["collapsed"]] + collapsed
                sim = self._similarity(adapter, sentences, reference, skipped)
                if sim > threshold:
                    merges.append({"base": base, "collapsed": collapsed, "similarity": sim})
                    backups.append((base, backup))
                    removed += m
                    alive = [i for i in alive if i not in collapsed]
                    pos -= o.interval
                    if pos >= len(alive):
                        pos = len(alive) - 1 - o.merge_layers
                else:
                    self._restore(adapter, base, backup)
                    pos -= 1
        finally:
            for base, backup in reversed(backups):
                self._restore(adapter, base, backup)
        return merges

    def _search_threshold(self, adapter: ModelAdapter, sentences: torch.Tensor, reference: torch.Tensor,
                          target: int) -> tuple[float, list[dict[str, Any]]]:
        """Bisection for the largest T whose scan still removes the target number of layers."""
        low, high = 0.0, 1.0
        best = (0.0, self._scan(adapter, sentences, reference, 0.0, target))
        for _ in tqdm(range(self.options.search_steps), desc="LaCo threshold search", leave=False):
            mid = (low + high) / 2
            merges = self._scan(adapter, sentences, reference, mid, target)
            if sum(len(m["collapsed"]) for m in merges) >= target:
                low, best = mid, (mid, merges)
            else:
                high = mid
        return best

    def _merge_into(self, adapter: ModelAdapter, base: int, collapsed: list[int]) -> dict[str, torch.Tensor]:
        """Write the RDSC merge into the base layer; returns the base layer's previous parameters."""
        base_params = self._layer_params(adapter, base)
        others = [self._layer_params(adapter, i) for i in collapsed]
        merged = rdsc_merge(base_params, others, self.options.merge_rule)
        backup = {n: t.clone() for n, t in base_params.items()}
        with torch.no_grad():
            for name, value in merged.items():
                base_params[name].copy_(value)
        return backup

    def _restore(self, adapter: ModelAdapter, base: int, backup: dict[str, torch.Tensor]) -> None:
        params = self._layer_params(adapter, base)
        with torch.no_grad():
            for name, value in backup.items():
                params[name].copy_(value)

    def _apply_merges(self, adapter: ModelAdapter, merges: list[dict[str, Any]]) -> None:
        for merge in merges:  # in scan order: each merge saw the earlier ones applied
            self._merge_into(adapter, merge["base"], merge["collapsed"])
