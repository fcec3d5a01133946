"""Adapter conformance for every family: accessors find the right modules, hooks see the right tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune.errors import PruneError
from prune.models import export
from prune.models.adapter import ModelAdapter, adapter_for
from prune.models.families import LAYOUTS
from prune.models.hooks import layer_io
from tests.conftest import random_ids


def test_accessors_shapes(tiny) -> None:
    adapter = adapter_for(tiny.model)
    cfg = tiny.model.config
    d = cfg.hidden_size
    assert adapter.num_layers() == cfg.num_hidden_layers == 4
    for i in range(adapter.num_layers()):
        assert isinstance(adapter.attn_out(i), nn.Linear) and adapter.attn_out(i).out_features == d
        assert adapter.mlp_out(i).out_features == d
        assert all(lin.in_features == d for lin in adapter.mlp_in(i))
        assert len(adapter.attn_in(i)) == 3 and all(lin.in_features == d for lin in adapter.attn_in(i))
        assert adapter.mlp_out(i).in_features == adapter.mlp_in(i)[0].out_features
        assert adapter.attn_norm(i) is not None and adapter.mlp_norm(i) is not None
    assert adapter.parallel_blocks == (cfg.model_type == "phi")
    assert adapter.lm_head().weight.shape == (cfg.vocab_size, d)
    assert adapter.embeddings()[0].weight.shape[1] == d


def test_hidden_round_trip() -> None:
    h, g = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    assert ModelAdapter.hidden(h) is h and ModelAdapter.with_hidden(h, g) is g
    out = ModelAdapter.with_hidden((h, "cache"), g)
    assert out[0] is g and out[1] == "cache" and ModelAdapter.hidden(out) is g


def test_layer_io_chain(tiny) -> None:
    """Each layer's input is the previous layer's output, and the last output feeds the final norm."""
    adapter = adapter_for(tiny.model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        seen[i] = (x.clone(), y.clone())

    with torch.inference_mode(), layer_io(adapter, record):
        out = tiny.model.base_model(input_ids=random_ids(100), use_cache=False).last_hidden_state
    assert sorted(seen) == [0, 1, 2, 3]
    for i in range(1, 4):
        torch.testing.assert_close(seen[i][0], seen[i - 1][1])
    if tiny.model.config.model_type != "opt":  # OPT's decoder may project after its final norm
        with torch.inference_mode():
            torch.testing.assert_close(adapter.final_norm()(seen[3][1]), out)


def test_unknown_model_type_lists_supported() -> None:
    class Fake(nn.Module):
        config = type("C", (), {"model_type": "gpt_bigcode"})()

    with pytest.raises(PruneError, match="supported: llama, mistral, opt, phi, qwen2, qwen3"):
        adapter_for(Fake())


def test_layout_names_the_family_classes(tiny) -> None:
    config_cls, model_cls = adapter_for(tiny.model).layout.hf_classes()
    assert type(tiny.model) is model_cls and type(tiny.model.config) is config_cls
    assert config_cls.model_type == tiny.model.config.model_type


def test_every_edit_is_registered_for_every_family() -> None:
    """``<family><suffix>`` resolves through the Auto classes to the derived types, for every family."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    export.register_auto_classes()
    for family, layout in LAYOUTS.items():
        for suffix, tag in (("_blockpruned", "BlockPruned"), ("_disp", "Disp")):
            config_cls = CONFIG_MAPPING[family + suffix]
            assert config_cls.model_type == family + suffix and config_cls().model_type == family
            model_cls = AutoModelForCausalLM._model_mapping[config_cls]
            assert model_cls.__name__ == f"{layout.hf_name}{tag}ForCausalLM"
            assert issubclass(model_cls, layout.hf_classes()[1])
