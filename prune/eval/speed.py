"""Inference-speed evaluator: three named protocols, each taken from the paper that used it.

``prefill``
    Prompt-processing latency: batch 1 x 2048 random tokens, one forward pass with
    ``use_cache=False``, median over 50 iterations.  This is the latency protocol of SLEB
    (Song et al., 2024), which TRSP reuses.  Reported as ``speed/prefill_ms`` (median) and
    ``speed/prefill_tok_s``.  The forward pass includes the LM head on every position, as a
    plain ``model(input_ids)`` call does.

``decode``
    Time to generate 128 new tokens greedily with the KV cache, mean of 20 runs: the protocol of
    BlockPruner, Appendix F.  Reported as ``speed/decode_ms`` (mean), ``speed/decode_ms_median``
    and ``speed/decode_tok_s``.  Exactly N tokens are generated (``min_new_tokens =
    max_new_tokens = N`` masks EOS), and the generated length is checked.  The prompt length is
    ours to choose (``decode_prompt_len``, default 64).

``throughput``
    Generation throughput: batch 64, 64-token prompts, 128 new tokens, 10 iterations: the SLEB
    throughput protocol, reused by TRSP.  Reported as ``speed/throughput_tok_s`` = generated
    tokens / wall time of the median iteration.  That time also covers prompt processing.

Common to all: untimed warm-up runs, ``time.perf_counter``, ``torch.cuda.synchronize`` around
every timed region on CUDA, ``torch.inference_mode``, and random prompt ids in ``[0, vocab)``
drawn from a seeded generator.  No padding is used, so the tokenizer is never needed.

Peak memory (``speed/peak_mem_gb``, GiB = 2**30 bytes, plus ``speed/<protocol>_peak_mem_gb``):
on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights
included); on CPU the *increase* of the process's max RSS (``ru_maxrss``) during the
measurement.  That CPU figure leaves out the weights and is 0 when an earlier peak (e.g. loading
or calibration) was higher; it is most meaningful with ``subprocess=True``.

The papers' figures come from full-size models on GPUs.  Numbers from the small CPU presets
(``preset=...``) use the same code but are **not** the papers' protocol: use them only to compare
models measured with the same preset on the same machine.

``subprocess=True`` saves the model (``save_pretrained``, safetensors) to a temporary directory
and measures it in a fresh ``python -m prune.eval.speed`` process, so that the cells of a sweep
do not disturb each other (allocator state, caches, memory high-water marks).

Helpers: ``ideal_speedup`` (parameter-proportional ideal speed-up) and ``speedups`` (ratios of
a dense and a pruned metric dict).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess as sp
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PROTOCOLS = ("prefill", "decode", "throughput")
# Where each protocol comes from; recorded in describe() so results say what they measured.
PROTOCOL_SOURCES = {
    "prefill": "SLEB/TRSP latency (batch 1 x 2048, median of 50 forward passes, no cache)",
    "decode": "BlockPruner App. F (128 new tokens with KV cache, mean of 20 runs)",
    "throughput": "SLEB/TRSP throughput (batch 64, prompt 64, 128 new tokens, 10 iterations)",
}
# The child process prints its result on one line with this prefix; anything else on stdout
# (library chatter) is ignored by the parent.
RESULT_PREFIX = "PRUNE_SPEED_RESULT "
_GIB = float(2**30)


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------
def ideal_speedup(params_dense: int, params_pruned: int) -> float:
    """Speed-up expected if run time were proportional to the parameter count."""
    if params_pruned <= 0:
        raise ValueError(f"params_pruned must be positive, got {params_pruned}")
    return params_dense / params_pruned


# (speed-up key, metric key, True if higher metric is better)
_SPEEDUP_KEYS = (
    ("speed/prefill_speedup", "speed/prefill_ms", False),
    ("speed/decode_speedup", "speed/decode_ms", False),
    ("speed/throughput_speedup", "speed/throughput_tok_s", True),
)


def speedups(dense: dict[str, float], pruned: dict[str, float]) -> dict[str, float]:
    """Speed-ups of ``pruned`` over ``dense`` for every protocol whose metric both dicts hold.

    Latencies give dense / pruned, throughputs pruned / dense, so > 1 always means faster.
    A zero or non-finite operand gives NaN rather than an exception: one failed cell
    (e.g. out of memory) should not abort a sweep's summary.
    """
    out: dict[str, float] = {}
    for speed_key, metric, higher_is_better in _SPEEDUP_KEYS:
        if metric not in dense or metric not in pruned:
            continue
        num, den = (pruned[metric], dense[metric]) if higher_is_better else (dense[metric], pruned[metric])
        ok = all(math.isfinite(v) for v in (num, den)) and den != 0
        out[speed_key] = float(num / den) if ok else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Environment helpers
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without a sync the timer would stop at launch, not at end.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """GPU name on CUDA, CPU model (from /proc/cpuinfo) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model_name()


