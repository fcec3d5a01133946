"""Files that must never be seen half-written, and caches found again by what produced them.

Every file the package writes for later reuse (``results.json``, the dense-reference cache, a search's
removal order, a training checkpoint, a saved model directory, the token cache) goes through this module:

- `atomic_target` / `write_atomic` / `write_json_atomic`: write to a temporary name unique to this process
  and call, then rename into place, so a reader sees the old file or the new one, and two processes writing
  the same file never share a temporary.
- `digest`: the one hash of a JSON-able key (sorted keys, ``str`` for anything else).
- `KeyedFile`: a cache file named by the digest of its key that stores the key inside it, so a file written
  for another key (another model, other tokens, other options) is never resumed.
- `directory_lock`: one process at a time in a directory (a run cell); others wait a bounded time, then
  refuse with one line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune.errors import PruneError

log = logging.getLogger(__name__)

LOCK_FILE = ".cell.lock"


def digest(key: Any, length: int = 20) -> str:
    """The hex SHA-256 of ``key`` as canonical JSON, cut to ``length`` characters."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that no other process or call uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_target(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a directory); on success it replaces ``path``.

    On an exception the temporary is deleted and ``path`` is left as it was. An existing directory at
    ``path`` is removed just before the rename (a rename cannot replace a non-empty directory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write text or bytes to ``path`` atomically."""
    with atomic_target(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_json_atomic(path: Path | str, payload: Any, indent: int | None = 2) -> None:
    """``json.dumps(payload)`` into ``path`` atomically."""
    write_atomic(path, json.dumps(payload, indent=indent, default=str))


@dataclass(frozen=True)
class KeyedFile:
    """A cache file ``<directory>/<prefix><digest(key)><suffix>`` that carries its key.

    `load_json` / `load_torch` return ``None`` when the file is missing, unreadable or holds another key, so
    callers start afresh instead of resuming someone else's state.
    """

    directory: Path
    key: dict[str, Any]
    prefix: str = ""
    suffix: str = ".json"

    @property
    def path(self) -> Path:
        return Path(self.directory) / f"{self.prefix}{digest(self.key)}{self.suffix}"

    def load_json(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def save_json(self, state: dict[str, Any], indent: int | None = 1) -> None:
        write_json_atomic(self.path, state | {"key": self.key}, indent=indent)

    def load_torch(self, map_location: Any = None) -> dict[str, Any] | None:
        import torch

        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location=map_location, weights_only=True)
        return state if state.get("key") == self.key else None

    def save_torch(self, state: dict[str, Any]) -> None:
        import torch

        with atomic_target(self.path) as tmp:
            torch.save(state | {"key": self.key}, tmp)


@contextmanager
def directory_lock(directory: Path | str, wait_s: float = 0.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold ``<directory>/.cell.lock`` exclusively for the body; wait up to ``wait_s`` for another holder.

    An advisory ``fcntl.flock``: the kernel drops it when its process exits or is killed, so the lock of a
    dead process is taken over at once (the file itself stays: deleting it would let two processes lock two
    different files under one name). On NFS, Linux turns flock into a POSIX lock that other nodes see. The
    file names the holder (pid and host) while it is held, for the refusal message.

    Raises:
        PruneError: another live process still holds the lock after ``wait_s`` seconds.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, wait_s, poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a free lock names no holder
    finally:
        os.close(fd)  # releases the flock


def _acquire(fd: int, path: Path, wait_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            if time.monotonic() >= deadline:
                raise PruneError(
                    f"{path.parent} is in use by {holder} (lock {path}); let that run finish (a rerun then "
                    f"skips the cell), or run this one elsewhere (another hydra.run.dir)") from None
            if not waited:
                log.warning("%s is in use by %s; waiting up to %.0f s for it", path.parent, holder, wait_s)
                waited = True
            time.sleep(poll_s)
