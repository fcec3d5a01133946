"""Calibration sets, each following the convention of the paper or official code that uses it.

Styles (``conf/calib/*.yaml`` chooses one; docs/fidelity.md#calibration tables which method's paper and
official code use which):
- ``random_windows`` (SLEB's paper, TRSP's code, GPTQ): join the rows, tokenise once, cut ``nsamples``
  windows of ``seqlen`` tokens at seeded random offsets (``random.seed(seed)``; offset
  ``randint(0, N - seqlen - 1)``).
- ``row_chunks`` (BlockPruner): draw ``nsamples`` *rows* with ``random.sample``, join them with "\\n\\n",
  tokenise once, cut non-overlapping ``seqlen`` chunks, drop the remainder. ``nsamples`` counts rows.
- ``shuffled_rows`` (SLEB's official ``get_trainloaders``): shuffle the rows as ``Dataset.shuffle(seed)``
  does, join the first ``nsamples`` *rows* with ``join``, tokenise once, cut non-overlapping ``seqlen``
  chunks, drop the remainder. ``nsamples`` counts rows (128 WikiText-2 rows give about 4 chunks of 2048
  tokens).
- ``line_blocks`` (DISP-LLM's official loader): encode each row on its own (blank rows too), concatenate
  groups of ``group_lines`` rows, cut blocks of ``seqlen + 1`` tokens (the +1 gives ``seqlen`` next-token
  targets) and drop a group's remainder; a group shorter than one block is kept, padded with ignored
  positions.

- ``document_windows`` (Shortened LLaMA's official ``get_examples``): ``random.seed(seed)``; draw a random row
  (document) until one of at least ``seqlen`` tokens not drawn before, encoded alone, then a window
  ``randint(0, len - seqlen)`` inside it; ``nsamples`` windows.

``pool`` narrows the rows first (``prune.data.sources.select_pool``): ``official`` is BlockPruner's 10% Alpaca
split, ``all`` every row.

A set is a tensor of token ids plus a mask of which *target* positions count in the loss; loss code always
predicts token t+1 from tokens ≤ t.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from prune.data.sources import load_rows, select_pool, shuffled_indices
from prune.data.tokens import encode_cached, tensor_hash
from prune.errors import PruneError

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Token windows for calibration.

    Attributes:
        input_ids: LongTensor[N, T].
        target_mask: BoolTensor[N, T]; position t counts as the target of position t-1 (position 0 never
            does).
        info: provenance: dataset, split, source, pool, style, nsamples, seqlen, seed, hash.
    """

    input_ids: torch.Tensor
    target_mask: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def limited(self, sequences: int | None = None, seqlen: int | None = None) -> CalibrationSet:
        """The first `sequences` windows cut to their first `seqlen` tokens (a CPU preset for searches that
        run the model once per candidate); the info records both limits and the new token hash."""
        if sequences is None and seqlen is None:
            return self
        ids = self.input_ids[:sequences, :seqlen]
        info = self.info | {"limited_to": {"sequences": len(ids), "seqlen": int(ids.shape[1])},
                            "tokens_hash": tensor_hash(ids)}
        return CalibrationSet(ids, self.target_mask[:sequences, :seqlen], info)


def build_calibration(
    tokenizer: Any,
    dataset: str = "wikitext2",
    split: str = "train",
    style: str = "random_windows",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    join: str = " ",
    group_lines: int = 50,
    source: str = "auto",
    preset: str | None = None,
    pool: str = "all",
) -> CalibrationSet:
    """Build the calibration set described by a ``conf/calib`` node (see the module docstring)."""
    if style not in BUILDERS:
        raise PruneError(f"unknown calibration style '{style}'; choose one of {', '.join(BUILDERS)}")
    rows, source_label = load_rows(dataset, split, source)
    rows, pool_label = select_pool(rows, dataset, pool)
    ids, mask = BUILDERS[style](tokenizer, rows, nsamples, seqlen, seed, join, group_lines)
    info = {
        "dataset": dataset, "split": split, "source": source_label, "pool": pool, "pool_rows": len(rows),
        "style": style, "nsamples": nsamples, "sequences": int(ids.shape[0]), "seqlen": seqlen, "seed": seed,
        "preset": preset, "tokens_hash": tensor_hash(ids),
    }
    log.info("calibration: %d x %d tokens of %s (%s, %s, pool %s: %s, %d rows)", ids.shape[0], ids.shape[1],
             dataset, style, source_label, pool, pool_label, len(rows))
    return CalibrationSet(ids, mask, info)


