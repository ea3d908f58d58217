"""l_inf separation of labelled data and the theorem's distance classifier (docs/paper.md, sections 3-4).

Every answer is an exact brute force over point pairs (no approximate search):

  train_train_distance          Table 1's Train-Train: for each point of a labelled set, the
                                l_inf distance to the closest point of ANOTHER label in the same
                                set, and its index; each such pair is computed once.
  nearest_other_label_distance  the same for queries against a reference set (Test-Train; with
                                `exclude_self=True` and the set against itself, Train-Train).
  class_nearest                 for each query and each class c, the distance to the closest
                                reference point of class c and its index: [Nq, C] each.
  distance_classifier           the theorem's g(x) = argmin_c dist(x, X^(c)) and its exact
                                certified radius (second-smallest class distance - smallest) / 2.
  certified_accuracy            accuracy and certified astuteness at eps of g.
  separation_summary            minimum, quantiles, mean, points closer than 2 eps, closest pairs.

Two arithmetic paths, chosen by the input dtype:
  uint8  exact integer grey levels: |a - b| = max(a, b) - min(a, b) in uint8 (no wraparound),
         64 lanes per AVX-512 register. Distances come back as int32 grey levels; divide by the
         data set's `levels` (255 for 8-bit images) for pixel units.
  float  float32 |a - b| then max, the operations NumPy does, so results equal NumPy's bit for
         bit. Distances come back as float32 pixel units. Slower than uint8 (docs/performance.md,
         section 4: 152 s against 23 s).
Ties: among points at the same distance the smallest index wins (np.argmin's rule).

How (memory O(block^2 + N), never N x N x D): points are sorted by class and each class padded
to whole blocks, so a block holds one class. Blocks are stored transposed, [D, block], so one
pixel of 64 points fills a vector register. A tile is [query block, reference block] distances,
built by a `fori_loop` over chunks of `dim_chunk` pixels whose body is one fused elementwise
expression (the max of `dim_chunk` absolute differences): the accumulator stays in cache and no
reduction op runs over pixels (see the XLA note). Each tile is folded into running minima whose
uint8 form packs distance and index into one int32, so one integer min finds both.
Queries x references: a `lax.scan` over reference blocks inside a `lax.map` over query blocks,
the queries sharded over the devices of a `jax.sharding.Mesh` (axis "q", `jax.shard_map`).
Train-train: the list of block pairs (I, J) with class(I) < class(J) is split over the devices;
each tile updates the minima of both blocks' points. A host loop over jitted calls reports
progress (`stderr_progress`). Block sizes (`Tiling`) change speed, never results. Over several
processes (jax_robust.distributed) the default mesh spans every process's devices; each
process passes the same inputs and gets the whole result.

Speed: docs/performance.md (section 4) has the measured figures and commands. On CPU the query
axis is spread over one XLA device per core (experiments/separation.py sets
--xla_force_host_platform_device_count=<cores>), which was faster than one device with XLA's
intra-op threads.

XLA:CPU note (jaxlib 0.10.2): the YNNPACK "reduce" library fusion miscompiles a uint8 subtract
fused into a max-reduction over a non-minor axis (`max(max(a, b) - min(a, b), axis=1)` returned
most entries wrong; correct with --xla_cpu_experimental_ynn_fusion_type=). The tile uses only
elementwise ops inside its loop, which is correct under any XLA_FLAGS and the fastest form
measured; tests check both paths against NumPy. A `dim_chunk` below 16 makes XLA:CPU emit much
slower code (docs/history.md; cause not found).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_robust.distributed import to_host
from jax_robust.errors import Interrupted

AXIS = "q"
# Distance of "no such point" (an empty class, or no point of another label): int path.
NO_POINT_INT = np.iinfo(np.int32).max
NO_INDEX = -1


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes of the brute force: they change speed and memory, never results.

    query_block:     queries per tile (the tile's rows).
    ref_block:       reference points per tile (the tile's columns, the vector lanes); also the
                     block of `train_train_distance`'s square tiles.
    dim_chunk:       pixels fused into one loop step; D is zero-padded to a multiple of it.
    blocks_per_call: query blocks per device in one jitted call (one progress step).
    A field left None takes its default for the input dtype (DEFAULT_TILING, measured on the
    2-core CPU: float32 tiles hold 4x the bytes, so smaller ones fit the cache better). Small
    inputs shrink the blocks further.
    """

    query_block: int | None = None
    ref_block: int | None = None
    dim_chunk: int | None = None
    blocks_per_call: int | None = None


