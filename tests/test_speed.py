"""Tests of prune.eval.speed on a tiny random Llama (CPU, a few seconds)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prune.errors import PruneError
from prune.eval.memory import MAX_RSS_INCREASE, RSS_SAMPLED, PeakMemory
from prune.eval.speed import (
    PAPER_PROTOCOLS,
    Protocol,
    SpeedEvaluator,
    generate_exactly,
    ideal_speedup,
    random_ids,
    speedups,
)

# Small enough for the default suite; the runner's CPU preset is larger.
TINY = dict(prefill_len=32, prefill_iters=2, decode_new_tokens=5, decode_iters=2, decode_prompt_len=4,
            throughput_prompt_len=4, throughput_new_tokens=5, throughput_batch=2, throughput_iters=2,
            warmup=1, preset="test-tiny")

EXPECTED_KEYS = {
    "speed/prefill_ms", "speed/prefill_tok_s",
    "speed/decode_ms", "speed/decode_ms_median", "speed/decode_tok_s",
    "speed/throughput_tok_s", "speed/throughput_ms",
    "speed/peak_mem_gb",
}


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def _check_metrics(m: dict[str, float]) -> None:
    assert EXPECTED_KEYS <= m.keys()
    for k, v in m.items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
        # On CPU the peak figure is a max-RSS *increase*, which may legitimately be 0.
        assert v >= 0 if "peak_mem" in k else v > 0, (k, v)


def test_all_protocols_in_process(tiny_model):
    ev = SpeedEvaluator(**TINY)
    m = ev(tiny_model, None)
    _check_metrics(m)
    # tok/s must agree with the latency it was derived from.
    assert m["speed/prefill_tok_s"] == pytest.approx(32 / (m["speed/prefill_ms"] / 1e3))
    assert m["speed/decode_tok_s"] == pytest.approx(5 / (m["speed/decode_ms"] / 1e3))
    assert m["speed/throughput_tok_s"] == pytest.approx(2 * 5 / (m["speed/throughput_ms"] / 1e3))
    assert not tiny_model.training


def test_protocol_subset_and_unknown(tiny_model):
    m = SpeedEvaluator(protocols=["prefill"], **TINY)(tiny_model, None)
    assert "speed/prefill_ms" in m and "speed/decode_ms" not in m and "speed/throughput_tok_s" not in m
    with pytest.raises(PruneError):
        SpeedEvaluator(protocols=["prefil"])


def test_generate_exactly_ignores_eos(tiny_model):
    ids = random_ids(256, 1, 4, seed=0, device=torch.device("cpu"))
    with torch.inference_mode():
        first = int(tiny_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=1, pad_token_id=0)[0, -1])
    saved_eos = tiny_model.generation_config.eos_token_id
    # Make the greedy first token the EOS: plain generate would stop after 1 token.
    tiny_model.generation_config.eos_token_id = first
    try:
        with torch.inference_mode():
            gen = generate_exactly(tiny_model, ids, 7)
    finally:
        tiny_model.generation_config.eos_token_id = saved_eos
    assert gen.shape == (1, 7)
    assert int(gen[0, 0]) != first  # EOS was masked at the first step


def test_random_ids_seeded_and_in_range():
    a = random_ids(256, 2, 16, seed=3, device=torch.device("cpu"))
    b = random_ids(256, 2, 16, seed=3, device=torch.device("cpu"))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 256


def test_describe(tiny_model):
    ev = SpeedEvaluator(**TINY)
    d = ev.describe()
    assert set(d["protocols"]) == {"prefill", "decode", "throughput"}
    assert d["protocols"]["prefill"]["seq_len"] == 32
    assert d["protocols"]["decode"]["new_tokens"] == 5
    assert d["protocols"]["throughput"]["batch"] == 2
    assert d["preset"] == "test-tiny" and d["torch_version"] == torch.__version__
    d = ev.describe(tiny_model)
    assert d["dtype"] == "torch.float32" and d["device"] == "cpu" and d["device_name"]


def test_ideal_speedup():
    assert ideal_speedup(100, 50) == 2.0
    with pytest.raises(PruneError):
        ideal_speedup(100, 0)


def test_speedups():
    dense = {"speed/prefill_ms": 100.0, "speed/decode_ms": 300.0, "speed/throughput_tok_s": 1000.0,
             "speed/peak_mem_gb": 4.0}
    pruned = {"speed/prefill_ms": 50.0, "speed/decode_ms": 200.0, "speed/throughput_tok_s": 1500.0}
    assert speedups(dense, pruned) == {
        "speed/prefill_speedup": 2.0,
        "speed/decode_speedup": 1.5,
        "speed/throughput_speedup": 1.5,
    }
    # Only keys present in both; NaN instead of an exception on a failed cell.
    assert speedups({"speed/prefill_ms": 10.0}, {"speed/decode_ms": 1.0}) == {}
    out = speedups({"speed/prefill_ms": 10.0}, {"speed/prefill_ms": math.nan})
    assert math.isnan(out["speed/prefill_speedup"])


def test_subprocess(tiny_model):
    ev = SpeedEvaluator(**TINY, subprocess=True)
    m = ev(tiny_model, None)
    _check_metrics(m)
    d = ev.describe()
    assert d["device"] == "cpu" and d["dtype"] == "torch.float32" and d["subprocess"] is True


def test_peak_memory_cpu_ways():
    with PeakMemory("cpu") as sampled:  # the runner's way: absolute RSS, sampled by a thread
        block = torch.ones(2_000_000)
        time.sleep(0.15)
    assert sampled.kind == "cpu_rss_sampled" and sampled.peak_gb > 0
    with PeakMemory("cpu", cpu=MAX_RSS_INCREASE) as increase:  # the speed evaluator's way
        block = torch.ones(2_000_000)
    assert increase.kind == "cpu ru_maxrss increase during measurement (GiB, weights excluded)"
    assert increase.peak_gb >= 0
    del block


def test_peak_memory_cuda_reads_the_allocator_peak(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    for cpu, kind in ((RSS_SAMPLED, "cuda_max_allocated"),
                      (MAX_RSS_INCREASE, "cuda max_memory_allocated (GiB, weights included)")):
        with PeakMemory("cuda", cpu=cpu) as peak:
            pass
        assert peak.kind == kind and peak.peak_gb == 3.0
    assert resets == [torch.device("cuda")] * 2


def test_default_protocols_are_the_papers_and_survive_json():
    # The evaluator's keyword defaults repeat the papers' sizes; they must not drift apart.
    protocols = SpeedEvaluator().protocols
    assert protocols == tuple(PAPER_PROTOCOLS.values())
    assert [Protocol.from_json(json.loads(json.dumps(p.to_json()))) for p in protocols] == list(protocols)
