"""The record passed between methods, surgery and the runner: a `PrunePlan`, JSON with optional tensors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from prune.errors import PruneError
from prune.store import write_atomic

PLAN_FILE = "prune_plan.json"
TENSOR_FILE = "prune_plan.safetensors"

# Kinds that zero (or rewrite) weights but remove no parameter. A plan with one records info["zeroed_only"]:
# whether these are all it does, so that a reader of params/removed (deleted parameters only) knows why it
# reads 0.
ZEROING_KINDS = frozenset({"weight_masks", "weight_updates"})


@dataclass(eq=False)
class PrunePlan:
    """What a method decided; `prune.models.surgery.apply` is the only code that executes it.

    A plan is a set of edits of named kinds (`edit_kinds`). The structural ones are JSON lists; the ones whose
    data are tensors live in ``tensors``, saved by `save` as a safetensors file beside the plan JSON, which
    names that file, its tensors and its sha256. Every index and name refers to the *dense* model.

    Attributes:
        method: the method's config name (e.g. ``shortgpt``).
        ratio: the requested ratio, in ``ratio_unit``.
        ratio_unit: ``params`` | ``layers`` | ``blocks`` | ``slicing`` (SliceGPT: fraction of the hidden
            dimension deleted; its parameter change is in ``info``).
        drop_layers: decoder-layer indices (of the dense model) removed whole (kind ``drop_layers``).
        drop_attn: layers whose attention sub-block is removed (residual passes through); kind
            ``drop_sub_blocks``, with ``drop_mlp``.
        drop_mlp: layers whose MLP sub-block is removed.
        keep_dims: width pruning (DISP-LLM): ``{layer: {site: kept indices}}`` of the dense model, sites in
            `prune.models.width.SITES`, or ``attn_heads`` (`prune.models.width.HEAD_SITE`: kept KV
            groups, whole heads); absent layers and sites keep every index (kind ``keep_dims``).
        scores: per-layer (or per-block) importance scores the decision was based on, for logging.
        info: anything else worth recording (rounding rule, removal order, search statistics). A plan with
            weight masks records ``info["zeroed_only"]``: true when it removes no parameter at all (its
            zeros are sparsity, never counted in ``params/removed``).
        tensors: named arrays ``"<kind>/<target>"``, where the target names a parameter or a module of the
            dense model, e.g. ``weight_masks/model.layers.3.mlp.down_proj.weight``. Kinds:

            - ``weight_masks`` (Wanda, SparseGPT; N:M patterns are masks too): a boolean tensor of the target
              parameter's shape, True where the element is zeroed (the papers' convention). Implemented.
            - ``weight_updates`` (SparseGPT's reconstructed weights; LoRA-merged weights): the new value of
              the target parameter, same shape, applied before the masks. Implemented; removes no parameter.
            - ``rotations`` (SliceGPT): per residual site, named by the dense norm that reads it
              (``model.layers.3.input_layernorm``, ..., ``model.norm``), the kept columns ``Q[:, :w]`` of its
              orthogonal PCA basis (`prune.models.rotation`). Implemented.
            - ``added_biases`` (LLM-Pruner, FLAP bias compensation): a vector added to the target module's
              output bias, next to the ``keep_dims`` index sets it compensates for. Implemented
              (`prune.models.width.add_output_biases`; a bias is created where the linear has none).
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
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in self.tensors:
            kind, _, target = name.partition("/")
            if not kind or not target:
                raise PruneError(f"plan tensor {name!r} is not named '<kind>/<target>'")
        kinds = set(self.edit_kinds())
        if kinds & ZEROING_KINDS:  # a new dict: the caller's info is not changed behind its back
            self.info = self.info | {"zeroed_only": kinds <= ZEROING_KINDS}

    # -- what the plan does ------------------------------------------------------------------------------

    def edit_kinds(self) -> list[str]:
        """The kinds of edit this plan carries, e.g. ``["drop_sub_blocks", "drop_layers"]``."""
        kinds = [name.partition("/")[0] for name in self.tensors]
        kinds += ["keep_dims"] if self.keep_dims else []
        kinds += ["drop_sub_blocks"] if self.drop_attn or self.drop_mlp else []
        kinds += ["drop_layers"] if self.drop_layers else []
        return list(dict.fromkeys(kinds))

    def tensors_of(self, kind: str) -> dict[str, torch.Tensor]:
        """``{target: tensor}`` of one tensor kind."""
        prefix = f"{kind}/"
        return {name.removeprefix(prefix): t for name, t in self.tensors.items() if name.startswith(prefix)}

    def is_empty(self) -> bool:
        return not self.edit_kinds()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrunePlan):
            return NotImplemented
        return self._json_fields() == other._json_fields() and _same_tensors(self.tensors, other.tensors)

    # -- JSON and files ----------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The plan as JSON; with tensors, it references them (`save` writes the file it names)."""
        return json.dumps(self.to_dict(), indent=2)

    def to_dict(self) -> dict[str, Any]:
        return self._record(_safetensors_bytes(self.tensors) if self.tensors else None)

    def save(self, directory: Path | str) -> dict[str, Any]:
        """Write ``prune_plan.json`` (and ``prune_plan.safetensors`` if the plan has tensors) into
        ``directory``, atomically; returns the JSON written, for a cell's ``results.json``."""
        directory = Path(directory)
        data = _safetensors_bytes(self.tensors) if self.tensors else None
        if data is not None:
            write_atomic(directory / TENSOR_FILE, data)
        text = json.dumps(self._record(data), indent=2)
        write_atomic(directory / PLAN_FILE, text)
        return json.loads(text)  # as a reader of the file sees it: string keys, lists for tuples

    @classmethod
    def load(cls, path: Path | str) -> PrunePlan:
        """Read a plan JSON written by `save`, or the ``plan`` of a cell's ``results.json``; its tensors, if
        any, come from the file it names in the same directory."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not text at all (UnicodeDecodeError)
            raise PruneError(f"cannot read a plan from {path}: {e}; pass a results.json or "
                             f"{PLAN_FILE} written by run.py") from e
        plan = data.get("plan", data) if isinstance(data, dict) else data
        try:
            return cls.from_dict(plan, path.parent)
        except PruneError as e:
            raise PruneError(f"{path} holds no readable plan: {e}; pass a results.json or {PLAN_FILE} "
                             "written by run.py") from e

    @classmethod
    def from_json(cls, text: str, directory: Path | str | None = None) -> PrunePlan:
        return cls.from_dict(json.loads(text), directory)

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path | str | None = None) -> PrunePlan:
        """The plan of `to_dict`'s output; ``directory`` holds the tensor file, if the plan references one."""
        if not isinstance(data, dict):
            raise PruneError(f"a plan is a JSON object, not {type(data).__name__}")
        data = dict(data)
        reference = data.pop("tensors", None)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise PruneError(f"a plan names {sorted(unknown)}, which PrunePlan does not have")
        _check_json_fields(data)
        tensors = _load_tensors(reference, directory) if reference else {}
        return cls(**data, tensors=tensors)

    def _json_fields(self) -> dict[str, Any]:
        # asdict of a tensor-free copy: tensors are not deep-copied, and nested values convert as they always
        # have, so a plan without tensors writes the same JSON as before plans could carry them.
        record = asdict(replace(self, tensors={}))
        del record["tensors"]
        return record

    def _record(self, tensor_bytes: bytes | None) -> dict[str, Any]:
        record = self._json_fields()
        if tensor_bytes is not None:
            record["tensors"] = {"file": TENSOR_FILE, "names": sorted(self.tensors),
                                 "sha256": hashlib.sha256(tensor_bytes).hexdigest()}
        return record