DEFAULT_TILING = {
    "uint8": Tiling(query_block=256, ref_block=512, dim_chunk=32, blocks_per_call=8),
    "float32": Tiling(query_block=128, ref_block=256, dim_chunk=16, blocks_per_call=8),
}


def _with_defaults(tiling: Tiling, dtype) -> Tiling:
    default = DEFAULT_TILING[np.dtype(dtype).name]
    return Tiling(*(getattr(tiling, f.name) if getattr(tiling, f.name) is not None
                    else getattr(default, f.name) for f in dataclasses.fields(Tiling)))


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each jitted call."""

    tiles_done: int  # tiles (a block of queries x a block of references) computed so far
    tiles_total: int
    pairs_per_tile: int  # padding included: the work the machine does
    dims: int  # values per point, padding excluded
    elapsed_s: float

    @property
    def pair_dims_per_s(self) -> float:
        return self.tiles_done * self.pairs_per_tile * self.dims / max(self.elapsed_s, 1e-9)

    @property
    def eta_s(self) -> float:
        return (self.tiles_total - self.tiles_done) * self.elapsed_s / max(self.tiles_done, 1)


def stderr_progress(label: str, min_interval_s: float = 10.0) -> Callable[[Progress], None]:
    """A progress callback printing
    '<label>: tiles 1200/6480 (256 x 320 pairs), 1.3e+11 pair-dims/s, elapsed 9 s, ETA 40 s'.

    Prints at most every `min_interval_s` seconds, and always after the last call.
    """
    last = {"t": -np.inf}  # state local to this callback

    def report(p: Progress) -> None:
        now = time.monotonic()
        if p.tiles_done < p.tiles_total and now - last["t"] < min_interval_s:
            return
        last["t"] = now
        sys.stderr.write(
            f"{label}: tiles {p.tiles_done}/{p.tiles_total} ({p.pairs_per_tile} pairs each), "
            f"{p.pair_dims_per_s:.3g} pair-dims/s, elapsed {p.elapsed_s:.0f} s, "
            f"ETA {p.eta_s:.0f} s\n"
        )
        sys.stderr.flush()

    return report


# ----------------------------------------------------------------------------- the tile


def _abs_diff(a: jax.Array, b: jax.Array) -> jax.Array:
    """|a - b| elementwise; exact for unsigned integers (no wraparound)."""
    if jnp.issubdtype(a.dtype, jnp.unsignedinteger):
        return jnp.maximum(a, b) - jnp.minimum(a, b)
    return jnp.abs(a - b)


def tile_distances(q_t: jax.Array, r_t: jax.Array, dim_chunk: int) -> jax.Array:
    """All l_inf distances between two blocks of points, stored transposed.

    q_t: [Dp, bq] queries, r_t: [Dp, br] references, same dtype; Dp a multiple of `dim_chunk`.
    Returns [bq, br] distances in the input dtype (grey levels for uint8).
    """
    dp, bq = q_t.shape
    br = r_t.shape[1]

    def body(c, acc):
        start = c * dim_chunk
        qs = lax.dynamic_slice_in_dim(q_t, start, dim_chunk, axis=0)
        rs = lax.dynamic_slice_in_dim(r_t, start, dim_chunk, axis=0)
        m = _abs_diff(qs[0][:, None], rs[0][None, :])
        for t in range(1, dim_chunk):  # unrolled: one fused elementwise expression
            m = jnp.maximum(m, _abs_diff(qs[t][:, None], rs[t][None, :]))
        return jnp.maximum(acc, m)

    return lax.fori_loop(0, dp // dim_chunk, body, jnp.zeros((bq, br), q_t.dtype))


# ----------------------------------------------------------------------------- tile minima
#
# A running minimum keeps, for each point, the smallest distance and the smallest reference
# index attaining it (np.argmin's tie rule). uint8 path: distance (<= 255) and index share one
# int32 key, key = distance << INDEX_BITS | index, so one integer min does both. float path: a
# (distance, index) pair, merged lexicographically.

INDEX_BITS = 22  # reference indices below 2**22 = 4,194,304 on the uint8 path
NO_KEY = 256 << INDEX_BITS  # above every real key (distances are at most 255)
NO_INDEX_KEY = np.iinfo(np.int32).max  # index slot of "none" on the float path


def _tile_min(d, index, axis, exclude=None):
    """Minimum over `axis` of a tile and the smallest index attaining it.

    d: [a, b] distances (uint8 or float32); index: int32 broadcastable to d, the reference index
    of each entry; exclude: bool like d or None (entries to skip). Returns an int32 key [n]
    (uint8) or a (float32 distance [n], int32 index [n]) pair (float).
    """
    if jnp.issubdtype(d.dtype, jnp.integer):
        key = (d.astype(jnp.int32) << INDEX_BITS) | index
        if exclude is not None:
            key = jnp.where(exclude, NO_KEY, key)
        return jnp.min(key, axis=axis)
    if exclude is not None:
        d = jnp.where(exclude, jnp.inf, d)
    dmin = jnp.min(d, axis=axis)
    at_min = d == jnp.expand_dims(dmin, axis)
    return dmin, jnp.min(jnp.where(at_min, index, NO_INDEX_KEY), axis=axis)


def _merge(best, new):
    """Elementwise min of two running minima (keys, or (distance, index) pairs)."""
    if not isinstance(best, tuple):
        return jnp.minimum(best, new)
    (bd, bi), (nd, ni) = best, new
    better = (nd < bd) | ((nd == bd) & (ni < bi))
    return jnp.where(better, nd, bd), jnp.where(better, ni, bi)


def _where(mask, a, b):
    return jax.tree.map(lambda u, v: jnp.where(mask, u, v), a, b)


def _no_minimum(shape, is_int):
    if is_int:
        return jnp.full(shape, NO_KEY, jnp.int32)
    return jnp.full(shape, jnp.inf, jnp.float32), jnp.full(shape, NO_INDEX_KEY, jnp.int32)


def _decode(best, is_int):
    """Running minima -> (distance, index); index NO_INDEX where none, distance 256 / inf."""
    if is_int:
        index = jnp.where(best == NO_KEY, NO_INDEX, best & ((1 << INDEX_BITS) - 1))
        return best >> INDEX_BITS, index
    dist, index = best
    return dist, jnp.where(index == NO_INDEX_KEY, NO_INDEX, index)


# ----------------------------------------------------------------------------- queries x refs
#
# References are sorted by class (stable) and each class is padded to whole blocks by repeating
# its last point (same index), so every block holds ONE class: a tile updates one column of the
# running [bq, C] minimum with one row-minimum, whatever C is, and a repeated point, at the same
# distance and index as its original, changes nothing.


def _device_class_nearest(xq, q_index, ref_t, ref_index, block_class, *, num_classes,
                          exclude_self, tiling):
    """One device's share: queries xq [n, Dp] (n = blocks * bq) against every reference block.

    ref_t [nb, Dp, br] transposed single-class blocks, ref_index [nb, br] their indices,
    block_class [nb]. Returns (dist [n, C], index [n, C]), as `_decode`.
    """
    bq = tiling.query_block
    n, dp = xq.shape
    is_int = jnp.issubdtype(xq.dtype, jnp.integer)
    q_blocks = xq.reshape(n // bq, bq, dp).transpose(0, 2, 1)  # [blocks, Dp, bq]
    q_index_blocks = q_index.reshape(n // bq, bq)
    classes = jnp.arange(num_classes)

    def one_query_block(args):
        q_t, qi = args

        def step(best, ref):
            r_t, r_index, r_class = ref
            d = tile_distances(q_t, r_t, tiling.dim_chunk)
            same = (r_index[None, :] == qi[:, None]) if exclude_self else None
            new = _tile_min(d, r_index[None, :], axis=1, exclude=same)  # [bq]
            column = (classes == r_class)[None, :]
            expanded = jax.tree.map(lambda v: v[:, None], new)
            return _where(column, _merge(best, expanded), best), None

        best, _ = lax.scan(step, _no_minimum((bq, num_classes), is_int),
                           (ref_t, ref_index, block_class))
        return best

    dist, index = _decode(lax.map(one_query_block, (q_blocks, q_index_blocks)), is_int)
    return dist.reshape(n, num_classes), index.reshape(n, num_classes)


@functools.partial(jax.jit, static_argnames=("num_classes", "exclude_self", "tiling", "mesh"))
def _class_nearest_call(xq, q_index, ref_t, ref_index, block_class, *, num_classes,
                        exclude_self, tiling, mesh):
    body = functools.partial(_device_class_nearest, num_classes=num_classes,
                             exclude_self=exclude_self, tiling=tiling)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P(), P()),
                         out_specs=P(AXIS), check_vma=False)(
                             xq, q_index, ref_t, ref_index, block_class)


# ----------------------------------------------------------------------------- train-train
#
# One set against itself: d(i, j) = d(j, i), so each pair of single-class blocks (I, J) with
# class(I) < class(J) is computed once, and its tile feeds both the row minima (I's points,
# nearest in J) and the column minima (J's points, nearest in I): about half the work of
# queries x references, and none of it on same-class pairs. The list of block pairs is split
# evenly over the devices; each keeps a running minimum for every point, merged at the end.


def _device_train_train(pair_i, pair_j, pair_valid, best, blocks_t, block_index, *, tiling):
    """One device's share of the block pairs.

    pair_i, pair_j [k] block numbers, pair_valid [k] (False = padding); best: this device's
    running minima [1, P] over all P sorted positions (keys, or a (distance, index) pair);
    blocks_t [nb, Dp, b] transposed blocks; block_index [nb, b] original indices.
    """
    b = blocks_t.shape[2]
    best = jax.tree.map(lambda v: v[0], best)

    def update(best, block, new, valid):
        start = block * b
        current = jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, start, b), best)
        merged = _where(valid, _merge(current, new), current)
        return jax.tree.map(lambda v, m: lax.dynamic_update_slice_in_dim(v, m, start, 0),
                            best, merged)

    def step(best, pair):
        i, j, valid = pair
        d = tile_distances(blocks_t[i], blocks_t[j], tiling.dim_chunk)  # [b (I), b (J)]
        rows = _tile_min(d, block_index[j][None, :], axis=1)  # I's points: nearest in J
        cols = _tile_min(d, block_index[i][:, None], axis=0)  # J's points: nearest in I
        return update(update(best, i, rows, valid), j, cols, valid), None

    best, _ = lax.scan(step, best, (pair_i, pair_j, pair_valid))
    return jax.tree.map(lambda v: v[None], best)


@functools.partial(jax.jit, static_argnames=("tiling", "mesh"), donate_argnames=("best",))
def _train_train_call(pair_i, pair_j, pair_valid, best, blocks_t, block_index, *, tiling, mesh):
    body = functools.partial(_device_train_train, tiling=tiling)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS),) * 4 + (P(), P()),
                         out_specs=P(AXIS), check_vma=False)(
                             pair_i, pair_j, pair_valid, best, blocks_t, block_index)


# ----------------------------------------------------------------------------- host side


def default_mesh() -> Mesh:
    """A 1-D mesh over every device, axis "q" (the work is split over it)."""
    return Mesh(np.array(jax.devices()), (AXIS,))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _flatten(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading point axis, got shape {x.shape}")
    x = x.reshape(len(x), -1)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    raise ValueError(f"{name} must be uint8 (grey levels) or floating, got {x.dtype}")


def _check_refs(x_ref: np.ndarray, y_ref, num_classes: int | None) -> tuple[np.ndarray, int]:
    y_ref = np.asarray(y_ref)
    if y_ref.shape != (len(x_ref),):
        raise ValueError(f"labels must have shape ({len(x_ref)},), got {y_ref.shape}")
    if num_classes is None:
        num_classes = int(y_ref.max(initial=0)) + 1
    if len(y_ref) and (y_ref.min() < 0 or y_ref.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if x_ref.dtype == np.uint8 and len(x_ref) > (1 << INDEX_BITS):
        raise ValueError(f"at most {1 << INDEX_BITS} reference points on the uint8 path")
    return y_ref.astype(np.int32), num_classes


def _fit_tiling(tiling: Tiling, dtype, n_query: int, class_counts: np.ndarray, dims: int,
                n_dev: int) -> Tiling:
    """Fills defaults for `dtype`, then shrinks blocks for small inputs (less padding); never
    changes results. The reference block is the multiple of 64 in [ref_block / 2, ref_block]
    that pads the classes least (each class is padded to whole blocks), the largest on ties.
    """
    tiling = _with_defaults(tiling, dtype)
    per_dev = -(-n_query // n_dev)
    query_block = min(tiling.query_block, _round_up(max(per_dev, 1), 8))
    blocks = min(tiling.blocks_per_call, -(-per_dev // query_block))
    largest = int(class_counts.max()) if len(class_counts) else 1
    top = min(tiling.ref_block, _round_up(max(largest, 1), 64))
    candidates = range(top, max(top // 2, 64) - 1, -64) if top >= 64 else [top]
    ref_block = min(candidates, key=lambda b: sum(_round_up(int(n), b) for n in class_counts))
    dim_chunk = min(tiling.dim_chunk, dims)
    return Tiling(query_block, ref_block, dim_chunk, max(blocks, 1))


def _class_blocks(y_ref: np.ndarray, num_classes: int, block: int):
    """Sorted, padded order: (index [nb * block] into the set, block class [nb]).

    Class c's points in index order, then its last point repeated up to a whole block.
    """
    order, block_class = [np.zeros((0,), np.int32)], []
    for c in range(num_classes):
        members = np.flatnonzero(y_ref == c)
        if len(members) == 0:
            continue
        n_blocks = -(-len(members) // block)
        padded = np.full(n_blocks * block, members[-1], np.int32)
        padded[: len(members)] = members
        order.append(padded)
        block_class += [c] * n_blocks
    return np.concatenate(order), np.asarray(block_class, np.int32)


def _transposed_blocks(x: np.ndarray, order: np.ndarray, block: int, dp: int) -> np.ndarray:
    """x[order] as [nb, Dp, block]: a block's pixel k is one contiguous row of `block` values."""
    nb = len(order) // block
    out = np.zeros((nb * block, dp), x.dtype)
    out[:, : x.shape[1]] = x[order]
    return np.ascontiguousarray(out.reshape(nb, block, dp).transpose(0, 2, 1))


