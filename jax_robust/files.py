"""Atomic file writes: a temporary file in the same directory, fsync, then rename."""

from __future__ import annotations

import json
import os
import tempfile

from jax_robust.errors import UserError


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` so that readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def ensure_writable_dir(path: str) -> None:
    """Makes directory `path` and probes it with a file; UserError if it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"workdir {path} is not writable: {e.strerror}") from None
