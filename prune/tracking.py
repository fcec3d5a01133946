"""Experiment loggers behind one small interface: W&B (offline unless credentials exist) or nothing.

``results.json`` is the source of truth; a logger only mirrors it. W&B runs are finished with the run's
exit code so a failed Hydra cell does not show as finished (wandb#4591).
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Logger(Protocol):
    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...
    def log_file(self, path: Path, name: str, kind: str) -> None: ...
    def log_images(self, images: dict[str, Path]) -> None: ...
    def finish(self, exit_code: int) -> None: ...


class NullLogger:
    """``logger=none``: logs nothing."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_file(self, path: Path, name: str, kind: str) -> None:
        pass

    def log_images(self, images: dict[str, Path]) -> None:
        pass

    def finish(self, exit_code: int) -> None:
        pass


def wandb_credentials_configured() -> bool:
    """An API key in the environment or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """One W&B run per sweep cell.

    Args:
        project: W&B project.
        entity: W&B entity (team or user); ``None`` = the default of the credentials.
        mode: ``auto`` (online when credentials are configured, else offline), ``online``, ``offline``,
            ``disabled``. ``WANDB_MODE`` in the environment wins.
        group: the experiment name (one group per sweep).
        name: the run name, ``<model>-<method>-r<ratio>``.
        tags: the config-group choices.
        config: the resolved config.
        run_dir: where offline run files go (inside the cell's directory).
    """

    def __init__(self, project: str, entity: str | None, mode: str, group: str, name: str,
                 tags: list[str], config: dict[str, Any], run_dir: Path) -> None:
        import wandb

        if os.environ.get("WANDB_MODE"):
            mode = os.environ["WANDB_MODE"]
        elif mode == "auto":
            mode = "online" if wandb_credentials_configured() else "offline"
        self._wandb = wandb
        self.mode = mode
        self.run = wandb.init(project=project, entity=entity, mode=mode, group=group, name=name, tags=tags,
                              config=config, dir=str(run_dir), reinit="finish_previous")
        log.info("W&B run %s (%s mode)", name, mode)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.log(metrics)
        self.run.summary.update(metrics)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def log_file(self, path: Path, name: str, kind: str) -> None:
        artifact = self._wandb.Artifact(name=name, type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_images(self, images: dict[str, Path]) -> None:
        if images:
            self.run.log({key: self._wandb.Image(str(path)) for key, path in images.items()})

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
