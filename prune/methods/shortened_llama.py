"""Shortened LLaMA (Kim et al., 2024, "Shortened LLaMA: Depth Pruning for LLMs with Comparison of Retraining
Methods"): one-shot removal of whole transformer blocks ranked by an importance criterion.

- ``criterion=ppl``: importance of block i = calibration perplexity of the model with block i removed (all
  other blocks present). Low PPL after removal = unimportant.
- ``criterion=taylor`` (Taylor+): importance of block i = Σ over its weight matrices of
  Σ_rows |Σ_cols θ·∂L/∂θ|, i.e. the first-order Taylor estimate of the loss change, accumulated over
  calibration batches; the "+" heuristic keeps the first 4 and the last 2 blocks out of the candidates
  (official code, ``block_prune.py``).

Blocks are removed in ascending importance; ratio unit: layers, ⌈ratio·L⌉ removed. LoRA retraining, which the
paper applies afterwards, is out of scope here.

NOTE(faithfulness): the paper calibrates on 10 random BookCorpus samples of 128 tokens; BookCorpus is not
available offline, so the first ``max_sequences`` (10) windows of the configured calibration set, cut to their
first ``max_seqlen`` (128) tokens, are used (the paper's sizes; null for the whole set). The official Taylor
score sums |salience| over the input dimension per output row (``norm_power=1``) and then over rows and
matrices; norms are included (vector salience). We follow that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

from prune.data.calibration import CalibrationSet
from prune.eval.nll import sequence_nll
from prune.methods import WithOptions, require_calibration
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.models.adapter import ModelAdapter
from prune.models.hooks import skip_layers
from prune.options import Options, bounded
from prune.types import PrunePlan


@dataclass(frozen=True)
class ShortenedLlamaOptions(Options):
    """Shortened LLaMA's knobs (``conf/method/shortened_llama.yaml``).

    Attributes:
        criterion: ``ppl`` | ``taylor``.
        plus_heuristic: keep the first ``keep_first`` and last ``keep_last`` blocks; ``None`` = on for taylor
            (Taylor+), off for ppl, as in the paper.
        keep_first: blocks protected at the bottom under the heuristic (official: 4).
        keep_last: blocks protected at the top under the heuristic (official: 2).
        batch_size: calibration sequences per forward pass.
        max_sequences, max_seqlen: use the first sequences of the calibration set, cut to their first
            tokens (paper: 10 x 128); ``None`` = all.
    """

    criterion: Literal["ppl", "taylor"] = "ppl"
    plus_heuristic: bool | None = None
    keep_first: int = bounded(4, ge=0)
    keep_last: int = bounded(2, ge=0)
    batch_size: int = bounded(1, ge=1)
    max_sequences: int | None = bounded(10, ge=1)
    max_seqlen: int | None = bounded(128, ge=1)

    @property
    def protects_ends(self) -> bool:
        """Whether the "+" heuristic is on (``plus_heuristic``, by default on for taylor only)."""
        return self.criterion == "taylor" if self.plus_heuristic is None else self.plus_heuristic


class ShortenedLlama(WithOptions[ShortenedLlamaOptions]):
    """One-shot block removal by PPL or Taylor+ importance."""

    ratio_unit = "layers"
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("shortened_llama", calib)
        o = self.options
        calib = calib.limited(o.max_sequences, o.max_seqlen)
        n_layers = adapter.num_layers()
        candidates = list(range(n_layers))
        if o.protects_ends:
            candidates = candidates[o.keep_first : n_layers - o.keep_last]
        n = layers_to_remove(ratio, n_layers, max_removable=len(candidates))
        score = self._ppl_scores if o.criterion == "ppl" else self._taylor_scores
        scores = score(adapter, calib)
        order = sorted(candidates, key=lambda i: (scores[i], i))
        return PrunePlan(
            method="shortened_llama", ratio=ratio, ratio_unit=self.ratio_unit, drop_layers=sorted(order[:n]),
            scores={o.criterion: scores},
            info={"rounding": ROUNDING, "layers_removed": n, "criterion": o.criterion,
                  "plus_heuristic": o.protects_ends, "candidates": candidates, "removal_order": order,
                  "calibration_used": {"sequences": len(calib), "seqlen": int(calib.input_ids.shape[1])}},
        )

    @torch.inference_mode()
    def _ppl_scores(self, adapter: ModelAdapter, calib: CalibrationSet) -> list[float]:
        scores = []
        for i in tqdm(range(adapter.num_layers()), desc="block PPL", leave=False):
            with skip_layers(adapter, [i]):
                scores.append(_calibration_ppl(adapter, calib, self.options.batch_size))
        return scores

    def _taylor_scores(self, adapter: ModelAdapter, calib: CalibrationSet) -> list[float]:
        model = adapter.model
        layers = list(adapter.layers())
        params = {name: p for i, layer in enumerate(layers) for name, p in
                  ((f"{i}.{n}", p) for n, p in layer.named_parameters()) if name.split(".")[-1] == "weight"}
        saliences = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for s in tqdm(range(0, len(calib), self.options.batch_size), desc="Taylor saliency", leave=False):
            batch = calib.input_ids[s : s + self.options.batch_size].to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            with torch.no_grad():
                for name, p in params.items():
                    saliences[name] += (p * p.grad).float()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        scores = [0.0] * len(layers)
        for name, sal in saliences.items():
            per_row = sal.abs().sum(dim=1) if sal.dim() == 2 else sal.abs()  # matrices: sum over inputs
            scores[int(name.split(".")[0])] += float(per_row.sum())
        return scores


def _calibration_ppl(adapter: ModelAdapter, calib: CalibrationSet, batch_size: int) -> float:
    """Token-weighted perplexity of the calibration set under the model's current state."""
    device = next(adapter.model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(calib), batch_size):
        nll, n = sequence_nll(adapter.model, calib.input_ids[s : s + batch_size].to(device),
                              calib.target_mask[s : s + batch_size].to(device))
        total, count = total + float(nll.sum()), count + int(n.sum())
    return math.exp(total / count)
