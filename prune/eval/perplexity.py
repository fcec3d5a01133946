"""Perplexity on WikiText-2, PTB and C4 under the two conventions the seed papers use.

- ``seq2048`` (BlockPruner, SLEB, TRSP/ELDeR): the test text joined with "\\n\\n", tokenised once, cut into
  2048-token windows, the remainder dropped; PPL = exp(mean over windows of the per-window mean NLL).
  Dense Llama-2-7B = 5.47.
- ``seq4096`` (DISP-LLM, LLM Surgeon): 4096-token windows, the last partial window kept; PPL =
  exp(total NLL / total predicted tokens) (token-weighted). Dense Llama-2-7B = 5.12.

Windows never overlap and the first token of each window is context only. ``max_windows`` evaluates the
first N windows (a CPU slice); the slice is recorded with the metric and printed beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from tqdm import tqdm

from prune.data.sources import load_rows
from prune.data.tokens import encode_cached, tensor_hash
from prune.errors import PruneError
from prune.eval.nll import sequence_nll
from prune.options import Options, bounded


@dataclass(frozen=True)
class Convention:
    seqlen: int
    keep_partial: bool
    token_weighted: bool


CONVENTIONS = {
    "seq2048": Convention(seqlen=2048, keep_partial=False, token_weighted=False),
    "seq4096": Convention(seqlen=4096, keep_partial=True, token_weighted=True),
}

# dataset -> (split, join string). PTB and C4 follow the GPTQ/SparseGPT loaders (space-joined).
TEST_TEXTS = {"wikitext2": ("test", "\n\n"), "ptb": ("test", " "), "c4": ("validation", " ")}


def windows(ids: torch.Tensor, conv: Convention) -> list[torch.Tensor]:
    """Cut a 1-D id tensor into the convention's non-overlapping windows."""
    n_full = len(ids) // conv.seqlen
    out = [ids[i * conv.seqlen : (i + 1) * conv.seqlen] for i in range(n_full)]
    tail = ids[n_full * conv.seqlen :]
    if conv.keep_partial and len(tail) > 1:
        out.append(tail)
    return out


def perplexity(nll: list[float], counts: list[int], token_weighted: bool) -> float:
    """exp of the token-weighted mean NLL, or of the mean of per-window mean NLLs."""
    if token_weighted:
        return math.exp(sum(nll) / sum(counts))
    return math.exp(sum(n / c for n, c in zip(nll, counts)) / len(nll))


@dataclass(frozen=True)
class PerplexityOptions(Options):
    """The evaluator's knobs, checked where they enter (``eval.ppl.<name>`` in messages)."""

    prefix: ClassVar[str] = "eval.ppl"
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    conventions: list[str] = field(default_factory=lambda: ["seq2048"])
    max_windows: int | None = None
    batch_size: int = bounded(1, ge=1)
    source: Literal["auto", "hub", "bundled"] = "auto"
    preset: str | None = None

    def check(self) -> None:
        # 0 must not read as "no limit" (falsy): a slice of zero windows has no perplexity.
        if self.max_windows is not None and self.max_windows < 1:
            raise self.error("max_windows", "must be >= 1, or null for every window of the test set")
        if not self.datasets or not self.conventions:
            raise self.error("datasets" if not self.datasets else "conventions", "must name at least one")
        unknown = [c for c in self.conventions if c not in CONVENTIONS]
        unknown += [d for d in self.datasets if d not in TEST_TEXTS]
        if unknown:
            raise PruneError(f"unknown perplexity dataset/convention {unknown}; datasets {list(TEST_TEXTS)}, "
                             f"conventions {list(CONVENTIONS)}")


class PerplexityEvaluator:
    """``ppl/<dataset>`` for each dataset and convention.

    Args:
        datasets: any of ``wikitext2``, ``ptb``, ``c4``.
        conventions: any of ``seq2048``, ``seq4096``; the first also gives the plain ``ppl/<dataset>`` key.
        max_windows: evaluate only the first N >= 1 windows (CPU slice); ``None`` = the full test set.
        batch_size: windows per forward pass (>= 1).
        source: ``auto`` | ``hub`` | ``bundled``.
        preset: the name of the CPU preset that set ``max_windows``, recorded with the metric.
    """

    def __init__(self, **options: Any) -> None:
        options = PerplexityOptions.parse(options)
        self.datasets, self.conventions = list(options.datasets), list(options.conventions)
        self.max_windows, self.batch_size = options.max_windows, options.batch_size
        self.source, self.preset = options.source, options.preset
        self._described: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        """The protocol of every metric this evaluator produced (filled in by the last call)."""
        return {"max_windows": self.max_windows, "batch_size": self.batch_size, "preset": self.preset,
                "metrics": self._described}

    @torch.inference_mode()
    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        device = next(model.parameters()).device
        for dataset in self.datasets:
            split, join = TEST_TEXTS[dataset]
            rows, source = load_rows(dataset, split, self.source)
            ids = encode_cached(tokenizer, join.join(rows))
            for k, name in enumerate(self.conventions):
                conv = CONVENTIONS[name]
                all_windows = windows(ids, conv)
                chosen = all_windows if self.max_windows is None else all_windows[: self.max_windows]
                value = self._evaluate(model, chosen, conv, device, f"ppl {dataset} {name}")
                metrics[f"ppl/{dataset}/{name}"] = value
                if k == 0:
                    metrics[f"ppl/{dataset}"] = value
                self._described[f"ppl/{dataset}/{name}"] = {
                    "dataset": dataset, "split": split, "join": join, "source": source, "convention": name,
                    "seqlen": conv.seqlen, "keep_partial": conv.keep_partial,
                    "token_weighted": conv.token_weighted,
                    "windows": len(chosen), "windows_total": len(all_windows),
                    "tokens": int(sum(len(w) for w in chosen)), "tokens_hash": tensor_hash(ids),
                    "slice": ("full" if len(chosen) == len(all_windows)
                              else f"first {len(chosen)} of {len(all_windows)} windows"),
                    "preset": self.preset,
                }
        return metrics

    def _evaluate(self, model: Any, wins: list[torch.Tensor], conv: Convention, device: Any,
                  desc: str) -> float:
        if not wins:
            raise PruneError("the perplexity test text is shorter than one window")
        nll: list[float] = []
        counts: list[int] = []
        # Full windows batch together; a partial tail (seq4096) has its own length and goes alone.
        groups = [wins[i : i + self.batch_size] for i in range(0, len(wins), self.batch_size)]
        groups = [g for group in groups
                  for g in ([group] if len({len(w) for w in group}) == 1 else [[w] for w in group])]
        for group in tqdm(groups, desc=desc, leave=False):
            batch = torch.stack(group).to(device)
            s, c = sequence_nll(model, batch)
            nll += s.tolist()
            counts += c.tolist()
        return perplexity(nll, counts, conv.token_weighted)
