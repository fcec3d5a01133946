"""SLEB (Song, Oh, Kim, Kim, Kim; ICML 2024, arXiv 2402.09025): greedy removal of whole transformer blocks.

At each step every remaining decoder layer is switched off in turn and the one whose removal gives the
lowest calibration loss (Σ over sequences of the mean token NLL, as the official ``nlls`` sums
``loss * seqlen`` over equal-length sequences) is removed; strict ``<`` keeps the lowest layer on a tie.
This is BlockPruner's search at layer granularity, so it is written once: `Sleb` is a `BlockPruner` with
``unit=layer``, sharing its exact fast search, its plain reference loop and its cached, resumable removal
order.

Official code followed: github.com/jiwonsong-dev/SLEB (``sleb.py``): ``num_remove_blocks`` layers, the
first ``early_barrier`` and the last ``latter_barrier`` layers are never candidates (both 1 by default), 128
random 2048-token windows of WikiText-2 train with seed 0 (``calib=wikitext2``, our default calibration).
Ratio unit: layers, ⌈ratio·L⌉ removed (the rounding SLEB's 20% = 7 of 32 layers implies).
"""

from __future__ import annotations

from prune.data.calibration import CalibrationSet
from prune.methods.blockpruner import Block, BlockPruner
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.models.adapter import ModelAdapter
from prune.types import PrunePlan


class Sleb(BlockPruner):
    """Greedy whole-layer removal by calibration loss, with SLEB's barriers.

    Args:
        early_barrier: the first layers that are never removed (official default 1).
        latter_barrier: the last layers that are never removed (official default 1).
        num_layers: remove exactly this many layers (overrides the ratio; the official ``num_remove_blocks``).
        search_impl, batch_size, cache, cache_key, cache_device, max_sequences, max_seqlen: as for
            `BlockPruner`.
    """

    name = "sleb"
    ratio_unit = "layers"

    def __init__(self, early_barrier: int = 1, latter_barrier: int = 1, num_layers: int | None = None,
                 search_impl: str = "fast", batch_size: int = 1, cache: bool = True,
                 cache_key: str | None = None, cache_device: str | None = None, max_sequences: int | None = None,
                 max_seqlen: int | None = None) -> None:
        super().__init__(unit="layer", num_blocks=num_layers, search_impl=search_impl, batch_size=batch_size,
                         cache=cache, cache_key=cache_key, cache_device=cache_device,
                         max_sequences=max_sequences, max_seqlen=max_seqlen)
        self.early_barrier, self.latter_barrier = early_barrier, latter_barrier
        self.fixed_count = num_layers

    def _candidates(self, num_layers: int) -> list[Block]:
        return [("layer", i) for i in range(self.early_barrier, num_layers - self.latter_barrier)]

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        n_layers = adapter.num_layers()
        if self.fixed_count is None:
            self.num_blocks = layers_to_remove(ratio, n_layers, max_removable=len(self._candidates(n_layers)))
        plan = super().prune(adapter, calib, ratio)
        plan.info |= {"rounding": ROUNDING if self.fixed_count is None else "num_layers given",
                      "barriers": {"early": self.early_barrier, "latter": self.latter_barrier}}
        return plan
