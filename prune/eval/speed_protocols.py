"""The speed protocols as data, and the code that measures a model under them.

A `Protocol` is one timed workload (name, batch, prompt length, new tokens, iterations, statistic, source
paper); `PAPER_PROTOCOLS` holds the three the papers used, and the speed evaluator derives its own from
them with the sizes of its options. `measure` runs a list of protocols on a model, the same way in the
evaluator's process and in the child process of ``subprocess=True`` (`prune.eval.speed_child`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from prune.eval.memory import MAX_RSS_INCREASE, PeakMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """One timed workload on random prompt ids.

    ``new_tokens == 0`` is a single forward pass over the prompt without the KV cache (its rate counts
    prompt tokens); otherwise greedy generation of exactly ``new_tokens`` tokens with the cache (its rate
    counts generated tokens). ``statistic`` summarises the ``iters`` timed runs. ``headline`` is the metric
    the paper compares models by (``ms``: lower is better, ``tok_s``: higher is better); it comes first
    among the protocol's metrics and is the one `prune.eval.speed.speedups` takes ratios of.
    """

    name: str
    batch: int
    prompt_len: int
    new_tokens: int
    iters: int
    statistic: Literal["median", "mean"]
    headline: Literal["ms", "tok_s"]
    source: str

    @property
    def generates(self) -> bool:
        return self.new_tokens > 0

    @property
    def headline_key(self) -> str:
        return f"speed/{self.name}_{self.headline}"

    def metric_keys(self) -> list[str]:
        """The protocol's ``speed/*`` keys in the order its results list them."""
        latency = [f"speed/{self.name}_ms"]
        if self.statistic == "mean":  # the median beside a mean shows how skewed the runs were
            latency.append(f"speed/{self.name}_ms_median")
        rate = [f"speed/{self.name}_tok_s"]
        return rate + latency if self.headline == "tok_s" else latency + rate

    def metrics(self, seconds: Sequence[float]) -> dict[str, float]:
        """The protocol's metrics from the seconds of its timed runs."""
        summary = statistics.fmean(seconds) if self.statistic == "mean" else statistics.median(seconds)
        tokens = self.new_tokens if self.generates else self.prompt_len
        values = {f"speed/{self.name}_ms": summary * 1e3,
                  f"speed/{self.name}_ms_median": statistics.median(seconds) * 1e3,
                  f"speed/{self.name}_tok_s": self.batch * tokens / summary}
        return {key: values[key] for key in self.metric_keys()}

    def nan_metrics(self) -> dict[str, float]:
        """What a protocol that could not run (out of memory) records."""
        return {key: math.nan for key in self.metric_keys()}

    def describe(self) -> dict[str, Any]:
        """The parameters recorded with the results (same keys as ever, so old results compare)."""
        if not self.generates:
            return {"source": self.source, "seq_len": self.prompt_len, "batch": self.batch,
                    "iters": self.iters, "use_cache": False, "statistic": self.statistic}
        statistic = "mean (median also reported)" if self.statistic == "mean" else self.statistic
        return {"source": self.source, "prompt_len": self.prompt_len, "new_tokens": self.new_tokens,
                "batch": self.batch, "iters": self.iters, "use_cache": True, "greedy": True,
                "statistic": statistic}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Protocol:
        return cls(**fields)


PAPER_PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    # The forward pass includes the LM head on every position, as a plain model(input_ids) call does.
    Protocol("prefill", batch=1, prompt_len=2048, new_tokens=0, iters=50, statistic="median",
             headline="ms",
             source="SLEB/TRSP latency (batch 1 x 2048, median of 50 forward passes, no cache)"),
    # The prompt length is ours to choose: the paper does not state it.
    Protocol("decode", batch=1, prompt_len=64, new_tokens=128, iters=20, statistic="mean",
             headline="ms", source="BlockPruner App. F (128 new tokens with KV cache, mean of 20 runs)"),
    # The timed region also covers prompt processing.
    Protocol("throughput", batch=64, prompt_len=64, new_tokens=128, iters=10, statistic="median",
             headline="tok_s",
             source="SLEB/TRSP throughput (batch 64, prompt 64, 128 new tokens, 10 iterations)"),
)}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
# A measurement's ``speed/*`` metrics, and where they were taken (device, dtype, threads, peak-memory kind).
Measurement = tuple[dict[str, float], dict[str, Any]]