# The JSON type of each plan field, for the message when a hand-edited or damaged plan holds another.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,), "ratio": (int, float), "ratio_unit": (str,), "drop_layers": (list, tuple),
    "drop_attn": (list, tuple), "drop_mlp": (list, tuple), "keep_dims": (dict,), "scores": (dict,),
    "info": (dict,),
}


def _check_json_fields(data: dict[str, Any]) -> None:
    """Required fields present, each of its JSON type, layer lists of integers: a damaged plan fails here,
    with a message, rather than deep inside surgery."""
    missing = [name for name in ("method", "ratio", "ratio_unit") if name not in data]
    if missing:
        raise PruneError(f"a plan needs {', '.join(missing)}")
    for name, value in data.items():
        if not isinstance(value, _FIELD_TYPES[name]):
            expected = _FIELD_TYPES[name][0].__name__
            raise PruneError(f"the plan's {name} is {type(value).__name__}, not {expected}")
    for name in ("drop_layers", "drop_attn", "drop_mlp"):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in data.get(name, [])):
            raise PruneError(f"the plan's {name} holds something other than layer indices")


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def _load_tensors(reference: dict[str, Any], directory: Path | str | None) -> dict[str, torch.Tensor]:
    """The tensors a plan JSON references, after checking the file's sha256 and names against it."""
    from safetensors.torch import load

    if directory is None:
        raise PruneError(f"the plan references tensors in {reference.get('file')}; read it with "
                         f"PrunePlan.load(path) so that the file is found beside it")
    if not isinstance(reference, dict) or not {"file", "sha256", "names"} <= set(reference):
        raise PruneError("the plan's tensors entry needs file, sha256 and names")
    path = Path(directory) / reference["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PruneError(f"the plan's tensors {path} cannot be read ({e}); copy it beside the plan") from e
    if hashlib.sha256(data).hexdigest() != reference["sha256"]:
        raise PruneError(f"{path} does not match the sha256 its plan recorded; it belongs to another plan")
    tensors = load(data)
    if sorted(tensors) != sorted(reference["names"]):
        raise PruneError(f"{path} holds other tensors than its plan names")
    return tensors


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
