"""Experiment loggers behind one small interface: W&B (offline unless credentials exist) or nothing.

``results.json`` is the source of truth; a logger only mirrors it, and never decides a cell's fate: a W&B run
that cannot start online (no API key, an unreachable server) starts offline after a bounded wait
(``INIT_TIMEOUT_S``), with one warning; one that cannot start at all, or fails later, is one warning and no
more logging (`guarded`). W&B runs are finished with the run's exit code so a failed Hydra cell does not show
as finished (wandb#4591).

One sweep = one W&B group: the experiment name, plus the scale when one is selected (``table2-reference``).
A paper table's aggregated result goes to one more run of that group (``log_summary``), and
``build_report`` turns the group into a W&B report (online only).
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from prune.errors import PruneError, first_line

log = logging.getLogger(__name__)

# How long wandb.init waits for the server (wandb's own default is 90 s; a closed port costs about 10 s more
# on top): a dead server should cost a cell seconds, not minutes. WANDB_INIT_TIMEOUT in the environment wins.
INIT_TIMEOUT_S = 30.0
# How long finishing a run waits for its upload; past it the run is marked crashed online, and its offline
# files in the cell's wandb/ folder can still be uploaded with `wandb sync`. WANDB_FINISH_TIMEOUT wins.
FINISH_TIMEOUT_S = 300.0


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


class GuardedLogger:
    """Forwards to a logger until its first error, which becomes one warning; after it, logs nothing."""

    def __init__(self, inner: Logger) -> None:
        self._inner: Logger | None = inner

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._call("log_metrics", metrics)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._call("log_table", key, columns, rows)

    def log_file(self, path: Path, name: str, kind: str) -> None:
        self._call("log_file", path, name, kind)

    def log_images(self, images: dict[str, Path]) -> None:
        self._call("log_images", images)

    def finish(self, exit_code: int) -> None:
        self._call("finish", exit_code)

    def _call(self, method: str, *args: Any) -> None:
        if self._inner is None:
            return
        try:
            getattr(self._inner, method)(*args)
        except Exception as err:  # any logger error: the cell's own outcome stands
            log.warning("experiment logger failed in %s (%s); it logs nothing more, results.json is the "
                        "record", method, error_summary(err))
            self._inner = None


def guarded(start: Callable[[], Logger]) -> Logger:
    """The logger that ``start`` builds, guarded (`GuardedLogger`); a `NullLogger` with one warning when
    building it fails."""
    try:
        return GuardedLogger(start())
    except Exception as err:  # wandb raises its own error types, and others
        log.warning("experiment logger could not start (%s); this cell logs nothing, results.json is the "
                    "record", error_summary(err))
        return NullLogger()


def error_summary(err: BaseException) -> str:
    """``Type: first line of the message``: wandb's errors run over several lines."""
    return f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else type(err).__name__


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def wandb_credentials_configured() -> bool:
    """An API key in the environment or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def sweep_group(experiment_name: str, config: dict[str, Any]) -> str:
    """The W&B group of a sweep: the experiment name, plus the scale when a scale config is selected."""
    scale = (config.get("scale") or {}).get("name")
    return f"{experiment_name}-{scale}" if scale else experiment_name


def method_overrides() -> list[str]:
    """The current Hydra job's ``method.<key>=<value>`` overrides as ``<key>=<value>`` (none outside
    Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o.removeprefix("method.") for o in HydraConfig.get().overrides.task if o.startswith("method.")]