def class_nearest(x_query, x_ref, y_ref, num_classes: int | None = None, *,
                  exclude_self: bool = False, tiling: Tiling = Tiling(),
                  mesh: Mesh | None = None, progress: Callable[[Progress], None] | None = None,
                  should_stop: Callable[[], bool] | None = None):
    """Per-class nearest l_inf distance from each query to the reference points.

    x_query: [Nq, ...] and x_ref: [Nr, ...], both uint8 (grey levels) or both floating (finite);
    y_ref: [Nr] ints in [0, num_classes) (default: max label + 1). exclude_self: the query with
    index i skips the reference point with index i (x_query is x_ref or its first Nq points).
    Returns (dist [Nq, C], index [Nq, C]): int32 grey levels (uint8 input; NO_POINT_INT where a
    class has no point) or float32 pixel units (float input; inf), and int32 indices into x_ref
    (-1 where none). Ties go to the smallest index. `should_stop`: a poll before each jitted
    call (one call at a time is in flight); when true, `errors.Interrupted` is raised.
    """
    xq = _flatten(x_query, "x_query")
    xr = _flatten(x_ref, "x_ref")
    if xq.dtype != xr.dtype:
        raise ValueError(f"x_query is {xq.dtype} but x_ref is {xr.dtype}; pass both uint8 or "
                         "both float")
    if xq.shape[1] != xr.shape[1]:
        raise ValueError(f"points differ in size: {xq.shape[1]} vs {xr.shape[1]} values")
    y_ref, num_classes = _check_refs(xr, y_ref, num_classes)
    is_int = xq.dtype == np.uint8
    nq, dims = xq.shape
    out_d = np.full((nq, num_classes), NO_POINT_INT if is_int else np.inf,
                    np.int32 if is_int else np.float32)
    out_i = np.full((nq, num_classes), NO_INDEX, np.int32)
    if nq == 0 or len(xr) == 0:
        return out_d, out_i
    mesh = mesh or default_mesh()
    n_dev = mesh.size
    tiling = _fit_tiling(tiling, xq.dtype, nq, np.bincount(y_ref, minlength=num_classes),
                         dims, n_dev)
    dp = _round_up(dims, tiling.dim_chunk)
    order, block_class = _class_blocks(y_ref, num_classes, tiling.ref_block)
    nb, br = len(block_class), tiling.ref_block
    replicated = NamedSharding(mesh, P())
    by_query = NamedSharding(mesh, P(AXIS))
    refs = [jax.device_put(a, replicated) for a in (
        _transposed_blocks(xr, order, br, dp), order.reshape(nb, br), block_class)]

    chunk = n_dev * tiling.blocks_per_call * tiling.query_block
    calls = -(-nq // chunk)
    tiles_per_call = n_dev * tiling.blocks_per_call * nb
    start_time = time.monotonic()
    for call in range(calls):
        _poll(should_stop, call, calls)
        lo, hi = call * chunk, min((call + 1) * chunk, nq)
        q = np.zeros((chunk, dp), xq.dtype)
        q[: hi - lo, :dims] = xq[lo:hi]
        q_index = np.arange(lo, lo + chunk, dtype=np.int32)
        d, i = _class_nearest_call(
            jax.device_put(q, by_query), jax.device_put(q_index, by_query), *refs,
            num_classes=num_classes, exclude_self=exclude_self, tiling=tiling, mesh=mesh)
        d, i = to_host(d)[: hi - lo], to_host(i)[: hi - lo]
        out_i[lo:hi] = i
        out_d[lo:hi] = np.where(i >= 0, d, out_d[lo:hi])
        if progress is not None:
            progress(Progress((call + 1) * tiles_per_call, calls * tiles_per_call,
                              tiling.query_block * br, dims, time.monotonic() - start_time))
    return out_d, out_i


def other_label_from_class_nearest(class_dist: np.ndarray, class_index: np.ndarray,
                                   y_query: np.ndarray):
    """Nearest point of another label from per-class results.

    class_dist, class_index: [Nq, C] from `class_nearest`; y_query: [Nq] labels.
    Returns (dist [Nq], index [Nq]); among equal distances the smallest index wins.
    """
    num_classes = class_dist.shape[1]
    y_query = np.asarray(y_query)
    own = np.arange(num_classes)[None, :] == y_query[:, None]
    big = NO_POINT_INT if np.issubdtype(class_dist.dtype, np.integer) else np.inf
    d = np.where(own, big, class_dist)
    dmin = d.min(axis=1)
    idx = np.where((d == dmin[:, None]) & ~own & (class_index >= 0), class_index,
                   np.iinfo(np.int32).max).min(axis=1)
    idx = np.where(idx == np.iinfo(np.int32).max, NO_INDEX, idx).astype(np.int32)
    return dmin, idx


def nearest_other_label_distance(x_query, y_query, x_ref, y_ref, exclude_self: bool = False, *,
                                 num_classes: int | None = None, tiling: Tiling = Tiling(),
                                 mesh: Mesh | None = None,
                                 progress: Callable[[Progress], None] | None = None,
                                 should_stop: Callable[[], bool] | None = None):
    """For each query, the l_inf distance to the nearest reference point of ANOTHER label.

    x_query [Nq, ...], y_query [Nq]; x_ref [Nr, ...], y_ref [Nr]; images both uint8 (exact grey
    levels) or both floating. exclude_self: skip reference i for query i (train-train; matters
    only for duplicates with different labels, same-label points are skipped anyway). For a set
    against itself `train_train_distance` gives the same answer with half the work.
    Returns (dist [Nq], index [Nq] into x_ref): int32 grey levels for uint8 (divide by the data
    set's `levels`), float32 pixel units for float. No point of another label: NO_POINT_INT or
    inf, index -1. Among equal distances the smallest index wins.
    """
    y_query = np.asarray(y_query)
    if y_query.shape != (len(np.asarray(x_query)),):
        raise ValueError(f"y_query must have one label per query, got shape {y_query.shape}")
    if num_classes is None:
        num_classes = int(max(y_query.max(initial=0), np.asarray(y_ref).max(initial=0))) + 1
    class_dist, class_index = class_nearest(
        x_query, x_ref, y_ref, num_classes, exclude_self=exclude_self, tiling=tiling, mesh=mesh,
        progress=progress, should_stop=should_stop)
    return other_label_from_class_nearest(class_dist, class_index, y_query)


def _poll(should_stop: Callable[[], bool] | None, call: int, calls: int) -> None:
    """Raises Interrupted when `should_stop` says so (before jitted call `call` of `calls`)."""
    if should_stop is not None and should_stop():
        raise Interrupted(f"stopped during the distance scan (call {call + 1} of {calls}); "
                          f"nothing was written, rerun to compute it")


def _block_pairs(block_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block pairs (I, J) with class(I) < class(J), I-major (consecutive tiles share I)."""
    i, j = np.nonzero(block_class[:, None] < block_class[None, :])
    return i.astype(np.int32), j.astype(np.int32)


def train_train_distance(x, y, *, num_classes: int | None = None, tiling: Tiling = Tiling(),
                         mesh: Mesh | None = None, calls: int = 20,
                         progress: Callable[[Progress], None] | None = None,
                         should_stop: Callable[[], bool] | None = None):
    """Table 1's Train-Train: for each point, the nearest point of ANOTHER label in the same set.

    Same answer as `nearest_other_label_distance(x, y, x, y, exclude_self=True)`, but each pair
    of points with different labels is computed once (about 0.45 of the N^2 pairs with ten
    balanced classes, against N^2). x: [N, ...] uint8 or floating; y: [N] ints. The pair list
    is cut into `calls` jitted calls (progress steps). Returns (dist [N], index [N]) as
    `nearest_other_label_distance`; among equal distances the smallest index wins.
    `should_stop`: a poll before each call (one in flight); true -> `errors.Interrupted`.
    """
    x = _flatten(x, "x")
    y, num_classes = _check_refs(x, y, num_classes)
    is_int = x.dtype == np.uint8
    n, dims = x.shape
    out_d = np.full(n, NO_POINT_INT if is_int else np.inf, np.int32 if is_int else np.float32)
    out_i = np.full(n, NO_INDEX, np.int32)
    mesh = mesh or default_mesh()
    n_dev = mesh.size
    tiling = _fit_tiling(tiling, x.dtype, n, np.bincount(y, minlength=num_classes), dims,
                         n_dev)
    b = tiling.ref_block
    dp = _round_up(dims, tiling.dim_chunk)
    order, block_class = _class_blocks(y, num_classes, b)
    pair_i, pair_j = _block_pairs(block_class)
    if len(pair_i) == 0:
        return out_d, out_i
    replicated = NamedSharding(mesh, P())
    by_device = NamedSharding(mesh, P(AXIS))
    blocks_t = jax.device_put(_transposed_blocks(x, order, b, dp), replicated)
    block_index = jax.device_put(order.reshape(-1, b), replicated)

    per_call = n_dev * max(1, -(-len(pair_i) // (n_dev * max(calls, 1))))
    n_calls = -(-len(pair_i) // per_call)
    pad = n_calls * per_call - len(pair_i)
    pair_i, pair_j = np.pad(pair_i, (0, pad)), np.pad(pair_j, (0, pad))
    valid = np.arange(len(pair_i)) < len(pair_i) - pad
    best = jax.device_put(jax.tree.map(np.asarray, _no_minimum((n_dev, len(order)), is_int)),
                          by_device)
    start_time = time.monotonic()
    for call in range(n_calls):
        _poll(should_stop, call, n_calls)
        part = slice(call * per_call, (call + 1) * per_call)
        best = _train_train_call(*(jax.device_put(a[part], by_device)
                                   for a in (pair_i, pair_j, valid)),
                                 best, blocks_t, block_index, tiling=tiling, mesh=mesh)
        if progress is not None or should_stop is not None:
            jax.block_until_ready(best)
        if progress is not None:
            progress(Progress(min((call + 1) * per_call, len(valid) - pad), len(valid) - pad,
                              b * b, dims, time.monotonic() - start_time))
    dist, index = _combine_devices(jax.tree.map(to_host, best), is_int)
    first = np.ones(len(order), bool)  # each point's own position, not its repeats
    first[1:] = order[1:] != order[:-1]
    found = index[first] >= 0
    out_i[order[first]] = index[first]
    out_d[order[first]] = np.where(found, dist[first], out_d[order[first]])
    return out_d, out_i


def _combine_devices(best, is_int):
    """Per-device running minima [n_dev, P] -> (dist [P], index [P]) on the host."""
    if is_int:
        key = best.min(axis=0)
        index = np.where(key == NO_KEY, NO_INDEX, key & ((1 << INDEX_BITS) - 1))
        return (key >> INDEX_BITS).astype(np.int32), index.astype(np.int32)
    dist, index = best
    pick = np.lexsort((index, dist), axis=0)[0]  # smallest distance, then smallest index
    cols = np.arange(dist.shape[1])
    dist, index = dist[pick, cols], index[pick, cols]
    return dist, np.where(index == NO_INDEX_KEY, NO_INDEX, index).astype(np.int32)


# ----------------------------------------------------------------------------- the classifier


def distance_classifier(class_dist: np.ndarray):
    """The theorem's classifier g(x) = argmin_c dist(x, X^(c)) and its certified radius.

    class_dist: [Nq, C] per-class nearest distances (any units). Returns (pred [Nq] int, radius
    [Nq] float64, same units): radius = (second smallest - smallest) / 2, computed exactly for
    integer input (a multiple of 1/2). Each dist(., X^(c)) is 1-Lipschitz in l_inf, so g keeps
    its prediction at every x' with ||x' - x||_inf < radius; at exactly `radius` a tie between
    two classes is possible. Ties in the argmin go to the smaller class index (radius 0).
    """
    class_dist = np.asarray(class_dist)
    pred = np.argmin(class_dist, axis=1)
    if class_dist.shape[1] < 2:
        return pred, np.full(len(class_dist), np.inf)
    two = np.partition(class_dist.astype(np.float64), 1, axis=1)[:, :2]
    return pred, (two[:, 1] - two[:, 0]) / 2.0


def certified_mask(radius: np.ndarray, eps: float, levels: int | None = None) -> np.ndarray:
    """radius > eps, elementwise (STRICT: see `certified_accuracy`).

    radius: [N] from `distance_classifier`, in grey levels when `levels` is given (then the
    comparison is exact: 2 * radius is an integer and eps is read as the decimal it prints as,
    so 0.1 means 1/10), else in pixel units.
    """
    radius = np.asarray(radius)
    if levels is None:
        return radius > eps
    gap = np.rint(2.0 * radius)  # an integer number of grey levels (or inf)
    bound = 2 * fractions.Fraction(repr(float(eps))) * levels
    return gap > math.floor(bound)  # integer gap > rational bound <=> gap > floor(bound)


def certified_accuracy(class_dist: np.ndarray, y: np.ndarray, eps: float,
                       levels: int | None = None) -> dict:
    """Accuracy and certified astuteness at eps of the distance classifier.

    class_dist: [N, C] per-class nearest distances of the test points to the training set
    (grey levels if `levels` is given, else pixel units); y: [N] true labels; eps in pixel units.
    A point counts as certified when it is classified correctly AND radius > eps, strictly: the
    attack ball is closed, and at ||x' - x|| = radius the true class and another can tie, which
    the argmin may break against the true class. `at_boundary` counts correct points with
    radius == eps exactly (possible with integer grey levels), not counted as certified.
    Returns {"accuracy", "certified_astuteness", "n", "at_boundary"}.
    """
    y = np.asarray(y)
    pred, radius = distance_classifier(class_dist)
    correct = pred == y
    certified = correct & certified_mask(radius, eps, levels)
    boundary = correct & _at_boundary(radius, eps, levels)
    n = len(y)
    return {
        "accuracy": float(correct.mean()) if n else float("nan"),
        "certified_astuteness": float(certified.mean()) if n else float("nan"),
        "n": int(n),
        "at_boundary": int(boundary.sum()),
    }


def _at_boundary(radius: np.ndarray, eps: float, levels: int | None) -> np.ndarray:
    """radius == eps exactly (levels given: exact rational comparison)."""
    radius = np.asarray(radius)
    if levels is None:
        return radius == eps
    bound = 2 * fractions.Fraction(repr(float(eps))) * levels
    if bound.denominator != 1:
        return np.zeros(len(radius), bool)
    return np.rint(2.0 * radius) == bound.numerator


# ----------------------------------------------------------------------------- summaries


QUANTILES = (0.001, 0.01, 0.1, 0.5)


def count_below(dist_levels: np.ndarray, bound: float, levels: int) -> int:
    """Number of distances (grey levels) strictly below `bound` (pixel units), exactly."""
    limit = fractions.Fraction(repr(float(bound))) * levels
    return int((np.asarray(dist_levels) < math.ceil(limit)).sum())  # d < L <=> d < ceil(L)


def separation_summary(dist_levels: np.ndarray, index: np.ndarray, y_query: np.ndarray,
                       y_ref: np.ndarray, levels: int, eps: float, n_closest: int = 10,
                       symmetric: bool = False) -> dict:
    """Table-1 statistics of nearest-other-label distances.

    dist_levels, index: [N] from `nearest_other_label_distance` on uint8 images (grey levels);
    y_query [N], y_ref: labels; eps in pixel units. symmetric: query and reference sets are the
    same (train-train), so the pair (i, j) and (j, i) is listed once among the closest.
    Returns min (pixel units and grey levels), the QUANTILES (keys 'q0.001', ...; linear
    interpolation), mean, max, n_below_2eps (distance < 2 eps: pairs too close for eps-
    separation) and the n_closest pairs: query/ref index and label, distance.
    """
    found = index >= 0
    if not found.any():
        raise ValueError("no query has a reference point of another label")
    d = dist_levels[found].astype(np.int64)
    q_idx = np.flatnonzero(found)
    px = d / levels
    out = {
        "n": int(len(dist_levels)),
        "n_without_other_label": int((~found).sum()),
        "min": float(d.min() / levels),
        "min_levels": int(d.min()),
        **{f"q{q:g}": float(np.quantile(px, q)) for q in QUANTILES},
        "mean": float(px.mean()),
        "max": float(px.max()),
        "n_below_2eps": count_below(d, 2 * eps, levels),
    }
    closest, seen = [], set()
    for k in np.lexsort((q_idx, d)):  # by distance, then query index
        i, j = int(q_idx[k]), int(index[q_idx[k]])
        if symmetric and (min(i, j), max(i, j)) in seen:
            continue
        seen.add((min(i, j), max(i, j)))
        closest.append({"query_index": i, "ref_index": j, "query_label": int(y_query[i]),
                        "ref_label": int(y_ref[j]), "distance": float(d[k] / levels),
                        "distance_levels": int(d[k])})
        if len(closest) == n_closest:
            break
    out["closest"] = closest
    return out
