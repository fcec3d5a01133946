"""Raw text rows of each dataset, from the Hugging Face Hub when reachable, else from bundled files.

Every loader returns ``(rows, source)`` where ``source`` says which copy was used; runs log it.
``select_pool`` then narrows the rows to the pool a method's official code draws from (BlockPruner's 10%
Alpaca split), with the index arithmetic of the `datasets` calls that code makes (``train_test_split``,
``shuffle``), so the Hub and the bundled copy are treated alike.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import socket
from collections.abc import Callable

import numpy as np

from prune.errors import PruneError
from prune.paths import bundled

log = logging.getLogger(__name__)

# The Stanford Alpaca prompt template; HF `tatsu-lab/alpaca`'s `text` column is this template filled in.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


@functools.cache
def hub_reachable() -> bool:
    """True when the Hugging Face Hub answers within 3 s and offline mode is not forced."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _lines(relative: str) -> list[str]:
    path = bundled(relative)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines(keepends=True)


def _wikitext_rows(relative: str) -> list[str]:
    # HF `wikitext-2-raw-v1` rows are the file's lines with "\n" kept and blank lines turned into "".
    return [line if line.strip() else "" for line in _lines(relative)]


def _jsonl_texts(relative: str) -> list[str]:
    return [json.loads(line)["text"] for line in _lines(relative)]


def _alpaca_rows() -> list[str]:
    records = json.loads(bundled("alpaca/alpaca_data_1k.json").read_text(encoding="utf-8"))
    return [(ALPACA_WITH_INPUT if r["input"] else ALPACA_NO_INPUT).format(**r) for r in records]


# (dataset, split) -> (bundled loader, source label). WikiText-2 train is not bundled: validation stands in.
BUNDLED: dict[tuple[str, str], tuple[Callable[[], list[str]], str]] = {
    ("wikitext2", "test"): (lambda: _wikitext_rows("wikitext-2-raw/wiki.test.raw"), "bundled:wikitext2-test"),
    ("wikitext2", "validation"): (
        lambda: _wikitext_rows("wikitext-2-raw/wiki.valid.raw"), "bundled:wikitext2-validation"),
    ("wikitext2", "train"): (
        lambda: _wikitext_rows("wikitext-2-raw/wiki.valid.raw"),
        "bundled:wikitext2-validation (offline substitute for the train split)"),
    ("ptb", "train"): (lambda: [s.strip() for s in _lines("ptb/ptb.train.txt.gz")], "bundled:ptb-train"),
    ("ptb", "validation"): (lambda: [s.strip() for s in _lines("ptb/ptb.valid.txt")],
                            "bundled:ptb-validation"),
    ("ptb", "test"): (lambda: [s.strip() for s in _lines("ptb/ptb.test.txt")], "bundled:ptb-test"),
    ("c4", "train"): (
        lambda: _jsonl_texts("c4/c4-train.00000-of-01024.first1000.redpajama.jsonl.gz"),
        "bundled:c4-train-shard0-first1000"),
    ("c4", "validation"): (
        lambda: _jsonl_texts("c4/c4-validation.subset2000.jsonl.gz"), "bundled:c4-validation-subset2000"),
    ("alpaca", "train"): (_alpaca_rows, "bundled:alpaca-1k-sample"),
}


def _hub_rows(dataset: str, split: str) -> list[str]:
    from datasets import load_dataset  # heavy import, only when the Hub is used

    if dataset == "wikitext2":
        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    if dataset == "ptb":
        return list(load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])
    if dataset == "c4":
        train, validation = "en/c4-train.00000-of-01024.json.gz", "en/c4-validation.00000-of-00008.json.gz"
        shard = train if split == "train" else validation
        return list(load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"])
    if dataset == "alpaca":
        return list(load_dataset("tatsu-lab/alpaca", split=split)["text"])
    raise PruneError(f"unknown dataset '{dataset}'; known: wikitext2, ptb, c4, alpaca")


def load_rows(dataset: str, split: str, source: str = "auto") -> tuple[list[str], str]:
    """Rows of `dataset`/`split` and a label of the copy used.

    Args:
        dataset: ``wikitext2`` | ``ptb`` | ``c4`` | ``alpaca``.
        split: ``train`` | ``validation`` | ``test``.
        source: ``hub`` | ``bundled`` | ``auto`` (Hub when reachable, else bundled).
    """
    if (dataset, split) not in BUNDLED:
        known = sorted({d for d, _ in BUNDLED})
        raise PruneError(f"unknown dataset/split '{dataset}/{split}'; datasets: {', '.join(known)}")
    if source == "hub" or (source == "auto" and hub_reachable()):
        try:
            return _hub_rows(dataset, split), f"hub:{dataset}/{split}"
        except Exception as err:  # noqa: BLE001 - any Hub failure falls back to the bundled copy
            if source == "hub":
                raise PruneError(f"could not load {dataset}/{split} from the Hub ({err}); "
                                 "use data source=bundled")
            log.warning("Hub load of %s/%s failed (%s); using the bundled copy", dataset, split, err)
    loader, label = BUNDLED[(dataset, split)]
    return loader(), label


def shuffled_indices(count: int, seed: int) -> list[int]:
    """The row order of `datasets`' ``Dataset.shuffle(seed=seed)`` on `count` rows (a PCG64 permutation)."""
    return np.random.default_rng(seed).permutation(count).tolist()


def train_test_split_indices(count: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """The (train, test) row indices, in order, of `datasets`' ``train_test_split(test_size, seed=seed)``.

    `datasets` takes ``ceil(test_size * count)`` test rows from the front of the seeded permutation and the
    train rows right after them.
    """
    n_test = math.ceil(test_size * count)
    permutation = shuffled_indices(count, seed)
    return permutation[n_test:], permutation[:n_test]


def blockpruner_pool_indices(count: int) -> list[int]:
    """The rows BlockPruner's official code samples Alpaca calibration from, in that code's order.

    ``utils.get_dataset``: split 80/20 (seed 42), split the 20% again 50/50 (seed 42) and keep the *train*
    half of the second split as its "test" set, about 10% of the records.
    """
    _, held_out = train_test_split_indices(count, 0.2, 42)
    second_train, _ = train_test_split_indices(len(held_out), 0.5, 42)
    return [held_out[i] for i in second_train]


# pool name -> (datasets it applies to, row indices of a dataset of n rows, description for the log)
POOLS: dict[str, tuple[frozenset[str] | None, Callable[[int], list[int]], str]] = {
    "all": (None, lambda n: list(range(n)), "all rows"),
    "official": (frozenset({"alpaca"}), blockpruner_pool_indices,
                 "BlockPruner's official 10% split (80/20 then 50/50, seed 42, train half)"),
}


def select_pool(rows: list[str], dataset: str, pool: str) -> tuple[list[str], str]:
    """The rows of `pool` (``all`` or ``official``) and a description of it for the log.

    Raises:
        PruneError: an unknown pool, or a pool that `dataset` has no definition for.
    """
    if pool not in POOLS:
        raise PruneError(f"calib.pool={pool} is not a pool; choose one of {', '.join(POOLS)}")
    datasets, indices, description = POOLS[pool]
    if datasets is not None and dataset not in datasets:
        raise PruneError(f"calib.pool={pool} is defined for {', '.join(sorted(datasets))} only; "
                         "use calib.pool=all")
    return [rows[i] for i in indices(len(rows))], description
