"""File safety shared by every writer: atomic writes through unique temporary files, cleanup of the
temporaries an interrupted writer left, run-folder locks and output-path checks.

A temporary file lives beside its target and is named ``.<target name>.<pid>-<token>@<host>.tmp``;
it is renamed over the target only once complete (``os.replace``), so a reader never sees half a
file and two concurrent writers never share a temporary. A later write to the same target removes
the temporaries of that target whose writer (same host, that pid) no longer runs, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_path(path: PathLike) -> Path:
    """A fresh temporary name beside ``path`` (see the module docstring); the file is not created."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}@{_host()}.tmp")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_stale_temps(path: PathLike) -> list[Path]:
    """Removes the temporaries of ``path`` left by writers of this host that no longer run; returns them."""
    path = Path(path)
    folder = path.parent
    # signal 0 terminates a process on Windows: no liveness test there, so nothing is removed
    if os.name == "nt" or not folder.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)-[0-9a-f]{8}@(.*)\.tmp")
    host, removed = _host(), []
    for entry in folder.iterdir():
        m = pattern.fullmatch(entry.name)
        if m is None or m.group(2) != host or int(m.group(1)) == os.getpid() or _pid_running(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def atomic_write(path: PathLike, write: Callable[[Path], Any], fsync: bool = True) -> Path:
    """Calls ``write(temporary path)``, then renames the temporary over ``path``.

    The parent folder must exist. Stale temporaries of ``path`` are removed first; on any error the
    temporary is removed and the error re-raised, and ``path`` keeps its old content.
    """
    path = Path(path)
    clean_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


class LockedError(RuntimeError):
    """Another process holds the lock of a run folder."""


@contextlib.contextmanager
def folder_lock(folder: PathLike, what: str = "run") -> Iterator[Path]:
    """Holds an exclusive lock on ``folder`` (file ``.raid_fast.lock``) for the ``with`` block.

    The lock is an OS file lock (``flock``), so it dies with its process, even on SIGKILL: a crashed
    run never blocks the next one. Raises :class:`LockedError` naming the holder's pid when another
    process (or another ``with`` block of this one) holds it.
    """
    folder = Path(folder)
    lock = folder / ".raid_fast.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows): no lock, as before
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                msg = (
                    f"{str(folder)!r} is in use by another {what} (pid {holder}); wait for it to finish "
                    f"or use another folder"
                )
                raise LockedError(msg) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{_host()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)


def check_output_file(path: PathLike, name: str) -> Path:
    """Checks, before any compute, that a file can be written at ``path``; creates its parent folders.

    Raises ``IsADirectoryError`` when ``path`` is a folder, ``NotADirectoryError`` /
    ``PermissionError`` when its folder cannot be created or written, each naming ``name``.
    """
    path = Path(path)
    if path.is_dir():
        msg = f"{name} must be a file path, got the folder {str(path)!r}; give a file name inside it"
        raise IsADirectoryError(msg)
    check_output_folder(path.parent, f"the folder of {name}")
    return path


def check_output_folder(folder: PathLike, name: str) -> Path:
    """Creates ``folder`` if needed and checks that files can be created in it (by creating one)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        msg = f"{name} {str(folder)!r} cannot be created: a file stands in its path"
        raise NotADirectoryError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "write-test")
        probe.touch(exist_ok=False)
        probe.unlink()
    except FileExistsError as exc:
        msg = f"{name} {str(folder)!r} cannot be created: a file stands in its path ({exc.filename})"
        raise NotADirectoryError(msg) from exc
    except NotADirectoryError as exc:
        msg = f"{name} {str(folder)!r} cannot be created: a file stands in its path"
        raise NotADirectoryError(msg) from exc
    except PermissionError as exc:
        msg = f"{name} {str(folder)!r} is not writable ({exc.strerror}); choose a folder you can write to"
        raise PermissionError(msg) from exc
    return folder
