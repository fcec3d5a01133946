"""Zero-shot accuracy with lm-evaluation-harness 0.4.x, on the in-memory model (no save / reload).

Metric keys: ``zs/<task>/acc``, ``zs/<task>/acc_norm`` (where the task has it) and ``zs/mean``, all fractions
in [0, 1]. ``zs/mean`` follows the seed papers (BlockPruner, SLEB, TRSP, DISP-LLM): the unweighted mean over
the tasks run of acc_norm where the task has it (PIQA, HellaSwag, ARC-e, ARC-c, OpenBookQA) and acc otherwise
(WinoGrande, BoolQ, LAMBADA).

With each accuracy comes its standard error over the items evaluated (``zs/<task>/<metric>_stderr``,
``zs/mean_stderr``) and the item count (``zs/<task>/n``): the papers report none, and at the CPU preset's
100 items per task the 95% margin of ``zs/mean`` is about 4 points, larger than many differences between
methods.

Two copies of the task data:

- ``hub``: lm-eval's stock tasks, which download their datasets from the Hugging Face Hub.
- ``bundled``: the task YAMLs in ``prune/eval/tasks/`` (``bundled_<task>``) over the files shipped in
  ``prune/data/files/tasks/``. Each is the stock YAML with only the data source swapped, so prompts, choices,
  targets and metrics are the stock ones; HellaSwag's prompt text is a close reconstruction (see the README
  there). Metric keys use the public task name either way.

``auto`` picks ``hub`` when the Hub answers, else ``bundled``, and logs which and why.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from prune.errors import PruneError
from prune.options import Options, bounded

log = logging.getLogger("prune.eval.zeroshot")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
SOURCES = ("hub", "bundled", "auto")
# lm-eval batch size of ``batch_size=auto`` on a CPU, where lm-eval's own search (made for GPU memory) settles
# on its 64-item ceiling. Chosen with `prune.bench.zeroshot` (embedded model, PIQA; docs/benchmarks.md).
# Accuracy does not depend on the batch size (tests/test_zeroshot.py).
CPU_BATCH_SIZE = 32
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class TaskSpec:
    """How one public task name maps onto lm-eval.

    Attributes:
        stock: lm-eval's stock task name (``source="hub"``).
        primary: the metric that enters ``zs/mean``.
        metrics: the metrics reported as ``zs/<task>/<metric>``.
    """

    stock: str
    primary: str
    metrics: tuple[str, ...]

    @property
    def bundled(self) -> str:
        """The task name of the bundled copy (a YAML in ``prune/eval/tasks/``)."""
        return f"bundled_{self.stock}"

    def lm_eval_name(self, source: str) -> str:
        """The lm-eval task name to run for a resolved source (``hub`` or ``bundled``)."""
        return self.bundled if source == "bundled" else self.stock


_MC = ("acc", "acc_norm")
TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa", "acc_norm", _MC),
    "winogrande": TaskSpec("winogrande", "acc", ("acc",)),
    "hellaswag": TaskSpec("hellaswag", "acc_norm", _MC),
    "arc_easy": TaskSpec("arc_easy", "acc_norm", _MC),
    "arc_challenge": TaskSpec("arc_challenge", "acc_norm", _MC),
    "openbookqa": TaskSpec("openbookqa", "acc_norm", _MC),
    "boolq": TaskSpec("boolq", "acc", ("acc",)),
    "lambada_openai": TaskSpec("lambada_openai", "acc", ("acc",)),
    # Short alias: the metric keys keep the name the caller used (zs/lambada/acc).
    "lambada": TaskSpec("lambada_openai", "acc", ("acc",)),
}


def lm_eval_version() -> str:
    """The installed lm-eval version, e.g. ``"0.4.13"``."""
    from importlib.metadata import version

    return version("lm_eval")


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face Hub can't be used, or ``None`` when it answers.

    The offline variables win over the network check so that ``HF_HUB_OFFLINE=1`` never waits on a timeout.
    The network check is the project's shared one (a 3 s connect to huggingface.co, cached per process).
    """
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var} is set"
    from prune.data.sources import hub_reachable

    return None if hub_reachable() else "huggingface.co is not reachable (3 s connection check)"


def resolve_source(source: str) -> str:
    """Turn ``auto`` into ``hub`` or ``bundled`` (logging the choice); pass the others through.

    Args:
        source: ``hub`` | ``bundled`` | ``auto``.

    Returns:
        ``hub`` or ``bundled``.
    """
    if source != "auto":
        return source
    reason = hub_unreachable_reason()
    if reason is None:
        log.info("zero-shot tasks: source=hub (the Hugging Face Hub is reachable)")
        return "hub"
    log.info("zero-shot tasks: source=bundled (%s; using the task data in prune/data/files/tasks)", reason)
    return "bundled"


