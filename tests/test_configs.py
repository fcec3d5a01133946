"""Config parity: every method YAML has its module and the reverse; every model x method composes."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest
from hydra.utils import instantiate

import prune.methods
from prune.methods import PruningMethod
from tests.conftest import CONF, compose_config

# modules of prune/methods that are not methods
HELPERS = {"layer_common", "block_search", "block_scorers", "greedy", "training"}
METHOD_YAMLS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
MODEL_YAMLS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("_"))


def test_method_yaml_module_parity() -> None:
    modules = {m.name for m in pkgutil.iter_modules(prune.methods.__path__)} - HELPERS
    assert modules == set(METHOD_YAMLS)


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_method_instantiates_and_follows_protocol(name: str) -> None:
    cfg = compose_config(f"method={name}")
    assert cfg.method._target_.startswith(f"prune.methods.{name}.")
    method = instantiate(cfg.method)
    assert isinstance(method, PruningMethod)
    assert method.ratio_unit in {"none", "layers", "blocks", "params"}


@pytest.mark.parametrize("model", MODEL_YAMLS)
def test_every_model_composes_with_every_method(model: str) -> None:
    for method in METHOD_YAMLS:
        cfg = compose_config(f"model={model}", f"method={method}")
        assert cfg.model.name == model
        for group in ("calib", "eval", "logger"):
            assert cfg[group] is not None
        # every interpolation resolves (presets, seeds)
        assert cfg.calib.nsamples > 0 and cfg.calib.seqlen > 0


def test_paper_models_listed() -> None:
    required = {"llama2_7b", "llama2_13b", "llama3_8b", "mistral_7b", "qwen1_5_7b", "baichuan2_7b", "opt_2_7b",
                "opt_6_7b", "opt_13b", "phi_2", "smollm2_135m"} | {f"tiny_{f}" for f in
                                                                    ["llama", "mistral", "qwen2", "qwen3", "opt", "phi"]}
    assert required <= set(MODEL_YAMLS)


def test_every_config_file_has_a_header_comment() -> None:
    for path in Path(CONF).rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path} needs a header comment"


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_config(f"experiment={experiment}")
    assert cfg.experiment_name == experiment
