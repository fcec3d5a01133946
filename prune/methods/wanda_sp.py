"""Wanda-sp: the structured Wanda baseline of the FLAP repository (``prune_wanda_sp``), under a name of its
own for the tables. It is `prune.methods.flap` with ``metric=wanda_sp``: per layer, in sequence, ⌊p·G⌋ heads
(KV groups) and ⌊p·C⌋ MLP channels with the lowest mean |W|·‖X‖ of o_proj / down_proj removed, no bias
compensation (UL-UM); every option of `prune.methods.flap.FlapOptions` applies (module docstring there)."""

from __future__ import annotations

from typing import Any

from prune.errors import PruneError
from prune.methods.flap import Flap


class WandaSp(Flap):
    """`Flap` with ``metric=wanda_sp`` and its own name in plans and tables."""

    name = "wanda_sp"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.metric != "wanda_sp":
            raise PruneError(f"method.metric={self.options.metric!r} is not wanda_sp; for FLAP's metric run "
                             "method=flap")
