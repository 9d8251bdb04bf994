"""One writer per folder: an exclusive OS file lock (``flock``) on ``<folder>/.lock``.

A run that writes into a folder (the trainer's ``--outdir``, ``make-shards``' output, ``eval-t2i``'s ``--outdir``)
holds :func:`folder_lock` for as long as it writes; a second one on the same folder is refused at once with
:class:`FolderLockedError`, whose message names the holder (PID, host, start time, command: the holder writes them
into the lock file after locking). The kernel drops the lock when its holder dies, however it dies (SIGKILL
included), so a ``.lock`` file left behind by a dead process never blocks anybody.

The holder deletes ``.lock`` just before it lets go (and the folder too when the lock created it and it is empty
again), so a finished run leaves no trace; a locker checks after locking that the file it locked is still the one
at ``<folder>/.lock``, and starts over when it is not, so this deletion never lets two holders in. Forked children
(DataLoader workers, ...) close their inherited copy of the lock at once: the lock lives and dies with the process
that took it. ``flock`` works on local file systems and on NFS (Linux emulates it there with a POSIX lock).

This module imports nothing from latentdiff. Windows has no ``fcntl``: there, locking is skipped (a no-op).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: not a target platform; run without locking rather than not at all
    fcntl = None

LOCK_NAME = ".lock"
_HELD: weakref.WeakSet[FolderLock] = weakref.WeakSet()


class FolderLockedError(ValueError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """The lock on ``folder`` (``what``: what the holder does there, e.g. ``training run``). :meth:`acquire` takes
    it or raises :class:`FolderLockedError`; :meth:`release` (or leaving a ``with`` block) gives it back."""

    def __init__(self, folder: str | Path, what: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._created_folder = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self.held or fcntl is None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise FileExistsError(f"output {str(self.folder)!r} exists and is not a folder")
        for _ in range(100):  # starts over only when a holder deleted the file or folder meanwhile
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                self._created_folder = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
                os.close(fd)
                if holder is None:
                    raise
                raise FolderLockedError(_refusal(self.folder, holder)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder deleted the file we locked; lock the one there now
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            self._fd = fd
            _HELD.add(self)
            return self
        raise OSError(f"could not lock {self.path}: it keeps disappearing")

    def release(self) -> None:
        """Delete the lock file (and the folder, when the lock created it and nothing else is in it), then unlock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(self)
        try:
            self.path.unlink(missing_ok=True)
            if self._created_folder:
                try:
                    self.folder.rmdir()
                except OSError:  # not empty: the run wrote something
                    pass
        finally:
            os.close(fd)  # closing the last descriptor of the lock unlocks it

    def _forget_in_child(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking (the parent still holds it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def folder_lock(folder: str | Path, what: str = "run") -> FolderLock:
    """Lock ``folder`` (created if missing) for this process, or raise :class:`FolderLockedError` naming the
    holder. Use as ``with folder_lock(outdir, "eval-t2i"): ...`` or keep the returned lock and ``release()`` it."""
    return FolderLock(folder, what).acquire()


def _read_holder(fd: int) -> dict:
    """The holder's note; it writes it right after locking, so wait a moment for it when the file is empty."""
    for _ in range(40):
        data = os.pread(fd, 4096, 0)
        if data.strip():
            try:
                return json.loads(data.decode("utf-8", "replace").splitlines()[0])
            except (ValueError, IndexError):
                return {}
        time.sleep(0.025)
    return {}


def _refusal(folder: Path, holder: dict) -> str:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
           if holder else "holder unknown")
    what = f"{holder['what']}: " if holder.get("what") else ""
    command = f"; command: {holder['command']}" if holder.get("command") else ""
    return (f"{folder} is in use by another run ({what}{who}{command}); wait for it to finish or choose another "
            f"folder")


def _close_inherited_locks() -> None:
    for lock in list(_HELD):
        lock._forget_in_child()
    _HELD.clear()


if fcntl is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)
