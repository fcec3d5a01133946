"""Quality flags: how a method says that it ran but did not do its job, and how the run reports it.

A short preset can stop a trained or searched method before it has converged; its perplexity is then a
figure of the budget, not of the method. A method that can tell raises a `Flag` in its plan
(``plan.info["quality_flags"]``, built with `raised`); the runner copies the list to ``results.json``
(``quality_flags``), the run's summary prints one warning line naming the fix (`warning_line`), and the tables
mark the row and explain the mark in a footnote (`mark`, `footnote`).

The vocabulary (one `Flag` each):

- ``untrained``: DISP-LLM's sampled masks ended away from the target ratio (``plan.info.reached_target``
  false): the budget threshold met the ratio by ranking logits that had barely moved.
- ``unsettled``: ELDeR's stage-1 ranking had not settled: in some round the layers it masked were not the
  smallest scales throughout the round's second half, or not by more than the scales still moved over it.
- ``few_tokens``: a greedy search (BlockPruner, SLEB) scored its candidates on fewer calibration tokens than
  the method's documented minimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MARK = "†"  # the table mark; the flag's name follows it


@dataclass(frozen=True)
class Flag:
    """One way a method can fail to do its job. ``meaning`` is the footnote's text."""

    name: str
    meaning: str

    @property
    def mark(self) -> str:
        return f"{MARK}{self.name}"


UNTRAINED = Flag("untrained", "the hypernetwork's sampled masks ended away from the target ratio (DISP-LLM "
                              "not trained to it; the final widths are mostly the budget threshold's doing)")
UNSETTLED = Flag("unsettled", "stage 1's layer ranking had not settled (ELDeR: in some round the masked "
                              "layers were not the smallest scales by more than the scales still moved)")
FEW_TOKENS = Flag("few_tokens", "the search scored its candidates on fewer calibration tokens than the "
                                "method's documented minimum")
FLAGS = {flag.name: flag for flag in (UNTRAINED, UNSETTLED, FEW_TOKENS)}


def raised(flag: Flag, detail: str, fix: str) -> dict[str, str]:
    """One raised flag as the plan and ``results.json`` record it: the flag's name, what was measured
    (``detail``) and the override that gives a converged result with its cost (``fix``)."""
    return {"flag": flag.name, "detail": detail, "fix": fix}


def flags_of(record: dict[str, Any] | None) -> list[dict[str, str]]:
    """The flags a ``results.json`` record carries (none for records written before flags existed)."""
    if not record:
        return []
    return list(record.get("quality_flags") or [])


def warning_line(flags: list[dict[str, str]]) -> str | None:
    """The summary's one warning line for a flagged run (None: nothing flagged)."""
    if not flags:
        return None
    what = "; ".join(f"{f['flag']}: {f['detail']}" for f in flags)
    fixes = "; ".join(dict.fromkeys(f["fix"] for f in flags))
    return f"warning: not a converged result ({what}); fix: {fixes}"


def mark(record: dict[str, Any] | None) -> str:
    """The table mark of a record's flags, e.g. ``†untrained`` (empty when it carries none)."""
    return " ".join(FLAGS[name].mark if name in FLAGS else f"{MARK}{name}"
                    for name in dict.fromkeys(f["flag"] for f in flags_of(record)))


def footnote(records: list[dict[str, Any]]) -> str | None:
    """The footnote that explains the marks of these records' flags (None: none is flagged)."""
    names = list(dict.fromkeys(f["flag"] for r in records for f in flags_of(r)))
    if not names:
        return None
    parts = [f"`{FLAGS[n].mark}`: {FLAGS[n].meaning}" if n in FLAGS else f"`{MARK}{n}`" for n in names]
    return ("Marked rows did not converge within their budget, so their figures describe the budget, not "
            "the method: " + "; ".join(parts) + ". The cell's `results.json` (`quality_flags`) names the "
            "override that fixes it.")
