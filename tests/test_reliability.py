"""Reliability of a cell: the logger never decides its fate, its identity is its configuration, one process
works in it at a time, and a resumed search or training says so."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from prune import results, tracking
from prune.errors import PruneError
from prune.store import LOCK_FILE, directory_lock
from tests.conftest import REPO

LOGGER_WARNING = "W&B could not start online"


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        drop: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The ``run.py`` command line and its environment (``env`` added, ``drop`` removed)."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    for name in drop:
        full_env.pop(name, None)
    return [sys.executable, str(REPO / "run.py"), *args, f"paths.outputs_root={cwd}/outputs"], full_env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command, full_env = cli(*args, cwd=cwd, env=env, drop=drop)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


def closed_port() -> int:
    """A local TCP port that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------ the logger


@pytest.mark.parametrize("api_key", [None, "a" * 40], ids=["missing_key", "unreachable_server"])
def test_logger_failure_still_writes_results(tmp_path: Path, api_key: str | None) -> None:
    """W&B online with no key, or with a key and a server that refuses connections: one warning, an offline
    run, results.json, exit 0, and a bounded wait (it used to end in a traceback, or hang 106 s first)."""
    home = tmp_path / "home"  # no ~/.netrc, no W&B settings: no credentials but the ones given here
    home.mkdir()
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
           "WANDB_INIT_TIMEOUT": "2", "HOME": str(home), "WANDB_SILENT": "true"}
    if api_key:
        env["WANDB_API_KEY"] = api_key
    started = time.monotonic()
    drop = () if api_key else ("WANDB_API_KEY",)
    out = run_cli("debug=tiny", "logger=wandb", "method=last_layers", "ratio=0.25",
                  f"hydra.run.dir={tmp_path}/cell", cwd=tmp_path, env=env, drop=drop)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert (out.stdout + out.stderr).count(LOGGER_WARNING) == 1
    assert json.loads((tmp_path / "cell" / "results.json").read_text())["status"] == "complete"
    assert list((tmp_path / "cell" / "wandb").glob("offline-run-*"))
    assert elapsed < 240  # the run itself takes ~20 s on a free CPU; the failed start ~12 s more


class FakeRun:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.finished = fail, None

    def log(self, metrics: dict) -> None:
        if self.fail:
            raise ConnectionError("upload failed\nsecond line")

    def finish(self, exit_code: int) -> None:
        self.finished = exit_code


def fake_wandb(fail_online: bool) -> types.ModuleType:
    """A stand-in ``wandb`` module: records each init's mode and settings; online starts can fail."""
    module = types.ModuleType("wandb")
    module.calls = []  # type: ignore[attr-defined]
    module.Settings = lambda **kwargs: kwargs  # type: ignore[attr-defined]

    def init(mode: str, settings: dict, **kwargs) -> FakeRun:
        module.calls.append((mode, settings))  # type: ignore[attr-defined]
        if mode == "online" and fail_online:
            raise RuntimeError("Timed out while retrying\nConsider increasing the init_timeout setting")
        return FakeRun()

    module.init = init  # type: ignore[attr-defined]
    return module


def _wandb_logger(tmp_path: Path) -> tracking.WandbLogger:
    return tracking.WandbLogger(project="p", entity=None, mode="online", group="g", name="n", tags=[],
                                config={}, run_dir=tmp_path)


