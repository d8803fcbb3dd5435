"""The lock of a folder that one process at a time may work in (a run directory).

``lock.json`` holds the holder's pid, host, start time and command. It is created with
``O_EXCL`` (atomic), a live holder is refused with a :class:`RunError` naming it, and the lock
of a dead holder on this host (the pid is gone, a zombie, or reused by a later process) is taken
over with a warning. Folders created for the lock are removed again when it is released unused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from kdlab.core.errors import RunError

__all__ = ["LOCK_FILE", "TORN_LOCK_AGE_S", "FolderLock"]

log = logging.getLogger(__name__)

LOCK_FILE = "lock.json"
#: an unreadable (empty, torn) lock file older than this many seconds is stale.
TORN_LOCK_AGE_S = 5.0

_L = TypeVar("_L", bound="FolderLock")

#: folders whose lock this process holds (resolved paths).
_HELD: set[str] = set()


class FolderLock:
    """One process at a time in ``path`` (a mixin of :class:`kdlab.runs.rundir.RunDir`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._locked = False
        #: folders acquire_lock created (deepest first): removed again if left empty
        self._made: list[Path] = []

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def _abandon(self) -> None:
        """What :meth:`release_lock` with ``abandon`` undoes (subclasses: their start records)."""

    def acquire_lock(self, command: str | None = None) -> None:
        """Make this process the only one working in the run directory (``lock.json``).

        Creates the folder if needed. A lock whose holder is alive (same host: the pid exists;
        another host: always assumed alive) is a :class:`RunError` naming the holder; the lock
        of a dead process on this host is taken over with a warning.
        """
        if self._locked:
            return
        self._make_folder()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": command if command is not None else shlex.join(sys.argv)}
        try:
            for _ in range(20):
                if self._create_lock(record):
                    self._locked = True
                    _HELD.add(self._key())
                    return
                self._clear_stale_lock()
            raise RunError(f"run directory {self.path}: could not take its lock {self.lock_path}; "
                           "try again")
        except BaseException:
            if not self._locked:
                self._remove_made_folders()
            raise

    def release_lock(self, *, abandon: bool = False) -> None:
        """Give the run directory up (a no-op unless this instance holds its lock).

        With ``abandon`` (a start that failed before training), a new run's start records written
        by :meth:`create` are removed again. Folders that :meth:`acquire_lock` created and that
        are then empty are removed, so a failed start leaves nothing behind.
        """
        if not self._locked:
            return
        if abandon:
            self._abandon()
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        self._locked = False
        _HELD.discard(self._key())
        self._remove_made_folders()

    @contextlib.contextmanager
    def locked(self: _L, command: str | None = None) -> Iterator[_L]:
        """``with run_dir.locked(): ...`` holds the lock for the block."""
        self.acquire_lock(command)
        try:
            yield self
        finally:
            self.release_lock()

    def lock_holder(self) -> dict[str, Any] | None:
        """The content of ``lock.json`` (None when there is no readable lock)."""
        try:
            data = json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _key(self) -> str:
        return str(self.path.absolute().resolve())

    def _make_folder(self) -> None:
        missing = []
        p = self.path.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {self.path}: {e.strerror}") from e
        if not self.path.is_dir():
            raise RunError(f"run directory {self.path} is not a folder; choose another --run-dir")
        self._made = missing  # deepest first

    def _remove_made_folders(self) -> None:
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): keep it and its parents
                break
        self._made = []

    def _create_lock(self, record: dict[str, Any]) -> bool:
        """Create ``lock.json`` atomically; False when it already exists."""
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise RunError(f"cannot create the lock {self.lock_path}: {e.strerror}") from e
        try:
            os.write(fd, (json.dumps(record, indent=2) + "\n").encode())
            os.fsync(fd)
        except OSError as e:
            self.lock_path.unlink(missing_ok=True)
            raise RunError(f"cannot write the lock {self.lock_path}: {e.strerror}") from e
        finally:
            os.close(fd)
        return True

    def _clear_stale_lock(self) -> None:
        """Refuse a live holder; move the lock of a dead one aside (then the caller retries)."""
        try:
            text = self.lock_path.read_text()
            age = time.time() - self.lock_path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        except OSError as e:
            raise RunError(f"cannot read the lock {self.lock_path}: {e.strerror}") from e
        try:
            holder = json.loads(text)
            pid = int(holder["pid"])
            host = str(holder["host"])
        except (ValueError, KeyError, TypeError):
            if age < TORN_LOCK_AGE_S:  # another process is writing it right now
                time.sleep(0.1)
                return
            log.warning("run directory %s: taking over its unreadable lock file", self.path)
            self._take_over(text)
            return
        if host != socket.gethostname() or _alive(pid, holder.get("started"), self._key()):
            since = holder.get("started_at") or "an unknown time"
            raise RunError(f"run directory {self.path} is in use by pid {pid} on host {host} "
                           f"since {since}; wait for it or stop it")
        log.warning("run directory %s: taking over the lock of pid %d, which is no longer "
                    "running", self.path, pid)
        self._take_over(text)

    def _take_over(self, seen: str) -> None:
        """Remove the stale lock whose content was ``seen``, unless another process replaced it
        meanwhile (the file moved aside is then put back)."""
        aside = self.lock_path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text() != seen:  # a new holder's lock: restore it
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.lock_path)
        finally:
            aside.unlink(missing_ok=True)


def _alive(pid: int, started: Any, key: str) -> bool:
    """Whether the lock holder ``pid`` (on this host) still runs."""
    if pid == os.getpid():
        return key in _HELD  # else a lock left by an earlier process that had this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:  # not Linux, or gone meanwhile: os.kill said it exists
        return True
    if stat[0] in ("Z", "X"):  # a zombie never releases its lock
        return False
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        since = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    # a pid reused by a process that started after the lock was taken is not the holder
    return not (isinstance(started, int | float) and since > started + 2)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first); None if
    unreadable (not Linux, or no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
