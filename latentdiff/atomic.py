"""Atomic writes of files and folders: built beside the target, fsync'ed, then renamed into place.

A reader never sees a half-written file or folder: either the old content or the new one. A crash leaves at most
a ``.tmp-*`` file or folder beside the target, which readers ignore. This module imports nothing from latentdiff:
every writer of the package sits above it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", overwrite: bool = True):
    """Yield a file object; on clean exit its content replaces ``path`` atomically.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` (checked again just before the
    rename, which uses a hard link so that a file created meanwhile is never clobbered).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError if path appeared meanwhile
            os.unlink(tmp)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _name_file(e, path)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False):
    """Yield a fresh folder beside ``target``; on clean exit it replaces ``target`` by rename (a previous
    ``target`` is moved aside first, put back if the rename fails, and deleted last); on error it is deleted."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        yield tmp
        old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}.", dir=target.parent)) / target.name
        if target.exists():
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old.exists():
                old.rename(target)
            raise
        shutil.rmtree(old.parent)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _name_file(error: BaseException, path: Path) -> None:
    """A failed write (a full disk) names the file it was for: the OSError in ``error``'s chain (torch.save turns
    it into a RuntimeError) gets ``path`` as its filename when it has none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)
            return
        error = error.__cause__ or error.__context__


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