def test_wandb_start_is_bounded_and_falls_back_offline(tmp_path, monkeypatch, caplog) -> None:
    for name in ("WANDB_MODE", "WANDB_INIT_TIMEOUT", "WANDB_FINISH_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    wandb = fake_wandb(fail_online=True)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    with caplog.at_level(logging.WARNING, logger="prune.tracking"):
        logger = _wandb_logger(tmp_path)
    assert logger.mode == "offline" and [mode for mode, _ in wandb.calls] == ["online", "offline"]
    settings = wandb.calls[0][1]
    assert settings["init_timeout"] == tracking.INIT_TIMEOUT_S < 90  # wandb's own default: 90 s
    assert settings["finish_timeout"] == tracking.FINISH_TIMEOUT_S
    (warning,) = [r.getMessage() for r in caplog.records]
    assert LOGGER_WARNING in warning and "RuntimeError: Timed out while retrying" in warning
    assert "\n" not in warning
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    wandb.calls.clear()
    _wandb_logger(tmp_path)
    assert wandb.calls[0][1]["init_timeout"] == 5.0


def test_logger_errors_are_one_warning_and_never_raise(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(fail_online=False))
    with caplog.at_level(logging.WARNING, logger="prune.tracking"):
        logger = tracking.guarded(lambda: _wandb_logger(tmp_path))
        run = logger._inner.run  # type: ignore[union-attr]
        run.fail = True
        logger.log_metrics({"a": 1.0})  # fails: one warning, then nothing more is logged
        logger.log_metrics({"a": 2.0})
        logger.finish(0)
    assert run.finished is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "log_metrics" in warning and "ConnectionError: upload failed" in warning
    caplog.clear()

    def cannot_start() -> tracking.Logger:
        raise OSError("no disk")

    with caplog.at_level(logging.WARNING, logger="prune.tracking"):
        assert isinstance(tracking.guarded(cannot_start), tracking.NullLogger)
    assert len(caplog.records) == 1 and "OSError: no disk" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------------ a cell's identity


def test_differing_keys_name_changed_values_not_added_keys() -> None:
    old = {"ratio": 0.25, "method": {"name": "sleb", "layers": [1, 2]}, "force": False}
    new = {"ratio": 0.5, "method": {"name": "sleb", "layers": (1, 2), "new_option": 3}, "force": True}
    assert results.differing_keys(old, new) == ["force: False -> True", "ratio: 0.25 -> 0.5"]
    identities = results.cell_identity(old), results.cell_identity(new)
    assert results.differing_keys(*identities) == ["ratio: 0.25 -> 0.5"]
    same = old | {"save": True, "logger": {"kind": "none"}, "paths": {"x": 1},
                  "experiment_name": "other", "scale": {"name": "smoke"}}
    assert results.config_digest(same) == results.config_digest(old)
    assert results.config_digest(new) != results.config_digest(old)


def test_check_same_cell(tmp_path: Path) -> None:
    config = {"ratio": 0.25, "method": {"name": "sleb"}}
    record = {"config": config, "config_digest": results.config_digest(config)}
    results.check_same_cell(record, config | {"force": True}, tmp_path / "results.json")  # same cell
    added = config | {"method": {"name": "sleb", "new_option": 1}}  # a key added to the config files since
    results.check_same_cell(record, added, tmp_path / "results.json")
    results.check_same_cell({"config": config}, config | {"ratio": 0.5}, tmp_path)  # old record: no digest
    with pytest.raises(PruneError, match=r"ratio: 0.25 -> 0.5\); pass force=true .*hydra.run.dir="):
        results.check_same_cell(record, config | {"ratio": 0.5}, tmp_path / "results.json")


def test_changed_configuration_in_a_run_directory_is_refused(tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    args = ("debug=tiny", "method=last_layers", f"hydra.run.dir={cell}")
    first = run_cli(*args, "ratio=0.25", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    done = cell / "results.json"
    record = json.loads(done.read_text())
    assert record["config_digest"] == results.config_digest(record["config"])
    same = run_cli(*args, "ratio=0.25", "experiment_name=renamed", cwd=tmp_path)  # not part of the identity
    assert same.returncode == 0 and "skip:" in same.stdout, same.stderr[-2000:]
    written = done.read_bytes()
    changed = run_cli(*args, "ratio=0.5", cwd=tmp_path)
    assert changed.returncode == 2 and "skip:" not in changed.stdout
    (error,) = error_lines(changed)
    assert "ratio: 0.25 -> 0.5" in error and "force=true" in error and "hydra.run.dir=" in error
    assert done.read_bytes() == written
    del record["config_digest"]  # a results.json from before cells recorded their identity: skipped as ever
    done.write_text(json.dumps(record))
    old = run_cli(*args, "ratio=0.5", cwd=tmp_path)
    assert old.returncode == 0 and "skip:" in old.stdout, old.stderr[-2000:]


# ---------------------------------------------------------------------------------------- concurrency


def test_directory_lock_refuses_waits_and_takes_over_stale_locks(tmp_path: Path) -> None:
    with directory_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(PruneError, match=f"in use by pid {os.getpid()} .*another hydra.run.dir"):
            with directory_lock(tmp_path, wait_s=0):  # flock: another open file description, even here
                pass
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: names no holder

    held = threading.Event()

    def hold_briefly() -> None:
        with directory_lock(tmp_path):
            held.set()
            time.sleep(0.5)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    held.wait(10)
    with directory_lock(tmp_path, wait_s=30, poll_s=0.05):  # waits for the holder, then takes the lock
        assert not holder.is_alive()
    holder.join()

    (tmp_path / LOCK_FILE).write_text("pid 999999 on elsewhere\n")  # a stale file: no process holds it
    with directory_lock(tmp_path, wait_s=0):
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    code = ("import sys, time; from prune.store import directory_lock\n"
            f"with directory_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(PruneError, match=f"pid {child.pid} "):
            with directory_lock(tmp_path, wait_s=0):
                pass
    finally:
        child.kill()
        child.wait(30)
    with directory_lock(tmp_path, wait_s=0):
        pass


def test_ranks_of_one_launch_share_rank_zeros_lock(tmp_path: Path, monkeypatch) -> None:
    from prune.runner import _cell_lock

    with directory_lock(tmp_path):
        monkeypatch.setenv("RANK", "1")  # another process of the same accelerate launch: no lock of its own
        with _cell_lock(tmp_path):
            pass
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("PRUNE_CELL_LOCK_WAIT_S", "0")
        with pytest.raises(PruneError, match="in use by"):
            with _cell_lock(tmp_path):
                pass


def test_two_processes_saving_one_cell(tmp_path: Path) -> None:
    """Two ``save=true`` runs of one cell at once: one writes the result and the model; the other waits and
    skips it, or refuses with one line. No temporary file is left behind."""
    cell = tmp_path / "cell"
    command, env = cli("debug=tiny", "method=shortgpt", "ratio=0.5", "save=true", f"hydra.run.dir={cell}",
                       cwd=tmp_path)
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env=env) for _ in range(2)]
    outs = [(p, *p.communicate(timeout=600)) for p in procs]
    ran = [o for o in outs if "results:" in o[1]]
    assert len(ran) == 1 and ran[0][0].returncode == 0, [err[-2000:] for _, _, err in outs]
    ((other, out, err),) = [o for o in outs if o is not ran[0]]
    if other.returncode == 0:
        assert "skip:" in out
    else:
        assert other.returncode == 2
        (error,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "is in use by pid" in error
    assert json.loads((cell / "results.json").read_text())["status"] == "complete"
    assert (cell / "model" / "model.safetensors").is_file()
    assert not [p for p in cell.rglob("*.tmp")]


# ---------------------------------------------------------------------------------------- resumption


def test_greedy_search_says_it_resumes(caplog) -> None:
    from tests.test_blockpruner import BlockPruner, _calib, _prune, tiny_model

    model, calib = tiny_model("llama"), _calib(seed=29)
    first = _prune(BlockPruner(num_blocks=1), model, calib).info
    with caplog.at_level(logging.INFO, logger="prune.methods.greedy"):
        _prune(BlockPruner(num_blocks=2), model, calib)
    digest = Path(first["cache"]["path"]).stem
    lines = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert lines == [f"blockpruner: resuming search from step 1 of {first['cache']['path']} (key {digest})"]


def test_disp_training_says_it_resumes(tmp_path, caplog) -> None:
    from prune.methods.disp import Disp
    from prune.models.adapter import adapter_for
    from tests.test_disp import FAST, _calib, _small_vocab

    def run(steps: int) -> None:
        method = Disp(**FAST | {"checkpoint": True, "checkpoint_dir": str(tmp_path)}, steps=steps,
                      ratio_params="linear")
        method.prune(adapter_for(_small_vocab()), _calib(512), 0.3)

    run(2)
    (checkpoint,) = tmp_path.glob("hn-*.pt")
    with caplog.at_level(logging.INFO, logger="prune.methods.disp"):
        run(4)
    digest = checkpoint.stem.removeprefix("hn-")
    lines = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert lines == [f"disp: resuming training from step 2 of {checkpoint} (key {digest})"]
