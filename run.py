"""Entry point: ``python run.py [-m] key=value ...``; see README.md and conf/config.yaml.

Every user-caused failure ends the same way: one ``error: ...`` line on stderr that names the fix, exit
status 2, no traceback and no results.json. That covers a `PruneError` raised anywhere in a cell (also when
Hydra's instantiate wraps one raised in a method's or an evaluator's constructor) and Hydra's own failures
before a cell starts (an unknown config option, bad override syntax, an output folder it cannot create):
those keep Hydra's message, with the ``error:`` line after it. In a sweep (``-m``) a failed cell, whatever
the cause, leaves ``error.txt`` in its folder and the sweep goes on, then exits 2 (`prune.sweep`). Anything
else is a bug: its traceback is printed (a single run then exits 1).
"""

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from prune.errors import PruneError, first_line
from prune.sweep import clear_failure, record_failure

BAD_INPUT_EXIT = 2
_cell_started = False  # set once Hydra hands over a cell: later failures are the cell's, not Hydra's


def run_cell(cfg: DictConfig) -> float | None:
    """Hydra's task function: check and run one cell; a bad input ends as described in the module docstring.

    Needs Hydra's runtime config (``HydraConfig``) for the cell's folder and the run mode."""
    global _cell_started
    from prune.runner import run  # late import keeps `--help` fast

    _cell_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    clear_failure(run_dir)
    try:
        return run(cfg)
    except Exception as err:
        user_error = user_error_of(err)
        if user_error is not None:
            print(f"error: {user_error}", file=sys.stderr)
            if not multirun:
                sys.exit(BAD_INPUT_EXIT)
        elif not multirun:
            raise  # a bug: its traceback, exit 1
        else:
            traceback.print_exc()  # a bug in one cell: shown, recorded, and the other cells still run
        record_failure(run_dir, user_error or err)  # the sweep exits 2 at its end (prune.sweep.FailedCells)
        return None


def user_error_of(err: BaseException) -> PruneError | None:
    """The `PruneError` behind `err`, if bad input caused it, else None (a bug).

    Hydra's instantiate wraps an error raised in a constructor (InstantiationException, with the original
    as ``__cause__``), so the whole cause chain is searched. A ``${...}`` that does not resolve or a
    mandatory ``???`` value left unset is a configuration the user wrote, so it is bad input too."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, PruneError):
            return err
        if isinstance(err, (InterpolationResolutionError, MissingMandatoryValue)):
            return PruneError(f"the configuration does not resolve: {first_line(err)}; fix that key or "
                              "its override")
        err = err.__cause__ or err.__context__
    return None


def hydra_error_line(err: BaseException) -> str | None:
    """The ``error:`` line for a failure of Hydra itself before a cell started, or None (not Hydra's)."""
    if isinstance(err, HydraException):  # composition: unknown option or key, bad override syntax
        return ("error: Hydra could not compose the configuration (its message is above); fix the override "
                "it names (`python run.py --help` lists the config groups)")
    if isinstance(err, OSError):  # Hydra creates the output folder and writes .hydra/ before a cell runs
        where = err.filename or "the output folder"
        return (f"error: cannot write the output folder {where} ({err.strerror or err}); pass a writable "
                "hydra.run.dir (or hydra.sweep.dir with -m), or paths.outputs_root=<writable dir>")
    return None


def _print_hydra_message(err: BaseException) -> None:
    """What Hydra itself prints for its errors (without HYDRA_FULL_ERROR): the message and its cause."""
    print(str(err), file=sys.stderr)
    if isinstance(err, HydraException) and err.__cause__ is not None:
        print(str(err.__cause__), file=sys.stderr)


_hydra_main = hydra.main(version_base="1.3", config_path="conf", config_name="config")(run_cell)


def main() -> None:
    """Hydra's CLI around `run_cell`. Hydra is asked to raise its errors rather than print them and exit 1
    (HYDRA_FULL_ERROR), so that its own failures get the ``error:`` line and exit 2 here, and a failure
    before the cell is not shown as a traceback."""
    asked_full = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as err:
        if asked_full == "1":
            raise
        user_error = user_error_of(err)
        line = f"error: {user_error}" if user_error is not None else None
        if line is None and not _cell_started:
            line = hydra_error_line(err)
        if line is None:
            raise  # a bug: its traceback, exit 1
        if user_error is None:
            _print_hydra_message(err)
        print(line, file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT)
    finally:
        _restore_env("HYDRA_FULL_ERROR", asked_full)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


if __name__ == "__main__":
    main()
