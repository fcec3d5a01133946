"""Recovery fine-tuning (prune/rft.py): LoRA on every family and every plan kind (layers, sub-blocks,
widths) merges into the same model the adapters computed, saves and reloads; the stage trains, resumes to
the same weights, records both sides and its cost; rft=none changes nothing; bad options fail first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prune import rft
from prune.errors import PruneError
from prune.models import surgery, width
from prune.models.adapter import adapter_for
from prune.types import PrunePlan
from prune.validate import check_config
from tests.conftest import assert_reloads_identically, compose_config, load_tiny, random_ids
from tests.test_bad_inputs import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

PLAN_KINDS = ["layers", "sub_blocks", "widths"]


def _plan(kind: str, adapter) -> PrunePlan:
    if kind == "layers":
        return PrunePlan("shortgpt", 0.25, "layers", drop_layers=[1])
    if kind == "sub_blocks":
        return PrunePlan("blockpruner", 0.2, "params", drop_attn=[0, 2], drop_mlp=[1])
    gen = torch.Generator().manual_seed(0)
    widths = width.WidthCost.of(adapter).widths
    keep = {str(i): {site: sorted(torch.randperm(w, generator=gen)[: max(1, w // 2)].tolist())
                     for site, w in zip(width.SITES, widths[i])} for i in range(adapter.num_layers())}
    return PrunePlan("disp", 0.5, "params", keep_dims=keep)


def _pruned(family: str, kind: str):
    model = load_tiny(family).model
    surgery.apply(adapter_for(model), _plan(kind, adapter_for(model)))
    return model


def _options(**changes) -> rft.RftOptions:
    base = {"kind": "lora", "recipe": "test", "rank": 4, "alpha": 8.0, "dropout": 0.1, "lr": 1e-2, "steps": 4,
            "grad_accum": 2, "dataset": "wikitext2", "split": "validation", "nsamples": 8, "seqlen": 32,
            "progress": False, "checkpoint_every": 2}
    return rft.RftOptions(**(base | changes))


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_merged_lora_equals_unmerged_and_reloads(family: str, kind: str, tmp_path: Path) -> None:
    model = _pruned(family, kind)
    model_type, cls = model.config.model_type, type(model)
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        pruned = model(ids).logits
    lora = rft.attach_lora(adapter_for(model), _options())
    adapters = rft.lora_parameters(model)
    assert adapters  # every plan kind leaves linears to adapt
    with torch.no_grad():
        for p in adapters.values():  # B starts at zero: give both factors values so the update shows
            p.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
    rft.merge_lora(lora)
    with torch.no_grad():
        merged = model(ids).logits
    assert (unmerged - pruned).abs().max() > 1e-3  # the adapters change what the model computes
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert type(model) is cls and model.config.model_type == model_type
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert_reloads_identically(model, tmp_path / "model")


def test_targets_resolve_by_role_and_skip_removed_sub_blocks() -> None:
    model = _pruned("llama", "sub_blocks")  # attention gone in layers 0 and 2, MLP in layer 1
    names = rft.target_names(adapter_for(model), ("q", "v", "mlp_out"))
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.down_proj",
                     "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj",
                     "model.layers.3.mlp.down_proj"]
    every = rft.target_names(adapter_for(model), ("attention", "mlp"))
    assert len(every) == 2 * 4 + 3 * 3  # 2 attentions x (q, k, v, o) + 3 MLPs x (gate, up, down)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_recover_trains_lowers_the_loss_and_records_the_cost(kind: str) -> None:
    model = _pruned("llama", "widths")
    loaded = load_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    o = _options(kind=kind, steps=6, lr=1e-2 if kind == "lora" else 1e-3)
    result = rft.recover(adapter_for(model), loaded.tokenizer, o)
    m = result.metrics
    assert m["rft/steps"] == 6 and m["rft/tokens"] == 6 * 2 * 32
    assert m["time/rft_s"] > 0 and m["mem/rft_peak_gb"] > 0 and "time/rft_gpu_h" not in m  # CPU: no GPU-hours
    ce = result.info["curves"]["ce"]
    assert len(ce) == 6 and ce[-1] < ce[0]
    after = model.state_dict()
    assert set(after) == set(before)  # merged: the same parameters as before
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert result.info["data"]["source"] == "bundled:wikitext2-validation"
    if kind == "lora":
        assert m["rft/trainable_params"] < sum(v.numel() for v in before.values()) / 10


def test_token_budget_sets_the_steps() -> None:
    o = _options(steps=None, tokens=1000, grad_accum=4, batch_size=2)
    assert rft.planned_steps(o, windows=100, seqlen=32) == 4  # ceil(1000 / (8 * 32))
    assert rft.planned_steps(_options(steps=None, epochs=2.0), windows=9, seqlen=32) == 9  # ceil(2 * 9 / 2)
    assert rft.planned_steps(_options(steps=5, tokens=10**6), windows=9, seqlen=32) == 5


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_resumed_run_ends_in_the_same_weights(kind: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tok = load_tiny("llama").tokenizer
    o = _options(kind=kind, steps=4, checkpoint_every=2, lr=1e-3)
    whole = _pruned("llama", "layers")
    rft.recover(adapter_for(whole), tok, o, checkpoint_dir=tmp_path / "a", identity={"cell": 1})

    interrupted = _pruned("llama", "layers")
    save = rft.AdapterCheckpoint.save

    def save_then_stop(self, step, *args) -> None:
        save(self, step, *args)
        raise KeyboardInterrupt  # the job is killed right after its first checkpoint

    monkeypatch.setattr(rft.AdapterCheckpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        rft.recover(adapter_for(interrupted), tok, o, checkpoint_dir=tmp_path / "b", identity={"cell": 1})
    monkeypatch.setattr(rft.AdapterCheckpoint, "save", save)
    assert len(list((tmp_path / "b").glob(f"{rft.CHECKPOINT_PREFIX}*.pt"))) == 1
    resumed = _pruned("llama", "layers")
    result = rft.recover(adapter_for(resumed), tok, o, checkpoint_dir=tmp_path / "b", identity={"cell": 1})
    assert result.info["resumed_from_step"] == 2 and len(result.info["curves"]["ce"]) == 4
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list((tmp_path / "b").glob("*.pt"))  # a trained cell keeps no checkpoint


def test_a_checkpoint_of_another_cell_is_not_resumed(tmp_path: Path) -> None:
    tok = load_tiny("llama").tokenizer
    o = _options(steps=2, checkpoint_every=1)
    model = _pruned("llama", "layers")
    lora = rft.attach_lora(adapter_for(model), o)
    params = rft.lora_parameters(model)
    file = rft.KeyedFile(tmp_path, {"cell": 2}, rft.CHECKPOINT_PREFIX, ".pt")
    other = rft.AdapterCheckpoint(file, params, 1)
    opt = torch.optim.AdamW(list(params.values()))
    other.save(1, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), {"ce": [1.0]})
    rft.merge_lora(lora)
    result = rft.recover(adapter_for(_pruned("llama", "layers")), tok, o, checkpoint_dir=tmp_path,
                         identity={"cell": 1})
    assert result.info["resumed_from_step"] == 0


def test_rft_none_leaves_a_cell_unchanged(tmp_path: Path) -> None:
    plain = ["method=shortgpt", "ratio=0.25", "force=true"]
    code, _ = run_in_process([*plain, "rft=none"], tmp_path / "none")
    assert code == 0
    with_none = json.loads((tmp_path / "none" / "cell" / "results.json").read_text())
    code, _ = run_in_process([*plain, "~rft"], tmp_path / "absent")  # the config before the stage existed
    assert code == 0
    absent = json.loads((tmp_path / "absent" / "cell" / "results.json").read_text())
    skip = {k for k in with_none["metrics"] if k.startswith(("time/", "mem/"))}
    assert {k: v for k, v in with_none["metrics"].items() if k not in skip} == \
        {k: v for k, v in absent["metrics"].items() if k not in skip}
    assert "rft" not in with_none
    assert not any(k.startswith(("pre_rft/", "rft/")) for k in with_none["metrics"])


def test_lora_cell_records_both_sides_and_saves_a_plain_model(tmp_path: Path) -> None:
    overrides = ["method=shortgpt", "ratio=0.25", "rft=lora", "save=true", "rft.lr=1e-2"]
    code, _ = run_in_process(overrides, tmp_path)
    assert code == 0
    record = json.loads((tmp_path / "cell" / "results.json").read_text())
    m = record["metrics"]
    assert {"ppl/wikitext2", "pre_rft/ppl/wikitext2", "time/rft_s", "mem/rft_peak_gb", "rft/tokens"} <= set(m)
    assert m["ppl/wikitext2"] != m["pre_rft/ppl/wikitext2"]
    assert m["rft/tokens"] == 3 * 4 * 32  # the tiny preset: 3 steps x global batch 4 x 32 tokens
    assert record["rft"]["recipe"] == "lora_slicegpt" and record["rft"]["preset"] == "tiny"
    assert record["rft"]["data"]["source"] == "bundled:alpaca-1k-sample"
    config = json.loads((tmp_path / "cell" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "lora" not in json.dumps(config).lower()


@pytest.mark.parametrize(("override", "fragment"), [
    ("rft.rank=0", "rft.rank=0 must be >= 1"),
    ("rft.targets=[attention,lm_head]", "unknown target module 'lm_head'"),
    ("rft.dataset=imagenet", "rft.dataset=imagenet is unknown"),
    ("rft.lr=-1", "rft.lr=-1"),
    ("rft.nosuch=1", None),  # Hydra refuses a key the node does not have
])
def test_bad_rft_options_fail_in_check_config(override: str, fragment: str | None) -> None:
    if fragment is None:
        with pytest.raises(Exception, match="nosuch"):
            compose_config("debug=tiny", "rft=lora", override)
        return
    with pytest.raises(PruneError, match=fragment.replace("[", r"\[")):
        check_config(compose_config("debug=tiny", "rft=lora", override))


def test_a_hub_only_dataset_without_stand_in_fails_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_config(compose_config("debug=tiny", "rft=lora_llm_pruner"))  # the bundled Alpaca stands in
    with pytest.raises(PruneError, match="rft.dataset=alpaca_cleaned is not bundled"):
        check_config(compose_config("debug=tiny", "rft=lora_llm_pruner", "rft.stand_in=null"))


def test_every_recipe_composes_and_parses() -> None:
    for recipe in ("none", "lora", "lora_llm_pruner", "lora_trsp", "full"):
        o = rft.parse_options(compose_config("debug=tiny", f"rft={recipe}").rft)
        assert o.kind == ("none" if recipe == "none" else "full" if recipe == "full" else "lora")
    trsp = rft.parse_options(compose_config("rft=lora_trsp", "model.preset=null").rft)
    assert (trsp.rank, trsp.alpha, trsp.dropout, trsp.lr, trsp.epochs, trsp.nsamples, trsp.targets) == \
        (64, 16, 0.1, 2e-5, 3.0, 1000, ("q", "v"))
    sg = rft.parse_options(compose_config("rft=lora", "model.preset=null").rft)
    assert (sg.rank, sg.alpha, sg.dropout, sg.lr, sg.batch_size, sg.grad_accum, sg.nsamples, sg.seqlen) == \
        (32, 10, 0.05, 2e-4, 1, 4, 8000, 1024)
    llmp = rft.parse_options(compose_config("rft=lora_llm_pruner", "model.preset=null").rft)
    assert (llmp.rank, llmp.lr, llmp.epochs, llmp.global_batch) == (8, 1e-4, 2.0, 64)
