"""The method x family matrix, plus checks that each scoring rule picks what it should."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate

from prune.data.calibration import build_calibration
from prune.errors import PruneError
from prune.eval.params import count_params
from prune.methods.layer_common import layers_to_remove
from prune.models import surgery
from prune.models.adapter import adapter_for
from prune.types import PrunePlan
from tests.conftest import compose_config, make_identity, random_ids

LAYER_METHODS = ["shortgpt", "relative_magnitude", "last_layers", "random_layers"]


def _calib(tokenizer):
    return build_calibration(tokenizer, dataset="wikitext2", split="train", nsamples=2, seqlen=64,
                             source="bundled")


@pytest.mark.parametrize("method_name", ["dense", *LAYER_METHODS])
def test_method_matrix(tiny, method_name: str) -> None:
    method = instantiate(compose_config(f"method={method_name}").method)
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    before = count_params(adapter)["params/non_embedding"]
    plan = method.prune(adapter, _calib(tiny.tokenizer), 0.25)
    assert PrunePlan.from_json(plan.to_json()) == plan
    surgery.apply(adapter, plan)
    expected_removed = 0 if method_name == "dense" else 1  # ceil(0.25 * 4)
    assert len(plan.drop_layers) == expected_removed
    assert adapter.num_layers() == 4 - expected_removed
    after = count_params(adapter)["params/non_embedding"]
    assert after == pytest.approx(before * (4 - expected_removed) / 4, rel=0.02)
    with torch.inference_mode():
        logits = model(random_ids(100)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method_name", ["shortgpt", "relative_magnitude"])
def test_scores_pick_identity_layer(tiny, method_name: str) -> None:
    model = copy.deepcopy(tiny.model)
    make_identity(model, 2)
    method = instantiate(compose_config(f"method={method_name}").method)
    plan = method.prune(adapter_for(model), _calib(tiny.tokenizer), 0.25)
    assert plan.drop_layers == [2]
    score = next(iter(plan.scores.values()))[2]
    assert score == pytest.approx(0.0, abs=1e-6)


def test_last_and_random_layers_choices(tiny) -> None:
    adapter = adapter_for(tiny.model)
    last = instantiate(compose_config("method=last_layers").method).prune(adapter, None, 0.5)
    assert last.drop_layers == [1, 2]  # the two below the final layer 3
    r1 = instantiate(compose_config("method=random_layers", "seed=3").method).prune(adapter, None, 0.5)
    r2 = instantiate(compose_config("method=random_layers", "seed=3").method).prune(adapter, None, 0.5)
    assert r1.drop_layers == r2.drop_layers and len(r1.drop_layers) == 2


def test_layer_rounding_and_limits() -> None:
    assert layers_to_remove(0.25, 30) == 8  # ceil(7.5)
    assert layers_to_remove(0.25, 32) == 8
    assert layers_to_remove(0.25, 28) == 7  # 0.25*28 is exactly 7, not 8
    assert layers_to_remove(0.0, 30) == 0
    with pytest.raises(PruneError, match="at most 29 can be removed"):
        layers_to_remove(0.99, 30)


def test_plan_replays_a_saved_plan_and_prefixes_of_its_order(tiny, tmp_path) -> None:
    import json

    from prune.methods.plan import Plan

    order = [["mha", 1], ["mlp", 1], ["mlp", 3], ["mha", 0]]
    fracs = [0.01, 0.03, 0.05, 0.06]
    saved = PrunePlan(method="blockpruner", ratio=0.2, ratio_unit="params", drop_layers=[1], drop_attn=[0],
                      drop_mlp=[3], info={"removal_order": order, "step_removed_frac": fracs})
    cell = tmp_path / "results.json"
    cell.write_text(json.dumps({"status": "complete", "plan": json.loads(saved.to_json())}))
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    whole = Plan(path=str(cell)).prune(adapter, None, 0.0)
    assert (whole.drop_layers, whole.drop_attn, whole.drop_mlp) == ([1], [0], [3])
    assert whole.method == "plan" and whole.info["replayed"]["method"] == "blockpruner"
    # prefixes: two blocks of layer 1 -> the whole layer; three -> plus layer 3's MLP
    two, three = (Plan(path=str(cell), steps=k).prune(adapter, None, 0.0) for k in (2, 3))
    assert (two.drop_layers, two.drop_attn, two.drop_mlp) == ([1], [], [])
    assert (three.drop_layers, three.drop_mlp, three.info["achieved_ratio"]) == ([1], [3], 0.05)
    surgery.apply(adapter, three)
    assert adapter.num_layers() == 3
    with pytest.raises(PruneError, match="method.steps=5"):
        Plan(path=str(cell), steps=5).prune(adapter_for(copy.deepcopy(tiny.model)), None, 0.0)
    with pytest.raises(PruneError, match="is not a file"):
        Plan(path=str(tmp_path / "missing.json")).prune(adapter, None, 0.0)
    with pytest.raises(PruneError, match="names layer 3 but the model has 3 layers"):
        Plan(path=str(cell)).prune(adapter, None, 0.0)