class WandbLogger:
    """One W&B run per sweep cell.

    Args:
        project: W&B project.
        entity: W&B entity (team or user); ``None`` = the default of the credentials.
        mode: ``auto`` (online when credentials are configured, else offline), ``online``, ``offline``,
            ``disabled``. ``WANDB_MODE`` in the environment wins.
        group: the experiment name; the scale is appended when ``config`` has one (``sweep_group``).
        name: the run name, ``<model>-<method>-r<ratio>``; a cell's ``method.*`` overrides are appended.
        tags: the config-group choices (plus those overrides).
        config: the resolved config.
        run_dir: where offline run files go (inside the cell's directory).
    """

    def __init__(self, project: str, entity: str | None, mode: str, group: str, name: str,
                 tags: list[str], config: dict[str, Any], run_dir: Path) -> None:
        import wandb

        group = sweep_group(group, config)
        variant = method_overrides()  # e.g. an ablation grid's method.search=false: part of the name and tags
        name, tags = "-".join([name, *variant]), [*tags, *(f"method.{v}" for v in variant)]
        if os.environ.get("WANDB_MODE"):
            mode = os.environ["WANDB_MODE"]
        elif mode == "auto":
            mode = "online" if wandb_credentials_configured() else "offline"
        self._wandb = wandb
        self.mode = mode
        settings = wandb.Settings(init_timeout=_env_seconds("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S),
                                  finish_timeout=_env_seconds("WANDB_FINISH_TIMEOUT", FINISH_TIMEOUT_S))
        self.run = self._start(dict(project=project, entity=entity, group=group, name=name, tags=tags,
                                    config=config, dir=str(run_dir), reinit="finish_previous",
                                    settings=settings))
        log.info("W&B run %s (%s mode)", name, self.mode)

    def _start(self, init_args: dict[str, Any]) -> Any:
        """``wandb.init`` in ``self.mode``; an online start that fails (no key, no server, a time-out) starts
        offline instead, with one warning."""
        try:
            return self._wandb.init(mode=self.mode, **init_args)
        except Exception as err:  # UsageError, CommError, AuthenticationError, time-outs ...
            if self.mode != "online":
                raise
            log.warning("W&B could not start online (%s); logging offline to %s/wandb instead (upload it "
                        "later with `wandb sync`)", error_summary(err), init_args["dir"])
            self.mode = "offline"
            return self._wandb.init(mode="offline", **init_args)

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


def log_summary(logger_cfg: dict[str, Any], experiment: str, config: dict[str, Any], columns: list[str],
                rows: list[list[Any]], files: list[Path], images: dict[str, Path],
                run_dir: Path) -> str | None:
    """Log an aggregated paper table to one more run of the sweep's W&B group; returns its mode.

    Args:
        logger_cfg: the ``logger`` config (``kind: none`` logs nothing and returns ``None``).
        experiment: the experiment name; with ``config["scale"]`` it gives the group (``sweep_group``).
        config: logged as the run's config (experiment, scale, cells).
        columns, rows: the table, logged as a W&B table under ``table``.
        files: table files (Markdown, CSV, LaTeX), logged as one ``paper_table`` artifact.
        images: plots, logged under ``plots/<key>``.
        run_dir: where offline run files go.
    """
    if logger_cfg.get("kind") != "wandb":
        return None
    import wandb

    scale = (config.get("scale") or {}).get("name")
    name = f"{sweep_group(experiment, config)}-summary"
    tags = ["summary", f"experiment:{experiment}"] + ([f"scale:{scale}"] if scale else [])
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=logger_cfg["project"], entity=logger_cfg.get("entity"),
                         mode=logger_cfg.get("mode", "auto"), group=experiment, name=name, tags=tags,
                         config=config, run_dir=run_dir)
    exit_code = 1
    try:
        logger.log_table("table", columns, rows)
        artifact = wandb.Artifact(name=name, type="paper_table")
        for path in files:
            artifact.add_file(str(path))
        logger.run.log_artifact(artifact)
        logger.log_images({f"plots/{key}": path for key, path in images.items()})
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return logger.mode


def build_report(project: str, entity: str | None, group: str, title: str, markdown: str,
                 bars: list[tuple[str, str]]) -> str:
    """Create a W&B report of one sweep group (online): the table as Markdown and bar charts of its runs.

    Args:
        project, entity: where the sweep's runs are (``entity=None``: the credentials' default).
        group: the sweep's W&B group (``sweep_group``).
        title: the report title.
        markdown: the aggregated table (``table.md``).
        bars: ``(summary metric, chart title)`` pairs, one bar chart each.

    Returns:
        The report's URL.

    Raises:
        PruneError: the report API (``wandb-workspaces``) is not installed, or there are no W&B credentials.
    """
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as err:
        raise PruneError("the W&B report API is not installed: pip install 'wandb[workspaces]'") from err
    if not wandb_credentials_configured() or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise PruneError("a W&B report needs W&B online: `wandb login` (or WANDB_API_KEY), unset WANDB_MODE, "
                         "and `wandb sync` the sweep's offline runs first (docs/cluster.md)")
    runset = wr.Runset(project=project, entity=entity or "", name=group,
                       filters=f"Metric('Group') == '{group}'")
    panels = [wr.BarPlot(title=label, metrics=[key]) for key, label in bars]
    panels.append(wr.ScatterPlot(title="WikiText-2 perplexity vs parameters removed", x="params/removed_frac",
                                 y="ppl/wikitext2", log_y=True))
    kwargs = {"entity": entity} if entity else {}
    report = wr.Report(project=project, title=title, description=f"W&B group {group}", **kwargs,
                       blocks=[wr.MarkdownBlock(text=markdown),
                               wr.PanelGrid(runsets=[runset], panels=panels)])
    report.save()
    return str(report.url)
