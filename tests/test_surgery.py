"""Surgery invariants: dropped layers are gone for real, the model equals the dense one with those layers
skipped, the KV cache still works, and stock save/load round-trips with identical logits."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from prune.eval.params import count_params
from prune.models import surgery
from prune.models.adapter import adapter_for
from prune.types import PrunePlan
from tests.conftest import random_ids


def _skip_layers_logits(model, drop: list[int], ids: torch.Tensor) -> torch.Tensor:
    """Dense-model logits with the given layers turned into the identity by hooks (the reference)."""
    adapter = adapter_for(model)
    handles = [
        adapter.layer(i).register_forward_hook(
            lambda m, a, k, out: adapter.with_hidden(out, adapter.layer_input(a, k)), with_kwargs=True
        )
        for i in drop
    ]
    try:
        return model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def test_drop_layers_equals_skipping_them(tiny) -> None:
    ids = random_ids(100)
    drop = [0, 2]
    with torch.inference_mode():
        expected = _skip_layers_logits(tiny.model, drop, ids)
    pruned = copy.deepcopy(tiny.model)
    adapter = adapter_for(pruned)
    before = count_params(adapter)["params/total"]
    removed = sum(p.numel() for i in drop for p in adapter.layer(i).parameters())
    surgery.apply(adapter, PrunePlan("test", 0.5, "layers", drop_layers=drop))
    assert count_params(adapter)["params/total"] == before - removed
    assert pruned.config.num_hidden_layers == adapter.num_layers() == 2
    assert [adapter.attn(i).layer_idx for i in range(2)] == [0, 1]
    if getattr(pruned.config, "layer_types", None) is not None:
        assert len(pruned.config.layer_types) == 2
    with torch.inference_mode():
        torch.testing.assert_close(pruned(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)


def test_generate_with_cache_matches_no_cache(tiny) -> None:
    pruned = copy.deepcopy(tiny.model)
    surgery.drop_layers(adapter_for(pruned), [1, 3])
    ids = random_ids(100, batch=1, length=8)
    with torch.inference_mode():
        out = pruned.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True,
                              return_dict_in_generate=True, output_logits=True)
        full = pruned(out.sequences[:, :-1], use_cache=False).logits[:, ids.shape[1] - 1 :]
    cached = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_save_reload_identical_logits(tiny, tmp_path) -> None:
    pruned = copy.deepcopy(tiny.model)
    surgery.drop_layers(adapter_for(pruned), [0])
    pruned.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(100)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.config.num_hidden_layers == 3