def _all_targets(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return mask


def _random_windows(tok: Any, rows: list[str], n: int, seqlen: int, seed: int, join: str, _g: int):
    ids = encode_cached(tok, join.join(rows))
    if len(ids) <= seqlen + 1:
        raise PruneError(f"calibration text has {len(ids)} tokens, fewer than seqlen={seqlen}; "
                         "lower calib.seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n)]
    windows = torch.stack([ids[s : s + seqlen] for s in starts])
    return windows, _all_targets(windows)


def _row_chunks(tok: Any, rows: list[str], n: int, seqlen: int, seed: int, _join: str, _g: int):
    _check_row_count(n, rows)
    return _chunks(encode_cached(tok, "\n\n".join(random.Random(seed).sample(rows, n))), n, seqlen)


def _shuffled_rows(tok: Any, rows: list[str], n: int, seqlen: int, seed: int, join: str, _g: int):
    # SLEB's get_trainloaders: traindata.shuffle(seed=seed), then "\n\n".join(traindata[:nsamples]['text']).
    _check_row_count(n, rows)
    first = shuffled_indices(len(rows), seed)[:n]
    return _chunks(encode_cached(tok, join.join(rows[i] for i in first)), n, seqlen)


def _document_windows(tok: Any, rows: list[str], n: int, seqlen: int, seed: int, _join: str, _g: int):
    # Shortened LLaMA's get_examples, with its tries bounded: a set without enough long rows fails, not hangs.
    rng, drawn, windows = random.Random(seed), set(), []
    for _ in range(n):
        for _try in range(100 * len(rows)):
            i = rng.randint(0, len(rows) - 1)
            ids = tok(rows[i])["input_ids"]
            if len(ids) >= seqlen and i not in drawn:
                break
        else:
            raise PruneError(f"only {len(windows)} of calib.nsamples={n} rows of >= {seqlen} tokens found; "
                             "lower calib.seqlen or calib.nsamples")
        drawn.add(i)
        start = rng.randint(0, len(ids) - seqlen)
        windows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
    stacked = torch.stack(windows)
    return stacked, _all_targets(stacked)


def _check_row_count(n: int, rows: list[str]) -> None:
    if n > len(rows):
        raise PruneError(f"calib.nsamples={n} rows requested but the pool has {len(rows)}; "
                         "lower calib.nsamples (or widen calib.pool / use the Hub copy)")


def _chunks(ids: torch.Tensor, n: int, seqlen: int):
    """Non-overlapping `seqlen` chunks of one token stream, remainder dropped (the official codes' cut)."""
    count = len(ids) // seqlen
    if count == 0:
        raise PruneError(f"{n} rows give {len(ids)} tokens, less than one {seqlen}-token chunk; "
                         "raise calib.nsamples")
    chunks = ids[: count * seqlen].view(count, seqlen)
    return chunks, _all_targets(chunks)


def _line_blocks(tok: Any, rows: list[str], n: int, seqlen: int, _seed: int, _join: str, group_lines: int):
    # NOTE(faithfulness): DISP's loader streams rows in order (no shuffling), so `seed` is unused here.
    # As its `group_tokens` does: every row is encoded (a blank row still gives its special tokens), a group
    # with at least one block drops its remainder, a group shorter than one block is kept whole and padded.
    block = seqlen + 1
    blocks: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for g in range(0, len(rows), group_lines):
        group = torch.cat([torch.tensor(tok(row)["input_ids"], dtype=torch.long)
                           for row in rows[g : g + group_lines]])
        for piece in _group_blocks(group, block):
            mask = torch.ones(block, dtype=torch.bool)
            mask[0] = False
            mask[len(piece) :] = False  # padded targets are ignored
            blocks.append(torch.cat([piece, piece.new_zeros(block - len(piece))]))
            masks.append(mask)
            if len(blocks) == n:
                return torch.stack(blocks), torch.stack(masks)
    if not blocks:
        raise PruneError("no calibration blocks could be built; check calib.dataset")
    return torch.stack(blocks), torch.stack(masks)


def _group_blocks(group: torch.Tensor, block: int) -> list[torch.Tensor]:
    if len(group) < block:
        return [group] if len(group) else []
    return list(group[: len(group) // block * block].split(block))


BUILDERS = {"random_windows": _random_windows, "row_chunks": _row_chunks, "shuffled_rows": _shuffled_rows,
            "document_windows": _document_windows, "line_blocks": _line_blocks}
