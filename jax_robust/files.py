"""Atomic file writes: a temporary file in the same directory, fsync, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import BinaryIO, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

from jax_robust.errors import UserError


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Calls write(f) on a temporary binary file beside `path`, fsyncs it and renames it to
    `path`: readers see the old file or the whole new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def save_figure_atomic(fig, path: str, **savefig_kwargs) -> None:
    """A matplotlib figure to `path` (PNG), atomically."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", **savefig_kwargs))


def save_arrays_atomic(path: str, **arrays) -> None:
    """NumPy arrays to an .npz file at `path`, atomically."""
    import numpy as np

    write_atomic(path, lambda f: np.savez(f, **arrays))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_local_path(path: str, what: str = "workdir") -> None:
    """UserError for a remote URL (gs://, s3://, ...): run directories are written with the
    local file API (atomic renames, file locks), so a bucket must be mounted (gcsfuse, a
    shared POSIX filesystem) and given as the mount's path."""
    if "://" in str(path):
        scheme = str(path).split("://", 1)[0]
        raise UserError(f"{what} {path}: {scheme}:// paths are not supported for run "
                        f"directories; mount the bucket (e.g. gcsfuse) and pass the mount's "
                        f"path")


def ensure_writable_dir(path: str) -> None:
    """Makes directory `path` and probes it with a file; UserError if it is a remote URL or
    cannot be written."""
    check_local_path(path)
    try:
        os.makedirs(path, exist_ok=True)
        # A probe name of its own: processes of one run probe the same directory at once.
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"workdir {path} is not writable: {e.strerror}") from None


LOCK_NAME = ".run.lock"


@contextlib.contextmanager
def exclusive_dir(path: str) -> Iterator[None]:
    """Holds an exclusive lock on run directory `path` (its file .run.lock, with this pid)
    while the block runs; UserError at once if another process holds it. The OS releases the
    lock when the process ends, however it ends, so a killed run leaves no stale lock."""
    check_local_path(path)
    os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, LOCK_NAME), "a+")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                raise UserError(f"{path} is in use by another run (pid {holder}); wait for it "
                                f"to end or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock
