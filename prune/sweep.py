"""A sweep that meets bad input in one cell runs its other cells and fails at the end.

A single run turns a `PruneError` into one ``error:`` line and exit status 2. In a multirun (``-m``) that exit
would end the whole grid at the first bad cell (for example DISP's 20% of all parameters on a model where it
cannot be reached), and the cells after it would never run. Instead the failed cell, whatever the cause (bad
input, or an unexpected exception, whose traceback still goes to stderr), writes ``error.txt`` in
its own directory, in place of ``results.json``, and the sweep goes on; when the sweep ends, `FailedCells`
prints one line naming the failed cells and exits with status 2; `prune.tables` lists them (`failed_cells`)
under the table, and its per-cell progress line says FAILED. The file lives next to the cell's results,
so it works for any launcher whose cells share the output file system (checked: basic, submitit_local).

`Progress` is the other sweep callback (``hydra.callbacks.progress`` in the experiment configs): one line per
cell, ``[k/N] <cell>: done in 12 s | skipped (results.json exists) | FAILED (...)``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prune.errors import PruneError

ERROR_FILE = "error.txt"


def record_failure(run_dir: Path, err: Exception) -> None:
    """Leave the cell's one-line error where its results.json would be: a `PruneError`'s message, or for
    any other exception (a bug, whose traceback went to stderr) its type and first line."""
    if isinstance(err, PruneError):
        line = str(err)
    else:
        first = (str(err).strip().splitlines() or [""])[0]
        line = f"unexpected {type(err).__name__}: {first} (a bug; its traceback is in the sweep's stderr)"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(f"error: {' '.join(line.splitlines())}\n")


def clear_failure(run_dir: Path) -> None:
    """A cell that runs again starts without the error of an earlier try."""
    (run_dir / ERROR_FILE).unlink(missing_ok=True)


def failed_cells(sweep_dir: Path, since: float = 0.0) -> dict[str, str]:
    """{cell directory name: its error line} for the cells of `sweep_dir` whose ``error.txt`` was written at
    or after `since` (a time.time() value; 0: all of them)."""
    errors = sorted(sweep_dir.glob(f"*/{ERROR_FILE}"))
    return {p.parent.name: p.read_text().strip() for p in errors if p.stat().st_mtime >= since}


class FailedCells(Callback):
    """Hydra callback: after a multirun, one ``error:`` line for the cells that failed, and exit status 2."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_cells(sweep_dir, since=self.started)  # older files belong to earlier sweeps
        if failed:
            print(f"error: {len(failed)} sweep cell(s) failed, see their error lines above or "
                  f"{sweep_dir}/<cell>/{ERROR_FILE}; fix the input and rerun (finished cells are skipped): "
                  + "; ".join(failed), file=sys.stderr)
            sys.exit(2)


class Progress(Callback):
    """A Hydra callback: one line per sweep cell, ``[k/N] <cell>: done in 12 s`` (or skipped / FAILED)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self._start = 0.0
        self._finished_before = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from prune.tables.grid import grid_cells, sweep_grid  # the grid as the tables rebuild it

        self.total = len(grid_cells(sweep_grid(config, list(config.hydra.overrides.task))))

    def _name(self, config: DictConfig) -> str:
        job = config.hydra.job
        return f"[{job.get('num', 0) + 1}/{self.total or '?'}] {job.override_dirname}"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        self._finished_before = (Path(config.hydra.runtime.output_dir) / "results.json").exists()
        state = "finished before" if self._finished_before else "running"
        print(f"{self._name(config)}: {state}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        took = time.perf_counter() - self._start
        print(f"{self._name(config)}: {self._status(config, job_return)} in {took:.0f} s", flush=True)

    def _status(self, config: DictConfig, job_return: Any) -> str:
        from hydra.core.utils import JobStatus

        error = Path(config.hydra.runtime.output_dir) / ERROR_FILE  # bad input (record_failure)
        if job_return.status != JobStatus.COMPLETED:
            return f"FAILED ({job_return._return_value!r})"
        if error.exists():
            return f"FAILED ({error.read_text().strip()})"
        if self._finished_before and not config.get("force"):
            return "skipped (results.json exists)"
        return "done"
