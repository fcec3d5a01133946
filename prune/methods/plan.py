"""Replay a pruning decision saved by an earlier run, without running its method again.

Reads the ``plan`` of a cell's ``results.json`` (or a bare plan JSON), with the tensors it references from
the file beside it, and hands it to surgery unchanged. Uses:
evaluate a plan found on one machine on another (a GPU search, a CPU evaluation), or under another
evaluation; and evaluate prefixes of a greedy removal order: ``steps=K`` keeps the first K entries of the
plan's ``info.removal_order`` (BlockPruner), which is the plan that search returns at the ratio its step K
reached. Not a pruning method of any paper; the ratio is ignored (the plan decides what goes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods.blockpruner import plan_sets
from prune.models.adapter import ModelAdapter
from prune.options import Options, bounded
from prune.types import PrunePlan


@dataclass(frozen=True)
class PlanOptions(Options):
    """``method.path`` (required; checked for a file when the plan is read) and ``method.steps``."""

    path: str | None = None
    steps: int | None = bounded(None, ge=0)


class Plan:
    """Apply the plan stored at ``path``, optionally cut to the first ``steps`` blocks of its order."""

    ratio_unit = "none"
    needs_calibration = False

    def __init__(self, path: str | None = None, steps: int | None = None) -> None:
        options = PlanOptions(path=path, steps=steps)
        self.path, self.steps = options.path, options.steps

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        saved = self._load()
        source = {"path": str(Path(self.path).resolve()), "method": saved.method, "ratio": saved.ratio,
                  "steps": self.steps}
        plan = self._prefix(saved) if self.steps is not None else saved
        layers = plan.drop_layers + plan.drop_attn + plan.drop_mlp + [int(i) for i in plan.keep_dims]
        if layers and max(layers) >= adapter.num_layers():
            raise PruneError(f"the plan in {self.path} names layer {max(layers)} but the model has "
                             f"{adapter.num_layers()} layers; pass the model the plan was made for")
        return replace(plan, method="plan", info={"replayed": source} | plan.info)

    def _load(self) -> PrunePlan:
        if not self.path or not Path(self.path).is_file():
            raise PruneError(f"method.path={self.path} is not a file; pass a results.json or a plan JSON")
        return PrunePlan.load(self.path)

    def _prefix(self, plan: PrunePlan) -> PrunePlan:
        """The plan after the first ``steps`` blocks of the removal order (both blocks gone: whole layer)."""
        order = plan.info.get("removal_order")
        if not order or not 0 <= self.steps <= len(order):
            length = len(order) if order else 0
            raise PruneError(f"method.steps={self.steps} needs a plan with a removal order of at least that "
                             f"many blocks; {self.path} has {length}")
        whole, attn_only, mlp_only = plan_sets([(kind, layer) for kind, layer in order[: self.steps]])
        fracs = plan.info.get("step_removed_frac") or []
        info = {"removal_order": order[: self.steps], "step_removed_frac": fracs[: self.steps],
                "achieved_ratio": fracs[self.steps - 1] if self.steps and fracs else None}
        return PrunePlan(method=plan.method, ratio=plan.ratio, ratio_unit=plan.ratio_unit, drop_layers=whole,
                         drop_attn=attn_only, drop_mlp=mlp_only, info=info)
