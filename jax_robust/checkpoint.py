"""Checkpoints of a training run (orbax): the TrainState plus a small JSON of where the run is.

The TrainState holds the step; the data order and every per-step key derive from
(seed, epoch, step), so the state and the step are all a run needs to resume exactly.
Checkpoints are written by orbax to a temporary directory and renamed when complete, so a
killed process leaves at most an unfinished temporary directory, which orbax ignores.
A checkpoint that fails to restore (truncated, corrupt) is named in a warning and the next
older one is tried.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jax_robust.errors import CheckpointError


def open_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and the JSON-able `meta` as checkpoint `step` (blocking, then complete)."""
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


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
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            state = restored["state"]
            if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(
                    abstract_state):
                raise ValueError("its structure does not match the model")
            return state, dict(restored["meta"]), step
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint
            path = os.path.join(str(manager.directory), str(step))
            msg = f"checkpoint {path} cannot be restored ({type(e).__name__}: {str(e)[:200]})"
            errors.append(msg)
            warn(f"warning: {msg}; trying an older one" if step != steps[-1] else
                 f"warning: {msg}")
    if errors:
        raise CheckpointError(f"no checkpoint in {manager.directory} can be restored: "
                              f"{errors[0]}")
    return None
