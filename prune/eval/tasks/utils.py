"""Helpers that the bundled lm-eval task YAMLs in this folder point at with ``!function utils.<name>``.

lm-eval loads this file by path (not as ``prune.eval.tasks.utils``), so it keeps to plain functions.
"""

from __future__ import annotations

from typing import Any

import datasets

from prune.paths import bundled


def load_bundled(data_files: dict[str, str], **_: Any) -> datasets.DatasetDict:
    """Load a bundled task file as lm-eval's ``custom_dataset``.

    A task YAML cannot hold a path that works from every working directory, so the YAMLs name their
    file relative to ``prune/data/files/tasks/`` and this function resolves it. The result is exactly
    what ``dataset_path: json`` with absolute ``data_files`` would give.

    Args:
        data_files: split name -> file name under ``prune/data/files/tasks/`` (``.jsonl`` or ``.jsonl.gz``).
        **_: lm-eval also passes the task's ``metadata`` (version, config source, ...); it is not needed.

    Returns:
        The splits, as ``datasets.load_dataset("json", data_files=...)`` returns them.

    Raises:
        FileNotFoundError: a file is missing (e.g. the package was installed without its data files).
    """
    resolved = {split: bundled(f"tasks/{name}") for split, name in data_files.items()}
    missing = [str(path) for path in resolved.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"bundled zero-shot task data not found: {missing}")
    return datasets.load_dataset("json", data_files={split: str(path) for split, path in resolved.items()})


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Give bundled HellaSwag records the fields the stock ``hellaswag.yaml`` templates read.

    The bundled records already hold lm-eval's processed ``query`` and ``choices`` (the output of the
    stock ``utils.process_docs``), so only the target is missing: stock ``doc_to_target`` is
    ``{{label}}``, the raw HF label, a digit string equal to ``gold``.
    """
    return dataset.map(lambda doc: {"label": str(doc["gold"])})


def lambada_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Rebuild LAMBADA's ``text`` field from the bundled ``context`` / ``continuation`` split.

    The stock ``lambada_openai.yaml`` splits ``text`` at its last space into prompt and target word;
    the bundled (llm-foundry) file stores exactly those two parts, so joining them with one space gives
    back the same prompt and target for every record.
    """
    return dataset.map(lambda doc: {"text": doc["context"] + " " + doc["continuation"]})