def measure(model: Any, protocols: Sequence[Protocol], warmup: int, seed: int) -> Measurement:
    """Run ``protocols`` on ``model`` in this process: its ``speed/*`` metrics and where they were taken.

    Each protocol also records its peak memory (``speed/<name>_peak_mem_gb``), and the whole measurement
    ``speed/peak_mem_gb``. A protocol that runs out of memory records NaN and the others still run.
    """
    device, dtype = model_device_dtype(model)
    per_protocol = PeakMemory(device, cpu=MAX_RSS_INCREASE)
    env = {"device": str(device), "device_name": device_name(device), "dtype": str(dtype),
           "num_threads": torch.get_num_threads(), "peak_mem": per_protocol.kind}
    vocab = _vocab_size(model)
    was_training = model.training
    model.eval()  # dropout off: measure the inference graph
    metrics: dict[str, float] = {}
    peaks: list[float] = []
    overall = PeakMemory(device, cpu=MAX_RSS_INCREASE).start()  # CPU: max-RSS increase over everything
    try:
        with torch.inference_mode():
            for protocol in protocols:
                per_protocol.start()
                metrics.update(_run_or_nan(model, protocol, vocab, device, warmup, seed))
                peak = per_protocol.stop()
                metrics[f"speed/{protocol.name}_peak_mem_gb"] = peak
                peaks.append(peak)
    finally:
        model.train(was_training)
    # CUDA peaks are reset per protocol, so the overall peak is their max; a CPU max-RSS increase must be
    # taken from the start of the whole measurement instead.
    if device.type == "cuda":
        metrics["speed/peak_mem_gb"] = max(peaks) if peaks else math.nan
    else:
        metrics["speed/peak_mem_gb"] = overall.stop()
    return metrics, env


def _run_or_nan(model: Any, protocol: Protocol, vocab: int, device: torch.device, warmup: int,
                seed: int) -> dict[str, float]:
    try:
        return protocol.metrics(_time_protocol(model, protocol, vocab, device, warmup, seed))
    except torch.OutOfMemoryError:
        # One protocol not fitting (typically throughput at batch 64) should not lose the others.
        log.warning("speed/%s: out of memory; recording NaN", protocol.name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return protocol.nan_metrics()


def _time_protocol(model: Any, protocol: Protocol, vocab: int, device: torch.device, warmup: int,
                   seed: int) -> list[float]:
    ids = random_ids(vocab, protocol.batch, protocol.prompt_len, seed, device)
    if protocol.generates:
        def run() -> object:
            return generate_exactly(model, ids, protocol.new_tokens)
    else:
        def run() -> object:
            return model(input_ids=ids, use_cache=False)
    return _time_runs(run, protocol.iters, warmup, device)


def _time_runs(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` timed runs, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without a sync the timer would stop at launch, not at end.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids in [0, vocab): identical prompts for the dense and pruned model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def generate_exactly(model: Any, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` that produces exactly ``new_tokens`` tokens per row, with the KV cache.

    ``min_new_tokens == max_new_tokens`` masks EOS until the end, so no row stops early and every
    run does the same amount of work.  Returns only the generated ids, shape (batch, new_tokens).
    """
    prompt_len = input_ids.shape[1]
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        use_cache=True,
        pad_token_id=_pad_token_id(model),
    )
    generated = out[:, prompt_len:]
    if generated.shape[1] != new_tokens:
        raise RuntimeError(f"generate produced {generated.shape[1]} tokens, expected {new_tokens}")
    return generated


def _pad_token_id(model: Any) -> int:
    # generate() wants a pad id even without padding; passing one avoids its fallback warning.
    gc = getattr(model, "generation_config", None)
    for cand in (getattr(gc, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
                 getattr(gc, "eos_token_id", None)):
        if isinstance(cand, (list, tuple)):
            cand = cand[0] if cand else None
        if cand is not None:
            return int(cand)
    return 0


# --------------------------------------------------------------------------------------------
# The model and the machine
# --------------------------------------------------------------------------------------------
def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    # The first parameter decides where inputs go (also right for device_map models: the
    # embedding comes first).
    p = next(model.parameters())
    return p.device, p.dtype


def _vocab_size(model: Any) -> int:
    # Trust the embedding matrix over the config: ids past its end would crash the lookup.
    n = model.get_input_embeddings().num_embeddings
    cfg_vocab = getattr(model.config, "vocab_size", None)
    return min(n, cfg_vocab) if cfg_vocab else n


def device_name(device: torch.device) -> str:
    """GPU name on CUDA, CPU model (from /proc/cpuinfo) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model_name()


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
