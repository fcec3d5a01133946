"""Plans on disk and surgery's edit registry: JSON-only plans save and load as they always have; tensors
travel beside the JSON (safetensors, checked by sha256) and through a `method=plan` replay; weight masks zero
elements of the dense model's parameters in place and remove none."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods.plan import Plan
from prune.models import surgery
from prune.models.adapter import adapter_for
from prune.types import PLAN_FILE, TENSOR_FILE, PrunePlan

# The fields every plan JSON has had, in order; a plan without tensors writes these and nothing else.
LEGACY_FIELDS = ["method", "ratio", "ratio_unit", "drop_layers", "drop_attn", "drop_mlp", "keep_dims",
                 "scores", "info"]
REFERENCE = Path(__file__).resolve().parents[1] / "experiments/reference_gpu/blockpruner_r0.25_results.json"


def _weight_names(model, layers: list[int]) -> list[str]:
    """The full names of the 2-D weights (linear layers) of the given decoder layers."""
    prefix = adapter_for(model).layout.layers
    return [f"{prefix}.{i}.{name}" for i in layers
            for name, p in adapter_for(model).layer(i).named_parameters() if p.dim() == 2]


def _masks(model, names: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random boolean masks, about half True, of the named parameters' shapes."""
    g = torch.Generator().manual_seed(seed)
    return {f"weight_masks/{n}": torch.rand(model.get_parameter(n).shape, generator=g) < 0.5 for n in names}


def test_json_only_plan_saves_and_loads_as_before(tmp_path) -> None:
    plan = PrunePlan("blockpruner", 0.25, "params", drop_layers=[3], drop_attn=[0, 2], drop_mlp=[1],
                     keep_dims={}, scores={"ppl": [1.0, 2.0]}, info={"order": [["mha", 0]]})
    written = plan.save(tmp_path)
    legacy = json.dumps({name: asdict(plan)[name] for name in LEGACY_FIELDS}, indent=2)
    assert (tmp_path / PLAN_FILE).read_text() == legacy == plan.to_json()
    assert not (tmp_path / TENSOR_FILE).exists() and "tensors" not in written
    assert written == json.loads(plan.to_json())
    assert PrunePlan.load(tmp_path / PLAN_FILE) == PrunePlan.from_json(plan.to_json()) == plan
    assert plan.edit_kinds() == ["drop_sub_blocks", "drop_layers"]
    saved = json.loads(REFERENCE.read_text())["plan"]  # a results.json written before plans had tensors
    assert PrunePlan.load(REFERENCE) == PrunePlan(**saved)
    assert json.loads(PrunePlan.load(REFERENCE).to_json()) == saved
    assert PrunePlan("dense", 0.0, "layers").is_empty()


def test_weight_masks_save_reload_and_apply(tiny, tmp_path) -> None:
    model = copy.deepcopy(tiny.model)
    names = _weight_names(model, [0, 3])
    plan = PrunePlan("wanda", 0.5, "params", tensors=_masks(model, names), info={"pattern": "unstructured"})
    assert plan.info == {"pattern": "unstructured", "zeroed_only": True}
    assert plan.edit_kinds() == ["weight_masks"]
    written = plan.save(tmp_path)
    assert written["tensors"]["file"] == TENSOR_FILE and written["tensors"]["names"] == sorted(plan.tensors)
    loaded = PrunePlan.load(tmp_path / PLAN_FILE)
    assert loaded == plan and all(t.dtype == torch.bool for t in loaded.tensors.values())

    adapter = adapter_for(model)
    dense = {n: model.get_parameter(n).detach().clone() for n in names}
    before = count_params(adapter)
    surgery.apply(adapter, loaded)
    assert count_params(adapter) == before  # zeros are not removed parameters
    for name, mask in loaded.tensors_of("weight_masks").items():
        weight = model.get_parameter(name)
        assert torch.all(weight[mask] == 0)
        assert torch.equal(weight[~mask], dense[name][~mask])


def test_masks_name_the_dense_layers_when_layers_are_dropped(tiny) -> None:
    model = copy.deepcopy(tiny.model)
    (name,) = _weight_names(model, [3])[:1]
    masks = _masks(model, [name])
    plan = PrunePlan("test", 0.5, "params", drop_layers=[1], tensors=masks)
    assert plan.info["zeroed_only"] is False
    surgery.apply(adapter_for(model), plan)  # masks first, on layer 3 of the dense model, which becomes 2
    renamed = name.replace(".3.", ".2.", 1)
    assert torch.all(model.get_parameter(renamed)[masks[f"weight_masks/{name}"]] == 0)