def primary_metric(task: str) -> str:
    """The metric of ``task`` that enters ``zs/mean`` (acc_norm where the task has it, else acc)."""
    return TASKS[task].primary


def mean_score(metrics: dict[str, float], tasks: Sequence[str]) -> float:
    """Unweighted mean over ``tasks`` of each task's primary metric in a flat ``zs/...`` dict."""
    return sum(metrics[f"zs/{t}/{primary_metric(t)}"] for t in tasks) / len(tasks)


def accuracy_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy over ``n`` items: sqrt(p(1 - p) / (n - 1)).

    This is lm-eval's own ``mean_stderr`` of a 0/1 metric (sample standard deviation over sqrt(n)), so the
    figure equals what the harness reports when run with bootstrap; here it costs no extra pass.
    """
    return math.sqrt(accuracy * (1.0 - accuracy) / (n - 1))


def mean_stderr(metrics: dict[str, float], tasks: Sequence[str]) -> float:
    """Standard error of :func:`mean_score`: the tasks' items are disjoint, so their errors add in
    quadrature."""
    return math.sqrt(sum(metrics[f"zs/{t}/{primary_metric(t)}_stderr"] ** 2 for t in tasks)) / len(tasks)


@contextlib.contextmanager
def _preserved_rng_state() -> Iterator[None]:
    """Restore the python / numpy / torch RNGs afterwards: ``simple_evaluate`` reseeds all three globally,
    which would otherwise change whatever the run draws after an evaluation."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _DropCustomDatasetHint(logging.Filter):
    """Drops lm-eval's per-task hint about passing ``--metadata`` to a ``custom_dataset``: it is logged for
    every bundled task (they load their file through ``custom_dataset``) and needs no action here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def quiet_custom_dataset_hint() -> Iterator[None]:
    """Install :class:`_DropCustomDatasetHint` on lm-eval's task logger for the duration of a call."""
    task_logger, hint_filter = logging.getLogger("lm_eval.api.task"), _DropCustomDatasetHint()
    task_logger.addFilter(hint_filter)
    try:
        yield
    finally:
        task_logger.removeFilter(hint_filter)


