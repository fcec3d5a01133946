"""Peak memory of a block of code: the one helper the package uses for it.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights
included). On CPU there are two ways to take it, and each caller keeps the one its numbers were always
reported with:

- `RSS_SAMPLED` (the runner, around pruning): the process's resident set size, sampled by a background
  thread every ``interval_s`` seconds; an absolute figure that includes the weights.
- `MAX_RSS_INCREASE` (the speed evaluator): the growth of the process's max RSS (``ru_maxrss``) while the
  block ran; it leaves out the weights and is 0 when an earlier peak (loading, calibration) was higher.

The ``kind`` label of each pair (device, CPU way) is stored in results files (``metric_config["mem"]``,
the speed evaluator's ``describe()``), so the labels below must not change.

    with PeakMemory() as peak:
        ...
    peak.peak_gb, peak.kind
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Literal

import torch

GIB = float(2**30)

CpuWay = Literal["rss_sampled", "max_rss_increase"]
RSS_SAMPLED: CpuWay = "rss_sampled"
MAX_RSS_INCREASE: CpuWay = "max_rss_increase"

# (label on CUDA, label on CPU) for each CPU way; the two callers have always labelled CUDA differently.
_KIND_LABELS: dict[str, tuple[str, str]] = {
    RSS_SAMPLED: ("cuda_max_allocated", "cpu_rss_sampled"),
    MAX_RSS_INCREASE: ("cuda max_memory_allocated (GiB, weights included)",
                       "cpu ru_maxrss increase during measurement (GiB, weights excluded)"),
}


def rss_bytes() -> int:
    """The process's resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """The process's highest resident set size so far."""
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class PeakMemory:
    """Peak memory (GiB = 2**30 bytes) between `start` and `stop`, or over a ``with`` block.

    ``device`` defaults to CUDA when available, else CPU; ``cpu`` picks how a CPU peak is taken (see the
    module docstring). After `stop`, ``peak_gb`` holds the figure; ``kind`` says what it measures.
    """

    def __init__(self, device: torch.device | str | None = None, cpu: CpuWay = RSS_SAMPLED,
                 interval_s: float = 0.05) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.cpu = cpu
        self.interval_s = interval_s
        self.peak_gb = 0.0
        self._max_rss0 = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        on_cuda, on_cpu = _KIND_LABELS[self.cpu]
        return on_cuda if self._on_cuda else on_cpu

    @property
    def _on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> PeakMemory:
        self.peak_gb = 0.0
        if self._on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu == MAX_RSS_INCREASE:
            self._max_rss0 = max_rss_bytes()
        elif os.path.exists("/proc/self/statm"):  # elsewhere the sampled peak stays 0
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> float:
        """End the measurement; returns (and keeps in ``peak_gb``) the peak in GiB."""
        if self._on_cuda:
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / GIB
        elif self.cpu == MAX_RSS_INCREASE:
            self.peak_gb = (max_rss_bytes() - self._max_rss0) / GIB
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak_gb

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_gb = max(self.peak_gb, rss_bytes() / GIB)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
