"""Config parity: every method YAML has its module and the reverse; every model x method composes."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import prune.methods
from prune.methods import PruningMethod
from tests.conftest import CONF, compose_config

# modules of prune/methods that are not methods
HELPERS = {"layer_common", "block_search", "block_scorers", "greedy", "training", "sparse_common"}
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
    assert method.ratio_unit in {"none", "layers", "blocks", "params", "slicing"}  # slicing: SliceGPT's


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
    required = {"llama2_7b", "llama2_13b", "llama3_8b", "mistral_7b", "qwen1_5_7b", "baichuan2_7b",
                "opt_2_7b", "opt_6_7b", "opt_13b", "phi_2", "smollm2_135m"}
    required |= {f"tiny_{f}" for f in ["llama", "mistral", "qwen2", "qwen3", "opt", "phi"]}
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


# What each preset gives the methods that read it: the values every model resolved when the presets were flat
# keys of the model configs (model.preset.disp_steps, ...; commit bcb9aea), so moving them changed nothing.
# Since issue 32 the cpu preset's DISP block is 500 steps of 128 tokens (was 200 of 256).
METHOD_PRESET_KEYS = {
    "disp": ("steps", "seqlen", "nsamples"),
    "elder": ("stage1_lr", "stage1_steps_per_round", "stage2_steps", "batch_size", "grad_accum", "seqlen"),
    "blockpruner": ("max_sequences", "max_seqlen"),
    "sleb": ("max_sequences", "max_seqlen"),
}
PAPER = {"disp": (10000, 2048, None), "elder": (0.05, None, None, 1, 8, None), "blockpruner": (None, None),
         "sleb": (None, None)}
CPU = {"disp": (500, 128, None), "elder": (0.05, 3, 6, 2, 1, 256), "blockpruner": (4, 128), "sleb": (4, 128)}
RESOLVED_BY_PRESET = {
    ("model=smollm2_135m",): ("cpu", CPU),
    ("model=tiny_llama",): ("tiny", {**PAPER, "disp": (20, 32, None)}),
    ("scale=smoke",): ("smoke", {**PAPER, "disp": (2, 64, None), "elder": (0.05, 1, 1, 1, 1, 64)}),
    ("model=llama2_7b",): (None, PAPER),
    ("model=smollm2_135m", "model.preset=null"): (None, PAPER),   # the papers' full protocol
    ("model=llama2_7b", "preset@model.preset=cpu"): ("cpu", CPU),   # any model takes any preset
}


@pytest.mark.parametrize("overrides", list(RESOLVED_BY_PRESET), ids=" ".join)
def test_presets_resolve_the_method_settings_they_always_did(overrides: tuple[str, ...]) -> None:
    name, expected = RESOLVED_BY_PRESET[overrides]
    for method, keys in METHOD_PRESET_KEYS.items():
        cfg = compose_config(*overrides, f"method={method}")
        assert (cfg.model.preset.name if cfg.model.preset else None) == name
        assert tuple(cfg.method[key] for key in keys) == expected[method], method


PRESET_YAMLS = sorted((CONF / "preset").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESET_YAMLS, ids=lambda p: p.stem)
def test_every_preset_key_is_read_by_some_config(path: Path) -> None:
    """A misspelt or orphaned preset key would be ignored silently: each must appear in an ${oc.select:}."""
    readers = "\n".join(p.read_text() for p in CONF.rglob("*.yaml") if p.parent.name != "preset")
    preset = OmegaConf.load(path)
    assert preset.name == path.stem
    for key, value in preset.items():
        if key == "name":
            continue
        subkeys = [f"{key}.{sub}" for sub in value] if isinstance(value, DictConfig) else [key]
        for dotted in subkeys:
            assert f"model.preset.{dotted}," in readers, f"{path.name}: model.preset.{dotted} is read nowhere"
