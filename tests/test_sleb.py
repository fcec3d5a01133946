"""SLEB: BlockPruner's search at layer granularity, with SLEB's barriers and layer-unit ratio."""

from __future__ import annotations

import copy

import pytest
from hydra.utils import instantiate

from prune.methods.blockpruner import plain_evaluations
from prune.methods.sleb import Sleb
from prune.models import surgery
from prune.models.adapter import adapter_for
from tests.conftest import assert_reloads_identically, compose_config, make_identity
from tests.test_blockpruner import _calib

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fast_search_equals_plain_search(tiny) -> None:
    model = copy.deepcopy(tiny.model)
    calib = _calib(n=3, length=12)
    plans = {impl: Sleb(early_barrier=0, latter_barrier=0, num_layers=3, search_impl=impl, cache=False)
             .prune(adapter_for(model), calib, 0.0) for impl in ("plain", "fast")}
    fast, plain = plans["fast"].info, plans["plain"].info
    assert fast["removal_order"] == plain["removal_order"]
    assert fast["step_ppl"] == plain["step_ppl"]  # bitwise: the same arithmetic for every complete score
    assert plain["evaluations"] == plain_evaluations(4, 0, 3) == 4 + 3 + 2
    assert all(kind == "layer" for kind, _ in fast["removal_order"])
    assert plans["fast"].drop_layers == sorted(i for _, i in fast["removal_order"])
    assert plans["fast"].method == "sleb" and plans["fast"].ratio_unit == "layers"


def test_barriers_ceil_rounding_and_identity_layer(tiny) -> None:
    model = copy.deepcopy(tiny.model)
    make_identity(model, 2)  # removing it leaves the calibration loss as it is
    calib = _calib(n=2, length=12)
    plan = Sleb(cache=False).prune(adapter_for(model), calib, 0.25)
    assert len(plan.drop_layers) == 1 and plan.drop_layers[0] in (1, 2)  # ceil(0.25 * 4); barriers 1 / 1
    # the chosen removal is at least as good as removing the identity layer (= the dense model's loss)
    assert plan.info["step_ppl"][0] <= plan.info["dense_calib_ppl"] * (1 + 1e-6)
    assert plan.info["barriers"] == {"early": 1, "latter": 1}
    two = Sleb(cache=False).prune(adapter_for(model), calib, 0.26)  # ceil(1.04) = 2: both candidates
    assert two.drop_layers == [1, 2]
    with pytest.raises(Exception, match="at most 2 can be removed"):
        Sleb(cache=False).prune(adapter_for(model), calib, 0.6)


def test_export_reloads_identical(tiny, tmp_path) -> None:
    model = copy.deepcopy(tiny.model)
    adapter = adapter_for(model)
    plan = Sleb(cache=False).prune(adapter, _calib(n=2, length=12), 0.25)
    surgery.apply(adapter, plan)
    assert adapter.num_layers() == 3 and model.config.num_hidden_layers == 3
    assert_reloads_identically(model, tmp_path)


def test_config_composes() -> None:
    cfg = compose_config("method=sleb")
    method = instantiate(cfg.method)
    assert isinstance(method, Sleb) and (method.early_barrier, method.latter_barrier) == (1, 1)
    assert cfg.calib.dataset == "wikitext2" and cfg.calib.style == "random_windows"
