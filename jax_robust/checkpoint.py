"""Checkpoints of a training run (orbax): the TrainState plus a small JSON of where the run is.

The TrainState holds the step; the data order and every per-step key derive from
(seed, epoch, step), so the state and the step are all a run needs to resume exactly.
Checkpoints are written by orbax to a temporary directory and renamed when complete, so a
killed process leaves at most an unfinished temporary directory, which orbax ignores.
After each save, the step's integrity data (size and CRC-32 of every file) go INTO the step
directory (`<step>/integrity.json`), so they travel with it; before a restore the files are
checked against them, so a truncated or corrupted checkpoint is found without handing damaged
bytes to orbax. A checkpoint without integrity data is not trusted. Over several processes
every process takes part in each save and restore (orbax), process 0 writes and checks the
integrity data and its verdict holds for all. A checkpoint that fails
the check or the restore is moved aside to `<directory>_corrupt/<step>` (kept for
inspection, named in a warning) and the next older one is tried; the run then saves that
step anew.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jax_robust.distributed import barrier, broadcast_from_primary, is_primary
from jax_robust.errors import CheckpointError


def open_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


INTEGRITY_FILE = "integrity.json"


def _directory(manager) -> str:
    """The checkpoints' directory of a CheckpointManager, or a path given as is."""
    return manager if isinstance(manager, str) else str(manager.directory)


def _legacy_manifest(manager, step: int) -> str:
    """Where checkpoints of earlier versions kept their manifests (a sibling folder)."""
    return os.path.join(os.path.dirname(_directory(manager)), "checkpoint_manifests",
                        f"{step}.json")


def _step_dir(manager, step: int) -> str:
    return os.path.join(_directory(manager), str(step))


def _file_digests(step_dir: str) -> dict[str, list[int]]:
    """{relative path: [size in bytes, CRC-32]} of every file under `step_dir` but the
    integrity file itself."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.relpath(path, step_dir) == INTEGRITY_FILE:
                continue
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            out[os.path.relpath(path, step_dir)] = [os.path.getsize(path), crc]
    return out


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and the JSON-able `meta` as checkpoint `step` (blocking), then its
    integrity data inside the step directory."""
    from jax_robust.files import write_json_atomic

    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    if is_primary():
        step_dir = _step_dir(manager, step)
        write_json_atomic(os.path.join(step_dir, INTEGRITY_FILE),
                          {"files": _file_digests(step_dir)})


def _expected_digests(manager, step: int) -> dict:
    path = os.path.join(_step_dir(manager, step), INTEGRITY_FILE)
    legacy = _legacy_manifest(manager, step)
    if not os.path.exists(path) and os.path.exists(legacy):
        path = legacy
    try:
        with open(path) as f:
            data = json.load(f)
        files = data["files"] if path != legacy else data
        if not isinstance(files, dict) or not all(
                isinstance(v, list) and len(v) == 2 for v in files.values()):
            raise ValueError
    except FileNotFoundError:
        raise ValueError("it has no integrity data (written by another program, or a save "
                         "was cut short)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError("its integrity data are unreadable") from None
    if not files:
        raise ValueError("its integrity data list no files")
    return files


def verify(manager, step: int) -> None:
    """Raises ValueError naming the first file of checkpoint `step` (of a manager, or of a
    checkpoints directory given as a path) that differs from its integrity data, is not
    listed there, or saying that they are missing, unreadable or list no files."""
    expected = _expected_digests(manager, step)
    actual = _file_digests(_step_dir(manager, step))
    unlisted = sorted(set(actual) - set(expected))
    if unlisted:
        raise ValueError(f"file {unlisted[0]} is not in its integrity data")
    for name, (size, crc) in expected.items():
        if name not in actual:
            raise ValueError(f"file {name} is missing")
        if actual[name][0] != size:
            raise ValueError(f"file {name} has {actual[name][0]} bytes, {size} were written")
        if actual[name][1] != crc:
            raise ValueError(f"file {name} does not match its checksum")


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves checkpoint `step` to `<directory>_corrupt/<step>[-<time>]`; returns the path."""
    target = os.path.join(f"{manager.directory}_corrupt", str(step))
    if os.path.exists(target):
        target += f"-{int(time.time())}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(_step_dir(manager, step), target)
    manager.reload()
    return target


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   warn: Callable[[str], None] = print) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest checkpoint that verifies and restores, or None if
    there is none. Each one that does not is moved aside (`move_aside`) with a warning.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) of the state.
    Raises CheckpointError if checkpoints existed but none of them restores.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            # Process 0's check of the files is every process's verdict (one decision).
            problem = None
            if is_primary():
                try:
                    verify(manager, step)
                except ValueError as e:
                    problem = str(e)
            if broadcast_from_primary(problem is not None):
                raise ValueError(problem or "process 0 found it damaged")
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            state = restored["state"]
            if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(
                    abstract_state):
                raise ValueError("its structure does not match the model")
            return state, dict(restored["meta"]), step
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint
            path = _step_dir(manager, step)
            detail = " ".join(str(e).split())[:200]
            msg = f"checkpoint {path} cannot be restored ({detail})"
            if is_primary():
                msg += f"; moved to {move_aside(manager, step)}"
            barrier(f"jax_robust-checkpoint-{step}-moved")
            if not is_primary():
                manager.reload()
            errors.append(msg)
            warn(f"warning: {msg}; trying an older one" if step != steps[-1] else
                 f"warning: {msg}")
    if errors:
        raise CheckpointError(f"no checkpoint in {manager.directory} can be restored: "
                              f"{errors[0]}")
    return None


def newest_meta(manager) -> dict:
    """The JSON metadata of the newest checkpoint (of a manager, or of a checkpoints directory
    given as a path) whose files pass their integrity check, read from its file (no JAX or
    orbax call: usable before JAX starts); CheckpointError if none. Damaged checkpoints are
    skipped here: restore_latest names and moves them."""
    directory = _directory(manager)
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
        directory) else []
    if not steps:
        raise CheckpointError(f"{directory} holds no checkpoints")
    for step in sorted(steps, reverse=True):
        try:
            verify(manager, step)
            with open(os.path.join(_step_dir(manager, step), "meta", "metadata")) as f:
                meta = json.load(f)
            if isinstance(meta, dict):
                return meta
        except (OSError, ValueError):
            continue
    raise CheckpointError(f"no checkpoint in {manager.directory} passes its integrity check "
                          f"with readable metadata")
