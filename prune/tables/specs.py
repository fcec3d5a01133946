"""What each paper table shows: its title, its columns (a ``results.json`` metric, its display unit and
digits) and the bar charts of its W&B report. ``experiments/<table>/expected.csv`` names these metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prune.errors import PruneError


@dataclass(frozen=True)
class Column:
    """One table column: a metric of ``results.json`` times ``scale``, shown with ``digits`` decimals."""

    label: str
    key: str
    scale: float = 1.0
    digits: int = 2


@dataclass(frozen=True)
class TableSpec:
    """A table: its title, its columns, and the W&B report's bar charts ``(summary metric, title)``."""

    title: str
    columns: tuple[Column, ...]
    bars: tuple[tuple[str, str], ...] = (("ppl/wikitext2", "WikiText-2 perplexity"),
                                         ("zs/mean", "zero-shot mean"))


REMOVED = Column("removed %", "params/removed_frac", 100)
PPL = Column("PPL", "ppl/wikitext2")
PPL4096 = Column("PPL seq4096", "ppl/wikitext2/seq4096")  # DISP-LLM's convention (paper scale computes both)
TASKS = tuple(Column(label, f"zs/{task}/{metric}", 100) for label, task, metric in [
    ("PIQA", "piqa", "acc_norm"), ("Wino", "winogrande", "acc"), ("HS", "hellaswag", "acc_norm"),
    ("ARC-e", "arc_easy", "acc_norm"), ("ARC-c", "arc_challenge", "acc_norm")])
AVG = Column("Avg", "zs/mean", 100)
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
# Half-width of the 95% interval of the zero-shot mean over the items evaluated, in points: no paper reports
# it, and at a CPU preset's 100 items per task it is ~4 points, the size of many differences between methods.
AVG_MARGIN = Column("±95%", "zs/mean_stderr", 100 * Z95, digits=1)

TABLES: dict[str, TableSpec] = {
    "table1": TableSpec("Table 1: main comparison at about 21% (WikiText-2 PPL, zero-shot accuracy %)",
                        (REMOVED, PPL, PPL4096, *TASKS, AVG, AVG_MARGIN)),
    "table2": TableSpec(
        "Table 2: efficiency at 20% and 50% (perplexity, zero-shot mean, speed, pruning cost)",
        (REMOVED, PPL, PPL4096, Column("ZS avg", "zs/mean", 100), AVG_MARGIN,
         Column("tok/s", "speed/throughput_tok_s", digits=1),
         Column("latency ms", "speed/prefill_ms", digits=1), Column("decode ms", "speed/decode_ms", digits=1),
         Column("throughput x", "speed/throughput_speedup"), Column("latency x", "speed/prefill_speedup"),
         Column("decode x", "speed/decode_speedup"), Column("ideal x", "speed/ideal_speedup"),
         Column("prune s", "time/prune_s", digits=1), Column("prune GB", "mem/prune_peak_gb"),
         Column("GPU-h", "cost/gpu_hours", digits=3)),
        bars=(("ppl/wikitext2", "WikiText-2 perplexity"), ("zs/mean", "zero-shot mean"),
              ("speed/throughput_speedup", "throughput speed-up"),
              ("speed/prefill_speedup", "latency speed-up"), ("speed/ideal_speedup", "ideal speed-up"),
              ("time/prune_s", "pruning time (s)"))),
    # Two units side by side, never mixed: zeros among the decoder linears (sparse methods) and parameters
    # removed (structural methods, 0 for sparse ones); the speed-ups are measured, the ideal one counts
    # parameters (1.0 for a sparse model).
    "sparse_vs_structured": TableSpec(
        "Sparse vs structured at 50% (WikiText-2 PPL both conventions, zero-shot %, sparsity, speed, cost)",
        (REMOVED, Column("zeroed % (linears)", "sparsity/linear", 100),
         Column("nonzero % (all)", "params/nonzero_frac", 100), PPL, PPL4096,
         Column("ZS avg", "zs/mean", 100), AVG_MARGIN, Column("latency x", "speed/prefill_speedup"),
         Column("throughput x", "speed/throughput_speedup"), Column("ideal x", "speed/ideal_speedup"),
         Column("prune s", "time/prune_s", digits=1))),
    "rft": TableSpec(
        "Recovery fine-tuning at 25% of layers: without and with LoRA (TRSP recipe), ELDeR without RFT",
        (REMOVED, PPL, Column("PPL pre-RFT", "pre_rft/ppl/wikitext2"), AVG,
         Column("Avg pre-RFT", "pre_rft/zs/mean", 100), AVG_MARGIN,
         Column("RFT s", "time/rft_s", digits=1), Column("RFT GB", "mem/rft_peak_gb"),
         Column("RFT tokens", "rft/tokens", digits=0), Column("RFT GPU-h", "time/rft_gpu_h", digits=3),
         Column("prune s", "time/prune_s", digits=1)),
        bars=(("ppl/wikitext2", "WikiText-2 perplexity"), ("zs/mean", "zero-shot mean"),
              ("time/rft_s", "RFT time (s)"))),
    "blockpruner_table2": TableSpec("BlockPruner Table 2: ablation (full, - search, - block)",
                                    (REMOVED, PPL, AVG, AVG_MARGIN,
                                     Column("layers removed", "layers/removed", digits=0))),
}


def spec_of(table: str) -> TableSpec:
    """The spec of a table by name; an unknown name is the user's error, listing the tables there are."""
    if table not in TABLES:
        raise PruneError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    return TABLES[table]