@dataclass(frozen=True)
class ZeroShotOptions(Options):
    """The evaluator's knobs, checked where they enter (``eval.zeroshot.<name>`` in messages)."""

    prefix: ClassVar[str] = "eval.zeroshot"
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    source: str = "auto"
    limit: int | float | None = bounded(None, gt=0)  # lm-eval: an int is items per task, a float < 1 a share
    batch_size: int | Literal["auto"] = "auto"
    num_fewshot: int = bounded(0, ge=0)
    preset: str | None = None

    def check(self) -> None:
        if not self.tasks:
            raise PruneError("no zero-shot tasks given; pass e.g. eval.zeroshot.tasks=[piqa]")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise PruneError(f"unknown zero-shot task(s) {unknown}; known: {', '.join(TASKS)}")
        if self.source not in SOURCES:
            raise PruneError(f"unknown zero-shot source '{self.source}'; use one of {', '.join(SOURCES)}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise self.error("batch_size", "must be >= 1 or auto")
        if isinstance(self.limit, float) and self.limit > 1:
            raise self.error("limit", "must be an item count (an int) or a share of the items in (0, 1]")


class ZeroShotEvaluator:
    """Zero-shot accuracy of the in-memory model with lm-eval (``zs/<task>/acc[_norm]``, ``zs/mean``).

    Args:
        tasks: public task names: piqa, winogrande, hellaswag, arc_easy, arc_challenge (the default),
            openbookqa, boolq, lambada_openai (alias lambada).
        source: ``hub`` (lm-eval's stock tasks), ``bundled`` (the same tasks over the shipped files) or
            ``auto`` (hub when reachable, else bundled).
        limit: first N items per task (int), or a fraction of each task (float < 1); ``None`` = all.
        batch_size: lm-eval batch size: an int, or ``auto`` (the default): lm-eval's search for the largest
            batch that fits on a GPU, `CPU_BATCH_SIZE` on a CPU. Accuracy does not depend on it; the size
            used is logged.
        num_fewshot: few-shot examples per prompt; the seed papers use 0.
        preset: name of the preset (e.g. a CPU slice) that set these values, recorded with the results.
    """

    def __init__(self, **options: Any) -> None:
        options = ZeroShotOptions.parse(options)
        self.tasks = list(options.tasks)
        self.source = options.source
        self.limit, self.batch_size = options.limit, options.batch_size
        self.num_fewshot, self.preset = options.num_fewshot, options.preset
        self._resolved: str | None = None
        self._task_manager: Any = None

    @property
    def resolved_source(self) -> str:
        """``hub`` or ``bundled``; ``auto`` is resolved (and logged) once, on first use."""
        if self._resolved is None:
            self._resolved = resolve_source(self.source)
            if self._resolved == "bundled" and self.num_fewshot > 0:
                log.warning("bundled zero-shot tasks have no training split: few-shot examples are drawn "
                            "from the evaluated split itself")
        return self._resolved

    def describe(self) -> dict[str, Any]:
        """The protocol parameters to record with the results.

        Returns:
            lm_eval_version, source (resolved), tasks, limit, num_fewshot, batch_size,
            task_versions ({task: version from the task YAML's metadata}) and preset.
        """
        return {
            "lm_eval_version": lm_eval_version(),
            "source": self.resolved_source,
            "tasks": list(self.tasks),
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "batch_size": self.batch_size,
            "task_versions": self._task_versions(),
            "preset": self.preset,
        }

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """Evaluate ``model`` as it is in memory.

        Args:
            model: a Hugging Face causal LM (``PreTrainedModel``), on the device to evaluate on.
            tokenizer: its tokenizer; lm-eval sets a pad token if it has none.

        Returns:
            ``zs/<task>/acc``, ``zs/<task>/acc_norm`` (where the task has it) and ``zs/mean``, in [0, 1]; the
            standard error of each (``..._stderr``, ``zs/mean_stderr``; left out when a task has one item) and
            the items per task (``zs/<task>/n``).
        """
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        names = {t: TASKS[t].lm_eval_name(self.resolved_source) for t in self.tasks}
        was_training = model.training
        try:
            with _preserved_rng_state(), quiet_custom_dataset_hint():
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size_for(model))
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=list(dict.fromkeys(names.values())),
                    num_fewshot=self.num_fewshot,
                    limit=self.limit,
                    task_manager=self._manager(),
                    log_samples=False,
                    bootstrap_iters=0,  # no stderr: acc only, and LAMBADA's perplexity bootstrap is slow
                )
        finally:
            model.train(was_training)  # HFLM switches the model to eval mode
        counts = {name: int(out["n-samples"][name]["effective"]) for name in names.values()}
        return self._flatten(out["results"], names, counts)

    # ------------------------------------------------------------------ helpers

    def batch_size_for(self, model: Any) -> int | str:
        """The batch size handed to lm-eval: the configured int, else ``auto`` on a GPU (lm-eval searches
        for the largest that fits) and `CPU_BATCH_SIZE` elsewhere."""
        if self.batch_size != "auto":
            return self.batch_size
        on_gpu = next(model.parameters()).device.type == "cuda"
        size = "auto" if on_gpu else CPU_BATCH_SIZE
        why = "lm-eval's search on the GPU" if on_gpu else "the CPU default"
        log.info("zero-shot batch size: %s (%s)", size, why)
        return size

    def _manager(self) -> Any:
        """One TaskManager per evaluator. The bundled one indexes only our YAMLs: indexing lm-eval's own
        ~15k task configs takes about 15 s, which only the hub source needs."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            if self.resolved_source == "bundled":
                self._task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
            else:
                self._task_manager = TaskManager()
        return self._task_manager

    def _task_versions(self) -> dict[str, Any]:
        """``metadata.version`` of each task's YAML, read without building the task (no data download)."""
        from lm_eval.tasks._yaml_loader import load_yaml  # resolves `include:` as lm-eval does

        index = self._manager().task_index
        versions: dict[str, Any] = {}
        for task in self.tasks:
            entry = index[TASKS[task].lm_eval_name(self.resolved_source)]
            config = load_yaml(entry.yaml_path, resolve_func=False)
            versions[task] = (config.get("metadata") or {}).get("version")
        return versions

    def _flatten(self, results: dict[str, dict[str, Any]], names: dict[str, str], counts: dict[str, int]
                 ) -> dict[str, float]:
        """lm-eval's ``{"piqa": {"acc,none": ...}}`` and item counts -> ``{"zs/piqa/acc": ...,
        "zs/piqa/acc_stderr": ..., "zs/piqa/n": ...}`` plus ``zs/mean`` and ``zs/mean_stderr``."""
        with_stderr = min(counts.values()) >= 2  # one item has no spread to estimate
        metrics: dict[str, float] = {}
        for task, name in names.items():
            metrics[f"zs/{task}/n"] = float(counts[name])
            for metric in TASKS[task].metrics:
                value = float(results[name][f"{metric},none"])
                metrics[f"zs/{task}/{metric}"] = value
                if with_stderr:
                    metrics[f"zs/{task}/{metric}_stderr"] = accuracy_stderr(value, counts[name])
        metrics["zs/mean"] = mean_score(metrics, self.tasks)
        if with_stderr:
            metrics["zs/mean_stderr"] = mean_stderr(metrics, self.tasks)
        return metrics
