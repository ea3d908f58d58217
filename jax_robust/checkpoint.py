"""Checkpoints of a training run (orbax): the TrainState plus a small JSON of where the run is.

The TrainState holds the step; the data order and every per-step key derive from
(seed, epoch, step), so the state and the step are all a run needs to resume exactly.
Checkpoints are written by orbax to a temporary directory and renamed when complete, so a
killed process leaves at most an unfinished temporary directory, which orbax ignores.
After each save, a manifest (size and CRC-32 of every file) goes to
`<directory>/../checkpoint_manifests/<step>.json`; before a restore the files are checked
against it, so a truncated or corrupted checkpoint is found without handing damaged bytes
to orbax. A checkpoint that fails the check or the restore is named in a warning and the
next older one is tried.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jax_robust.errors import CheckpointError


def open_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


def _manifest_dir(manager: ocp.CheckpointManager) -> str:
    return os.path.join(os.path.dirname(str(manager.directory)), "checkpoint_manifests")


def _file_digests(step_dir: str) -> dict[str, list[int]]:
    """{relative path: [size in bytes, CRC-32]} of every file under `step_dir`."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            out[os.path.relpath(path, step_dir)] = [os.path.getsize(path), crc]
    return out


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and the JSON-able `meta` as checkpoint `step` (blocking), then its
    manifest; drops the manifests of checkpoints orbax has deleted."""
    from jax_robust.files import write_json_atomic

    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    if jax.process_index() != 0:
        return
    mdir = _manifest_dir(manager)
    write_json_atomic(os.path.join(mdir, f"{step}.json"),
                      _file_digests(os.path.join(str(manager.directory), str(step))))
    kept = {f"{s}.json" for s in manager.all_steps()}
    for name in os.listdir(mdir):
        if name.endswith(".json") and name not in kept:
            os.remove(os.path.join(mdir, name))


def verify(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises ValueError naming the first file of checkpoint `step` that differs from its
    manifest (a checkpoint without a manifest is not checked)."""
    path = os.path.join(_manifest_dir(manager), f"{step}.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        expected = json.load(f)
    actual = _file_digests(os.path.join(str(manager.directory), str(step)))
    for name, (size, crc) in expected.items():
        if name not in actual:
            raise ValueError(f"file {name} is missing")
        if actual[name][0] != size:
            raise ValueError(f"file {name} has {actual[name][0]} bytes, {size} were written")
        if actual[name][1] != crc:
            raise ValueError(f"file {name} does not match its checksum")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   warn: Callable[[str], None] = print) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest checkpoint that restores, or None if there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) of the state.
    Raises CheckpointError if checkpoints exist but none of them restores.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            verify(manager, step)
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            state = restored["state"]
            if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(
                    abstract_state):
                raise ValueError("its structure does not match the model")
            return state, dict(restored["meta"]), step
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint
            path = os.path.join(str(manager.directory), str(step))
            detail = " ".join(str(e).split())[:200]
            msg = f"checkpoint {path} cannot be restored ({detail})"
            errors.append(msg)
            warn(f"warning: {msg}; trying an older one" if step != steps[-1] else
                 f"warning: {msg}")
    if errors:
        raise CheckpointError(f"no checkpoint in {manager.directory} can be restored: "
                              f"{errors[0]}")
    return None
