"""Shared fixtures: tiny random models of every family, built from the real configs in conf/model/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import prune  # noqa: F401  (registers the config resolvers)
from prune.models.load import LoadedModel, load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt", "phi"]

os.environ.setdefault("WANDB_MODE", "disabled")


def compose_config(*overrides: str) -> DictConfig:
    """The fully composed run config for these overrides (no Hydra runtime)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def load_tiny(family: str) -> LoadedModel:
    cfg = compose_config(f"model=tiny_{family}")
    return load_model_and_tokenizer(cfg.model)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # One cache per test session: token ids are reused across tests, nothing leaks into ~/.cache.
    root = os.environ.get("PRUNE_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("PRUNE_CACHE_DIR", root)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(family: str) -> LoadedModel:
    return load_tiny(family)


def random_ids(vocab: int, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and oversubscribed threads on a shared CPU cost ~100x; modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_identity(model: torch.nn.Module, layer: int) -> None:
    """Zero a layer's attention and MLP output projections: the layer then returns its input exactly."""
    from prune.models.adapter import adapter_for

    adapter = adapter_for(model)
    for lin in (adapter.attn_out(layer), adapter.mlp_out(layer)):
        torch.nn.init.zeros_(lin.weight)
        if lin.bias is not None:
            torch.nn.init.zeros_(lin.bias)


def assert_reloads_identically(model: torch.nn.Module, folder: Path) -> None:
    """Save the (pruned) model; the saved checkpoint reloads through the Auto classes with the same logits."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    ids = random_ids(100)
    with torch.inference_mode():
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
