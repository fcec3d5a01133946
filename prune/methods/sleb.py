"""SLEB (Song, Oh, Kim, Kim, Kim; ICML 2024, arXiv 2402.09025): greedy removal of whole transformer blocks.

At each step every remaining decoder layer is switched off in turn and the one whose removal gives the
lowest calibration loss (Σ over sequences of the mean token NLL, as the official ``nlls`` sums
``loss * seqlen`` over equal-length sequences) is removed; strict ``<`` keeps the lowest layer on a tie.
This is BlockPruner's search at layer granularity, so it is written once: `Sleb` composes
`prune.methods.greedy.GreedySearch` with its own candidates (whole layers between the barriers) and its
count rule, sharing BlockPruner's exact fast search, its plain reference loop and its cached, resumable
removal order.

Official code followed: github.com/jiwonsong-dev/SLEB (``sleb.py``): ``num_remove_blocks`` layers, the
first ``early_barrier`` and the last ``latter_barrier`` layers are never candidates (both 1 by default), 128
random 2048-token windows of WikiText-2 train with seed 0 (``calib=wikitext2``, our default calibration).
Ratio unit: layers, ⌈ratio·L⌉ removed (the rounding SLEB's 20% = 7 of 32 layers implies).
"""

from __future__ import annotations

from dataclasses import dataclass

from prune.data.calibration import CalibrationSet
from prune.methods.block_search import Block
from prune.methods.greedy import GreedyMethod, GreedySearch, SearchOptions
from prune.methods.layer_common import ROUNDING, layers_to_remove
from prune.models.adapter import ModelAdapter
from prune.options import bounded
from prune.types import PrunePlan


@dataclass(frozen=True)
class SlebOptions(SearchOptions):
    """SLEB's options (`Sleb` describes them); the engine's come from `SearchOptions`."""

    early_barrier: int = bounded(1, ge=0)
    latter_barrier: int = bounded(1, ge=0)
    num_layers: int | None = bounded(None, ge=0)


class Sleb(GreedyMethod[SlebOptions]):
    """Greedy whole-layer removal by calibration loss, with SLEB's barriers.

    Options (`SlebOptions`, validated once; read back as attributes, e.g. ``method.early_barrier``):
        early_barrier: the first layers that are never removed (official default 1).
        latter_barrier: the last layers that are never removed (official default 1).
        num_layers: remove exactly this many layers (overrides the ratio; the official ``num_remove_blocks``).
        search_impl, batch_size, cache, cache_key, cache_device, stack_tokens, resume_gb, max_sequences,
            max_seqlen: as for `prune.methods.blockpruner.BlockPruner`.
    """

    name = "sleb"
    ratio_unit = "layers"

    def candidates(self, num_layers: int) -> list[Block]:
        """Every layer outside the barriers, ascending (a tie keeps the lowest layer)."""
        o = self.options
        return [Block("layer", i) for i in range(o.early_barrier, num_layers - o.latter_barrier)]

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        o, candidates = self.options, self.candidates(adapter.num_layers())
        count = o.num_layers
        if count is None:  # SLEB's rule: ⌈ratio·L⌉ layers
            count = layers_to_remove(ratio, adapter.num_layers(), max_removable=len(candidates))
        search = GreedySearch(method=self.name, ratio_unit=self.ratio_unit, options=o, candidates=candidates,
                              count=count, unit="layer", on_step=self.on_step)
        plan = search.run(adapter, calib, ratio)
        plan.info |= {"rounding": ROUNDING if o.num_layers is None else "num_layers given",
                      "barriers": {"early": o.early_barrier, "latter": o.latter_barrier}}
        return plan