def _max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class _PeakMemory:
    """Peak memory of one measurement: CUDA max allocated, or the CPU max-RSS increase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss0 = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss0 = _max_rss_bytes()

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / _GIB
        return (_max_rss_bytes() - self._rss0) / _GIB

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated (GiB, weights included)"
        return "cpu ru_maxrss increase during measurement (GiB, weights excluded)"


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    # The first parameter decides where inputs go (also right for device_map models: the
    # embedding comes first).
    p = next(model.parameters())
    return p.device, p.dtype


def _vocab_size(model: Any) -> int:
    # Trust the embedding matrix over the config: ids past its end would crash the lookup.
    n = model.get_input_embeddings().num_embeddings
    cfg_vocab = getattr(model.config, "vocab_size", None)
    return min(n, cfg_vocab) if cfg_vocab else n


def random_ids(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids in [0, vocab): identical prompts for the dense and pruned model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


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


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------
class SpeedEvaluator:
    """Measures prefill latency, decode latency and generation throughput of a causal LM.

    ``__call__(model, tokenizer)`` returns ``speed/*`` metrics; the tokenizer is accepted for the
    runner's uniform evaluator interface but not used (inputs are random ids).
    """

    def __init__(
        self,
        protocols: Sequence[str] = PROTOCOLS,
        prefill_len: int = 2048,
        prefill_batch: int = 1,
        prefill_iters: int = 50,
        decode_new_tokens: int = 128,
        decode_iters: int = 20,
        decode_prompt_len: int = 64,
        decode_batch: int = 1,
        throughput_prompt_len: int = 64,
        throughput_new_tokens: int = 128,
        throughput_batch: int = 64,
        throughput_iters: int = 10,
        warmup: int = 2,
        subprocess: bool = False,
        preset: str | None = None,
        seed: int = 0,
    ) -> None:
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown speed protocol(s) {unknown}; choose from {PROTOCOLS}")
        self.protocols = list(protocols)
        self.prefill_len, self.prefill_batch, self.prefill_iters = prefill_len, prefill_batch, prefill_iters
        self.decode_new_tokens, self.decode_iters = decode_new_tokens, decode_iters
        self.decode_prompt_len, self.decode_batch = decode_prompt_len, decode_batch
        self.throughput_prompt_len, self.throughput_new_tokens = throughput_prompt_len, throughput_new_tokens
        self.throughput_batch, self.throughput_iters = throughput_batch, throughput_iters
        self.warmup, self.subprocess, self.preset, self.seed = warmup, subprocess, preset, seed
        # Filled by __call__: where and how the last measurement ran (for describe()).
        self._env: dict[str, Any] = {}

    # -- configuration ------------------------------------------------------------------------
    def _kwargs(self) -> dict[str, Any]:
        """Constructor arguments, to rebuild the same evaluator in the child process."""
        return {
            "protocols": self.protocols,
            "prefill_len": self.prefill_len, "prefill_batch": self.prefill_batch,
            "prefill_iters": self.prefill_iters,
            "decode_new_tokens": self.decode_new_tokens, "decode_iters": self.decode_iters,
            "decode_prompt_len": self.decode_prompt_len, "decode_batch": self.decode_batch,
            "throughput_prompt_len": self.throughput_prompt_len,
            "throughput_new_tokens": self.throughput_new_tokens,
            "throughput_batch": self.throughput_batch, "throughput_iters": self.throughput_iters,
            "warmup": self.warmup, "subprocess": self.subprocess, "preset": self.preset, "seed": self.seed,
        }

    def describe(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Every protocol's parameters plus device, dtype and versions.

        Device and dtype come from ``model`` if given, else from the last ``__call__``
        (None before any call).
        """
        import transformers

        env = dict(self._env)
        if model is not None:
            device, dtype = _model_device_dtype(model)
            env.update(device=str(device), device_name=device_name(device), dtype=str(dtype),
                       peak_mem=_PeakMemory(device).kind)
        protocol_params = {
            "prefill": {"seq_len": self.prefill_len, "batch": self.prefill_batch,
                        "iters": self.prefill_iters, "use_cache": False, "statistic": "median"},
            "decode": {"prompt_len": self.decode_prompt_len, "new_tokens": self.decode_new_tokens,
                       "batch": self.decode_batch, "iters": self.decode_iters, "use_cache": True,
                       "greedy": True, "statistic": "mean (median also reported)"},
            "throughput": {"prompt_len": self.throughput_prompt_len,
                           "new_tokens": self.throughput_new_tokens, "batch": self.throughput_batch,
                           "iters": self.throughput_iters, "use_cache": True, "greedy": True,
                           "statistic": "median"},
        }
        return {
            "protocols": {p: {"source": PROTOCOL_SOURCES[p], **protocol_params[p]} for p in self.protocols},
            "warmup": self.warmup,
            "seed": self.seed,
            "subprocess": self.subprocess,
            "preset": self.preset,
            "timer": "time.perf_counter",
            "device": env.get("device"),
            "device_name": env.get("device_name"),
            "dtype": env.get("dtype"),
            "num_threads": env.get("num_threads", torch.get_num_threads()),
            "peak_mem": env.get("peak_mem"),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }

    # -- measurement --------------------------------------------------------------------------
    def __call__(self, model: Any, tokenizer: Any = None) -> dict[str, float]:
        if self.subprocess:
            return self._measure_in_subprocess(model)
        return self._measure(model)

    def _measure(self, model: Any) -> dict[str, float]:
        device, dtype = _model_device_dtype(model)
        mem = _PeakMemory(device)
        self._env = {"device": str(device), "device_name": device_name(device), "dtype": str(dtype),
                     "num_threads": torch.get_num_threads(), "peak_mem": mem.kind}
        runners = {"prefill": self._prefill, "decode": self._decode, "throughput": self._throughput}
        vocab = _vocab_size(model)
        was_training = model.training
        model.eval()  # dropout off: measure the inference graph
        metrics: dict[str, float] = {}
        peaks: list[float] = []
        overall = _PeakMemory(device)  # CPU: max-RSS increase over the whole measurement
        overall.start()
        try:
            with torch.inference_mode():
                for name in self.protocols:
                    mem.start()
                    try:
                        metrics.update(runners[name](model, vocab, device))
                    except torch.OutOfMemoryError:
                        # One protocol not fitting (typically throughput at batch 64) should
                        # not lose the others: record NaN and move on.
                        log.warning("speed/%s: out of memory; recording NaN", name)
                        metrics.update(self._nan_metrics(name))
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    peak = mem.peak_gb()
                    metrics[f"speed/{name}_peak_mem_gb"] = peak
                    peaks.append(peak)
        finally:
            model.train(was_training)
        # CUDA peaks are reset per protocol, so the overall peak is their max; a CPU max-RSS
        # increase must be taken from the start of the whole measurement instead.
        if device.type == "cuda":
            metrics["speed/peak_mem_gb"] = max(peaks) if peaks else math.nan
        else:
            metrics["speed/peak_mem_gb"] = overall.peak_gb()
        return metrics

    @staticmethod
    def _nan_metrics(name: str) -> dict[str, float]:
        keys = {"prefill": ("prefill_ms", "prefill_tok_s"),
                "decode": ("decode_ms", "decode_ms_median", "decode_tok_s"),
                "throughput": ("throughput_tok_s", "throughput_ms")}[name]
        return {f"speed/{k}": math.nan for k in keys}

    def _prefill(self, model: Any, vocab: int, device: torch.device) -> dict[str, float]:
        ids = random_ids(vocab, self.prefill_batch, self.prefill_len, self.seed, device)
        times = _time_runs(lambda: model(input_ids=ids, use_cache=False), self.prefill_iters,
                           self.warmup, device)
        med = statistics.median(times)
        return {"speed/prefill_ms": med * 1e3,
                "speed/prefill_tok_s": self.prefill_batch * self.prefill_len / med}

    def _decode(self, model: Any, vocab: int, device: torch.device) -> dict[str, float]:
        ids = random_ids(vocab, self.decode_batch, self.decode_prompt_len, self.seed, device)
        n = self.decode_new_tokens
        times = _time_runs(lambda: generate_exactly(model, ids, n), self.decode_iters, self.warmup, device)
        mean = statistics.fmean(times)
        return {"speed/decode_ms": mean * 1e3,
                "speed/decode_ms_median": statistics.median(times) * 1e3,
                "speed/decode_tok_s": self.decode_batch * n / mean}

    def _throughput(self, model: Any, vocab: int, device: torch.device) -> dict[str, float]:
        ids = random_ids(vocab, self.throughput_batch, self.throughput_prompt_len, self.seed, device)
        n = self.throughput_new_tokens
        times = _time_runs(lambda: generate_exactly(model, ids, n), self.throughput_iters,
                           self.warmup, device)
        med = statistics.median(times)
        return {"speed/throughput_tok_s": self.throughput_batch * n / med,
                "speed/throughput_ms": med * 1e3}

    # -- subprocess mode ----------------------------------------------------------------------
    def _measure_in_subprocess(self, model: Any) -> dict[str, float]:
        device, dtype = _model_device_dtype(model)
        config = {
            "evaluator": {**self._kwargs(), "subprocess": False},
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            # Same thread count as the parent, so in-process and subprocess CPU numbers compare.
            "num_threads": torch.get_num_threads(),
        }
        with tempfile.TemporaryDirectory(prefix="prune-speed-") as tmp:
            model.save_pretrained(tmp)
            proc = sp.run(
                [sys.executable, "-m", "prune.eval.speed", "--model-dir", tmp,
                 "--config-json", json.dumps(config)],
                capture_output=True, text=True, env=_child_env(),
            )
        if proc.returncode != 0:
            raise RuntimeError(f"speed subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        log.debug("speed subprocess stderr:\n%s", proc.stderr[-4000:])
        result = _parse_child_output(proc.stdout)
        self._env = result["env"]
        return {k: float(v) for k, v in result["metrics"].items()}


def _child_env() -> dict[str, str]:
    """Environment for the child: make this checkout's ``prune`` importable even if not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # .../prune/eval/speed.py -> repo root
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _parse_child_output(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"speed subprocess printed no result line; stdout tail:\n{stdout[-2000:]}")


def _load_for_child(model_dir: str, device: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device.startswith("cuda"):
        kwargs["device_map"] = device  # load straight onto the GPU, not via host memory
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.to(device) if not device.startswith("cuda") else model


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: load a saved model, measure it, print one JSON result line."""
    try:
        # Registers the project's custom (pruned) model types with the Auto classes, if any.
        import prune  # noqa: F401
    except ImportError:
        pass
    parser = argparse.ArgumentParser(description="Measure inference speed of a saved causal LM.")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--config-json", required=True, help="JSON: evaluator kwargs, device, dtype")
    args = parser.parse_args(argv)
    config = json.loads(args.config_json)

    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    model = _load_for_child(args.model_dir, config.get("device", "cpu"), config.get("dtype", "float32"))
    evaluator = SpeedEvaluator(**{**config.get("evaluator", {}), "subprocess": False})
    metrics = evaluator(model, None)
    print(RESULT_PREFIX + json.dumps({"metrics": metrics, "env": evaluator._env}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
