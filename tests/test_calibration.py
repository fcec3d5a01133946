"""Calibration draws as the official codes draw them: BlockPruner's Alpaca split, SLEB's shuffled rows, DISP's
line blocks (docs/fidelity.md#calibration)."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch

from prune.data import calibration
from prune.data.calibration import build_calibration
from prune.data.sources import (
    blockpruner_pool_indices,
    load_rows,
    select_pool,
    shuffled_indices,
    train_test_split_indices,
)
from prune.errors import PruneError
from tests.conftest import compose_config

# Computed once with the `datasets` calls of BlockPruner's utils.get_dataset (datasets 5.2.0):
#   ds = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=0.2, seed=42)
#   list(ds.pop("test").train_test_split(test_size=0.5, seed=42)["train"]["i"])
OFFICIAL_POOL_1000 = [
    630, 708, 98, 931, 771, 55, 445, 671, 66, 96, 867, 498, 950, 83, 426, 797, 806, 638, 425, 340,
    995, 545, 781, 891, 592, 756, 544, 751, 238, 724, 750, 179, 218, 726, 629, 674, 635, 125, 551, 454,
    933, 773, 79, 276, 146, 623, 343, 892, 605, 439, 746, 435, 896, 710, 881, 972, 703, 941, 673, 427,
    408, 991, 620, 315, 554, 701, 166, 898, 557, 467, 613, 224, 848, 51, 993, 921, 664, 25, 856, 152,
    853, 900, 433, 945, 990, 82, 61, 193, 151, 595, 230, 150, 86, 285, 143, 6, 45, 434, 268, 996,
]
# The Hub's tatsu-lab/alpaca has 52,002 records: 5,200 in the pool; sha256 of json.dumps(the index list).
OFFICIAL_POOL_52002 = {"length": 5200, "first": [41912, 27554, 46984, 14706, 13908, 35315, 30242, 51272],
                       "last": [45695, 37785, 24230], "sha256_16": "f39f5f9313aa11a9"}
# list(Dataset.from_dict({"i": list(range(20))}).shuffle(seed=0)["i"])
SHUFFLE_20_SEED_0 = [4, 19, 6, 2, 13, 16, 3, 11, 10, 8, 0, 12, 7, 5, 18, 17, 14, 9, 1, 15]


class CharTokenizer:
    """One token per character (its code point): token streams can be written down by hand."""

    name_or_path = "chars"

    def __call__(self, text: str, return_attention_mask: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def chars(ids: torch.Tensor) -> list[str]:
    return ["".join(map(chr, row.tolist())) for row in ids]


@pytest.fixture
def rows_of(monkeypatch: pytest.MonkeyPatch):
    """Make build_calibration read the given rows instead of a dataset."""
    def use(rows: list[str]) -> None:
        monkeypatch.setattr(calibration, "load_rows", lambda dataset, split, source: (rows, "test:rows"))
    return use


def test_official_alpaca_pool_matches_datasets_split() -> None:
    assert blockpruner_pool_indices(1000) == OFFICIAL_POOL_1000
    pool = blockpruner_pool_indices(52002)
    assert len(pool) == OFFICIAL_POOL_52002["length"]
    assert pool[:8] == OFFICIAL_POOL_52002["first"] and pool[-3:] == OFFICIAL_POOL_52002["last"]
    assert hashlib.sha256(json.dumps(pool).encode()).hexdigest()[:16] == OFFICIAL_POOL_52002["sha256_16"]


def test_split_and_shuffle_follow_datasets() -> None:
    assert shuffled_indices(20, 0) == SHUFFLE_20_SEED_0
    train, test = train_test_split_indices(20, 0.25, 0)
    assert test == SHUFFLE_20_SEED_0[:5] and train == SHUFFLE_20_SEED_0[5:]  # ceil(0.25 * 20) test rows first


def test_alpaca_draw_is_the_official_draw() -> None:
    """pool=official + row_chunks = BlockPruner's block_search.main: set_seed(42), then
    random.sample(range(len(test_dataset)), n) over the split, "\\n\\n"-joined, cut into chunks."""
    calib = build_calibration(CharTokenizer(), dataset="alpaca", style="row_chunks", nsamples=8, seqlen=256,
                              seed=42, source="bundled", pool="official")
    rows, _ = load_rows("alpaca", "train", "bundled")
    random.seed(42)
    drawn = [rows[OFFICIAL_POOL_1000[i]] for i in random.sample(range(len(OFFICIAL_POOL_1000)), 8)]
    stream = [ord(c) for c in "\n\n".join(drawn)]
    count = len(stream) // 256
    assert calib.input_ids.tolist() == torch.tensor(stream[: count * 256]).view(count, 256).tolist()
    assert calib.info["pool"] == "official" and calib.info["pool_rows"] == 100


def test_pool_all_keeps_every_row() -> None:
    rows = [f"r{i}" for i in range(7)]
    assert select_pool(rows, "wikitext2", "all")[0] == rows


@pytest.mark.parametrize(("dataset", "pool"), [("wikitext2", "official"), ("alpaca", "nope")])
def test_bad_pool_is_a_user_error(dataset: str, pool: str) -> None:
    with pytest.raises(PruneError, match="calib.pool"):
        select_pool(["a", "b"], dataset, pool)


def test_shuffled_rows_hand_computed(rows_of) -> None:
    """SLEB's get_trainloaders: shuffle(seed=0) of 5 rows is [2, 4, 3, 0, 1]; the first 3 rows joined by
    "\\n\\n" are "r2\\n\\nr4\\n\\nr3" (10 tokens); 4-token windows: two, the last 2 tokens dropped."""
    rows_of(["r0", "r1", "r2", "r3", "r4"])
    assert shuffled_indices(5, 0) == [2, 4, 3, 0, 1]
    calib = build_calibration(CharTokenizer(), style="shuffled_rows", nsamples=3, seqlen=4, seed=0,
                              join="\n\n")
    assert chars(calib.input_ids) == ["r2\n\n", "r4\n\n"]
    assert calib.target_mask.tolist() == [[False, True, True, True]] * 2
    assert calib.info["style"] == "shuffled_rows" and calib.info["sequences"] == 2


def test_shuffled_rows_needs_enough_rows(rows_of) -> None:
    rows_of(["a", "b"])
    with pytest.raises(PruneError, match="calib.nsamples=3 rows"):
        build_calibration(CharTokenizer(), style="shuffled_rows", nsamples=3, seqlen=2, join="\n\n")


def test_line_blocks_hand_computed(rows_of) -> None:
    """DISP's group_tokens, groups of 2 rows, blocks of seqlen + 1 = 3: group 1 "abcd" + "" (a blank row still
    counts in its group) -> "abc", "d" dropped; group 2 "ef" + "ghi" -> "efg", "hi" dropped; group 3 "j" is
    shorter than a block -> kept, padded, its padded targets ignored."""
    rows_of(["abcd", "", "ef", "ghi", "j"])
    calib = build_calibration(CharTokenizer(), style="line_blocks", nsamples=10, seqlen=2, group_lines=2)
    assert chars(calib.input_ids) == ["abc", "efg", "j\0\0"]
    assert calib.target_mask.tolist() == [[False, True, True], [False, True, True], [False, False, False]]


def test_calib_configs_name_their_pool_and_style() -> None:
    alpaca = compose_config("calib=alpaca").calib
    assert (alpaca.pool, alpaca.style) == ("official", "row_chunks")
    rows = compose_config("calib=wikitext2_rows").calib
    assert (rows.style, rows.join, rows.nsamples, rows.pool) == ("shuffled_rows", "\n\n", 128, "all")
    assert compose_config("calib=wikitext2").calib.style == "random_windows"  # SLEB's paper stays the default


def test_document_windows_follow_get_examples(rows_of) -> None:
    """Shortened LLaMA's get_examples: random.seed(seed); a random row until one of >= seqlen tokens not drawn
    before; a window randint(0, len - seqlen) inside it."""
    rows = ["ab", "abcdef", "xyz", "0123456789", "q"]
    rows_of(rows)
    calib = build_calibration(CharTokenizer(), style="document_windows", nsamples=2, seqlen=3, seed=1234)
    rng, drawn, expected = random.Random(1234), set(), []
    while len(expected) < 2:
        i = rng.randint(0, len(rows) - 1)
        if len(rows[i]) >= 3 and i not in drawn:
            drawn.add(i)
            start = rng.randint(0, len(rows[i]) - 3)
            expected.append(rows[i][start : start + 3])
    assert chars(calib.input_ids) == expected == ["123", "xyz"]  # rows 3 then 2 (0, 4 too short on the way)
    with pytest.raises(PruneError, match="lower calib.seqlen"):
        build_calibration(CharTokenizer(), style="document_windows", nsamples=4, seqlen=3)
