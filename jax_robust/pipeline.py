"""Input: the device mesh, batches of this process's rows sharded over it, the epoch order,
padding of short batches, and a host thread that gathers the next batch meanwhile.

Data parallel: one `jax.sharding.Mesh` over all devices with a "data" axis; batches are
sharded on their first axis, parameters and optimizer state are replicated. The same jitted
step runs on 1 or N devices (and N hosts after `jax.distributed.initialize()`).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_robust.errors import UserError


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(mesh: Mesh, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays (this process's rows of the global batch) -> arrays sharded on axis 0."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the n training points in `epoch` (deterministic in seed, epoch)."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def padded_batch(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [size], mask [size]): a short batch is padded by repeating its own points."""
    mask = np.zeros(size, np.float32)
    mask[: len(indices)] = 1.0
    return np.resize(indices, size), mask


def local_rows(mesh: Mesh, size: int) -> slice:
    """This process's rows of a global batch of `size` sharded over `mesh` (all of them in
    a single-process run): the rows its devices hold, which must be contiguous."""
    if jax.process_count() == 1:
        return slice(0, size)
    held = NamedSharding(mesh, P("data")).addressable_devices_indices_map((size,)).values()
    starts = sorted((index[0].start or 0, index[0].stop) for index in held)
    for (_, stop), (start, _) in zip(starts, starts[1:]):
        if stop != start:
            raise ValueError("this process's devices do not hold contiguous rows of the mesh")
    return slice(starts[0][0], starts[-1][1])


def check_batch_size(batch_size: int, num_devices: int, what: str) -> None:
    if batch_size % num_devices:
        raise UserError(f"{what} {batch_size} is not a multiple of the {num_devices} devices")


class TrainBatches:
    """Batch `step` of the training run: this process's rows of the padded global batch of
    the epoch's shuffled order, gathered on the host in a background thread one step ahead.
    Use as a context manager; `get(step)` returns the host arrays x, y, mask."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, steps_per_epoch: int,
                 seed: int, mesh: Mesh):
        self.x, self.y = x, y
        self.batch_size, self.steps_per_epoch, self.seed = batch_size, steps_per_epoch, seed
        self.rows = local_rows(mesh, batch_size)
        self._pool = ThreadPoolExecutor(1)
        self._pending: tuple[int, object] | None = None

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.x), self.seed, epoch)

    def _gather(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        b = self.batch_size
        idx, mask = padded_batch(self._order(epoch)[i * b:(i + 1) * b], b)
        idx, mask = idx[self.rows], mask[self.rows]
        return {"x": self.x[idx], "y": self.y[idx], "mask": mask}

    def get(self, step: int, prefetch_next: bool = True) -> dict[str, np.ndarray]:
        if self._pending is not None and self._pending[0] == step:
            batch = self._pending[1].result()
        else:
            batch = self._gather(step)
        self._pending = (step + 1, self._pool.submit(self._gather, step + 1)) if prefetch_next \
            else None
        return batch

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def eval_batches(n: int, batch_size: int,
                 mesh: Mesh) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """b -> (indices, mask) of this process's rows of evaluation batch b over n examples
    (the global batch padded to `batch_size`, the padding masked 0)."""
    rows = local_rows(mesh, batch_size)

    def batch(b: int):
        idx, mask = padded_batch(np.arange(b * batch_size, min(n, (b + 1) * batch_size)),
                                 batch_size)
        return idx[rows], mask[rows]

    return batch