def test_tensor_file_is_checked(tiny, tmp_path) -> None:
    model = tiny.model
    plan = PrunePlan("wanda", 0.5, "params", tensors=_masks(model, _weight_names(model, [0])[:1]))
    plan.save(tmp_path)
    with pytest.raises(PruneError, match="PrunePlan.load"):
        PrunePlan.from_json((tmp_path / PLAN_FILE).read_text())
    other = PrunePlan("wanda", 0.5, "params", tensors=_masks(model, _weight_names(model, [0])[:1], seed=1))
    other.save(tmp_path / "other")
    (tmp_path / TENSOR_FILE).write_bytes((tmp_path / "other" / TENSOR_FILE).read_bytes())
    with pytest.raises(PruneError, match="sha256"):
        PrunePlan.load(tmp_path / PLAN_FILE)
    (tmp_path / TENSOR_FILE).unlink()
    with pytest.raises(PruneError, match="cannot be read"):
        PrunePlan.load(tmp_path / PLAN_FILE)
    with pytest.raises(PruneError, match="does not have"):
        PrunePlan.from_dict(json.loads(plan.to_json()) | {"rotation": []}, tmp_path)


def test_replay_of_a_results_json_with_tensors(tiny, tmp_path) -> None:
    model = copy.deepcopy(tiny.model)
    saved = PrunePlan("wanda", 0.5, "params", drop_layers=[2],
                      tensors=_masks(model, _weight_names(model, [0, 1])))
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "results.json").write_text(json.dumps({"status": "complete", "plan": saved.save(cell)}))
    replayed = Plan(path=str(cell / "results.json")).prune(adapter_for(model), None, 0.0)
    assert replayed.method == "plan" and replayed.info["replayed"]["method"] == "wanda"
    assert replayed.drop_layers == [2] and replayed.tensors.keys() == saved.tensors.keys()
    assert all(torch.equal(replayed.tensors[k], saved.tensors[k]) for k in saved.tensors)
    surgery.apply(adapter_for(model), replayed)
    assert adapter_for(model).num_layers() == 3


def test_surgery_refuses_what_it_cannot_apply(tiny) -> None:
    model = copy.deepcopy(tiny.model)
    (name,) = _weight_names(model, [0])[:1]
    weight = model.get_parameter(name)
    dense = weight.detach().clone()
    unknown = PrunePlan("future", 0.2, "params", drop_layers=[1],
                        tensors={"future_kind/layers.0": torch.eye(4)})
    with pytest.raises(PruneError, match=r"cannot apply plan edits \['future_kind'\]"):
        surgery.apply(adapter_for(model), unknown)
    assert adapter_for(model).num_layers() == 4  # checked before any edit
    wrong = PrunePlan("wanda", 0.5, "params", tensors={f"weight_masks/{name}": torch.zeros(weight.shape)})
    with pytest.raises(PruneError, match="torch.bool mask"):
        surgery.apply(adapter_for(model), wrong)
    missing = PrunePlan("wanda", 0.5, "params",
                        tensors={"weight_masks/model.nothing.weight": torch.ones(1) > 0})
    with pytest.raises(PruneError, match="does not have"):
        surgery.apply(adapter_for(model), missing)
    both = PrunePlan("x", 0.1, "params", drop_attn=[0], keep_dims={"0": {"mlp": [0]}})
    with pytest.raises(PruneError, match="cannot combine"):
        surgery.apply(adapter_for(model), both)
    with pytest.raises(PruneError, match="'<kind>/<target>'"):
        PrunePlan("x", 0.1, "params", tensors={"weight_masks": torch.ones(1)})
    assert torch.equal(weight, dense)


def test_every_kind_in_the_order_is_registered() -> None:
    assert set(surgery.EDITS) == set(surgery.ORDER)
    assert surgery.ORDER.index("drop_layers") == len(surgery.ORDER) - 1  # the edit that renumbers runs last
    with pytest.raises(ValueError, match="surgery.ORDER"):
        surgery.edit("future_kind")
