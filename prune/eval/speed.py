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

Each protocol is a `Protocol` record (`prune.eval.speed_protocols`): the papers' settings are
``PAPER_PROTOCOLS``, and the evaluator's keyword arguments (``prefill_len``, ``decode_iters``, ...)
replace their sizes.

Common to all: untimed warm-up runs, ``time.perf_counter``, ``torch.cuda.synchronize`` around
every timed region on CUDA, ``torch.inference_mode``, and random prompt ids in ``[0, vocab)``
drawn from a seeded generator.  No padding is used, so the tokenizer is never needed.

Peak memory (``speed/peak_mem_gb``, GiB = 2**30 bytes, plus ``speed/<protocol>_peak_mem_gb``,
taken by `prune.eval.memory.PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (weights included); on CPU the *increase* of the process's max RSS
(``ru_maxrss``) during the measurement.  That CPU figure leaves out the weights and is 0 when an
earlier peak (e.g. loading or calibration) was higher; it is most meaningful with ``subprocess=True``.

The papers' figures come from full-size models on GPUs.  Numbers from the small CPU presets
(``preset=...``) use the same code but are **not** the papers' protocol: use them only to compare
models measured with the same preset on the same machine.

``subprocess=True`` saves the model (``save_pretrained``, safetensors) to a temporary directory
and measures it in a fresh ``python -m prune.eval.speed_child`` process, so that the cells of a sweep
do not disturb each other (allocator state, caches, memory high-water marks).

Helpers: ``ideal_speedup`` (parameter-proportional ideal speed-up) and ``speedups`` (ratios of
a dense and a pruned metric dict).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from prune.errors import PruneError
from prune.eval.memory import MAX_RSS_INCREASE, PeakMemory
from prune.eval.semi_structured import semi_structured
from prune.eval.speed_child import measure_in_subprocess
from prune.eval.speed_protocols import (
    PAPER_PROTOCOLS,
    Protocol,
    device_name,
    generate_exactly,
    measure,
    model_device_dtype,
    random_ids,
)
from prune.options import Options, bounded

__all__ = ["PAPER_PROTOCOLS", "PROTOCOLS", "Protocol", "SpeedEvaluator", "generate_exactly", "ideal_speedup",
           "random_ids", "speedups"]

PROTOCOLS = tuple(PAPER_PROTOCOLS)  # the protocol names, in the order they run


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------
def ideal_speedup(params_dense: int, params_pruned: int) -> float:
    """Speed-up expected if run time were proportional to the parameter count."""
    if params_pruned <= 0:
        raise PruneError(f"params_pruned must be positive, got {params_pruned}")
    return params_dense / params_pruned


def speedups(dense: dict[str, float], pruned: dict[str, float]) -> dict[str, float]:
    """Speed-ups of ``pruned`` over ``dense`` for every protocol whose headline metric both dicts hold.

    Latencies give dense / pruned, throughputs pruned / dense, so > 1 always means faster.
    A zero or non-finite operand gives NaN rather than an exception: one failed cell
    (e.g. out of memory) should not abort a sweep's summary.
    """
    out: dict[str, float] = {}
    for protocol in PAPER_PROTOCOLS.values():
        metric = protocol.headline_key
        if metric not in dense or metric not in pruned:
            continue
        higher_is_better = protocol.headline == "tok_s"
        num, den = (pruned[metric], dense[metric]) if higher_is_better else (dense[metric], pruned[metric])
        ok = all(math.isfinite(v) for v in (num, den)) and den != 0
        out[f"speed/{protocol.name}_speedup"] = float(num / den) if ok else math.nan
    return out


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpeedOptions(Options):
    """`SpeedEvaluator`'s keyword arguments, checked where they enter (``eval.speed.<name>`` in messages)."""

    prefix: ClassVar[str] = "eval.speed"
    protocols: tuple[str, ...] = PROTOCOLS
    prefill_len: int = bounded(2048, ge=1)
    prefill_batch: int = bounded(1, ge=1)
    prefill_iters: int = bounded(50, ge=1)
    decode_new_tokens: int = bounded(128, ge=0)  # >= 1 where decode runs (`check`)
    decode_iters: int = bounded(20, ge=1)
    decode_prompt_len: int = bounded(64, ge=1)
    decode_batch: int = bounded(1, ge=1)
    throughput_prompt_len: int = bounded(64, ge=1)
    throughput_new_tokens: int = bounded(128, ge=0)  # >= 1 where throughput runs
    throughput_batch: int = bounded(64, ge=1)
    throughput_iters: int = bounded(10, ge=1)
    warmup: int = bounded(2, ge=0)
    subprocess: bool = False
    preset: str | None = None
    seed: int = bounded(0, ge=0)
    sparse_kernels: bool = True  # a 2:4-sparse model on an Ampere+ GPU: time its linears on the 2:4 kernels

    def check(self) -> None:
        unknown = [p for p in self.protocols if p not in PAPER_PROTOCOLS]
        if unknown:
            raise PruneError(f"unknown speed protocol(s) {unknown}; choose from {PROTOCOLS}")
        for name in ("decode", "throughput"):
            # A protocol with no new tokens would be timed as a prefill pass, not as generation.
            if name in self.protocols and getattr(self, f"{name}_new_tokens") < 1:
                raise self.error(f"{name}_new_tokens", "must be >= 1")

    def sizes(self, name: str) -> dict[str, int]:
        """The sizes of one protocol's record (`Protocol` field names)."""
        return {
            "prefill": {"batch": self.prefill_batch, "prompt_len": self.prefill_len,
                        "iters": self.prefill_iters},
            "decode": {"batch": self.decode_batch, "prompt_len": self.decode_prompt_len,
                       "new_tokens": self.decode_new_tokens, "iters": self.decode_iters},
            "throughput": {"batch": self.throughput_batch, "prompt_len": self.throughput_prompt_len,
                           "new_tokens": self.throughput_new_tokens, "iters": self.throughput_iters},
        }[name]


class SpeedEvaluator:
    """Measures prefill latency, decode latency and generation throughput of a causal LM.

    ``__call__(model, tokenizer)`` returns ``speed/*`` metrics; the tokenizer is accepted for the
    runner's uniform evaluator interface but not used (inputs are random ids).  The keyword
    arguments are the sizes of the `PAPER_PROTOCOLS` (``conf/eval/*.yaml`` names them);
    ``self.protocols`` holds the resulting `Protocol` records.
    """

    def __init__(self, **options: Any) -> None:
        o = SpeedOptions.parse(options)  # types, ranges and protocol names, named eval.speed.<argument>
        self.protocols: tuple[Protocol, ...] = tuple(
            dataclasses.replace(PAPER_PROTOCOLS[name], **o.sizes(name)) for name in o.protocols)
        self.warmup, self.subprocess, self.preset, self.seed = o.warmup, o.subprocess, o.preset, o.seed
        self.sparse_kernels = o.sparse_kernels
        # Filled by __call__: where and how the last measurement ran (for describe()).
        self._env: dict[str, Any] = {}

    def describe(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Every protocol's parameters plus device, dtype and versions.

        Device and dtype come from ``model`` if given, else from the last ``__call__``
        (None before any call).
        """
        import transformers

        env = dict(self._env)
        if model is not None:
            device, dtype = model_device_dtype(model)
            env.update(device=str(device), device_name=device_name(device), dtype=str(dtype),
                       peak_mem=PeakMemory(device, cpu=MAX_RSS_INCREASE).kind)
        return {
            "protocols": {p.name: p.describe() for p in self.protocols},
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
            "sparse_kernels": env.get("sparse_kernels"),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }

    def __call__(self, model: Any, tokenizer: Any = None) -> dict[str, float]:
        run = measure_in_subprocess if self.subprocess else measure
        # A 2:4-sparse model on an Ampere+ GPU runs its decoder linears on the 2:4 kernels (in this process
        # only: the subprocess reloads dense weights); elsewhere the zeros are timed densely, as they run.
        with semi_structured(_decoder_layers(model), enabled=self.sparse_kernels and not self.subprocess) \
                as converted:
            metrics, self._env = run(model, self.protocols, warmup=self.warmup, seed=self.seed)
        self._env["sparse_kernels"] = converted  # decoder linears timed on 2:4 kernels (0: none)
        return metrics


def _decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder layers of a supported model; an empty list for anything else (nothing to convert)."""
    from prune.models.adapter import adapter_for

    try:
        return adapter_for(model).layers()
    except (PruneError, AttributeError):
        return torch.nn.ModuleList()
