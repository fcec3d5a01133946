"""Plain, JSON-serialisable records passed between methods, surgery and the runner."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PrunePlan:
    """What a method decided; `prune.models.surgery.apply` is the only code that executes it.

    Attributes:
        method: the method's config name (e.g. ``shortgpt``).
        ratio: the requested ratio, in ``ratio_unit``.
        ratio_unit: ``params`` | ``layers`` | ``blocks``.
        drop_layers: decoder-layer indices (of the dense model) removed whole.
        drop_attn: layers whose attention sub-block is removed (residual passes through).
        drop_mlp: layers whose MLP sub-block is removed.
        keep_dims: width pruning (DISP-LLM): ``{layer: {site: kept indices}}`` of the dense model, sites in
            `prune.models.width.SITES`; absent layers and sites keep every index.
        scores: per-layer (or per-block) importance scores the decision was based on, for logging.
        info: anything else worth recording (rounding rule, removal order, search statistics).
    """

    method: str
    ratio: float
    ratio_unit: str
    drop_layers: list[int] = field(default_factory=list)
    drop_attn: list[int] = field(default_factory=list)
    drop_mlp: list[int] = field(default_factory=list)
    keep_dims: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        return cls(**json.loads(text))

    def is_empty(self) -> bool:
        return not (self.drop_layers or self.drop_attn or self.drop_mlp or self.keep_dims)
