"""l_inf separation of labelled data and the theorem's distance classifier (PAPER.md).

Both questions are answered by one exact brute force over every (query, reference) pair:

  class_nearest                 for each query and each class c, the l_inf distance to the
                                closest reference point of class c, and that point's index:
                                [Nq, C] distances and [Nq, C] indices.
  nearest_other_label_distance  for each query, the distance to the closest reference point with
                                ANOTHER label and its index (Table 1's Train-Train with
                                `exclude_self=True`, and Test-Train).
  distance_classifier           the theorem's g(x) = argmin_c dist(x, X^(c)) and its exact
                                certified radius (second-smallest class distance - smallest) / 2.
  certified_accuracy            test accuracy and certified astuteness at eps of g.

Two arithmetic paths, chosen by the input dtype:
  uint8  exact integer grey levels: |a - b| = max(a, b) - min(a, b) in uint8 (no wraparound),
         64 lanes per AVX-512 register. Distances come back as int32 grey levels; divide by the
         data set's `levels` (255 for 8-bit images) for pixel units.
  float  float32 |a - b| then max, the operations NumPy does, so results equal NumPy's bit for
         bit. Distances come back as float32 pixel units.

Tiling (memory stays O(block x block), never Nq x Nr x D): the reference set is cut into blocks
of `ref_block` points stored transposed, [D, ref_block], so a pixel of 64 reference points fills
one vector register; the queries into blocks of `query_block`. A tile is [query_block, ref_block]
distances, built by a `fori_loop` over chunks of `dim_chunk` pixels whose body is one fused
elementwise expression (max of `dim_chunk` absolute differences): the accumulator stays in cache
and no reduction op is used (see the XLA note below). A `lax.scan` over reference blocks keeps a
running per-class (min, argmin); a `lax.map` walks the query blocks of one call; calls are a host
loop over query chunks, which reports progress. Queries are sharded over every device of a
`jax.sharding.Mesh` (axis "q") with `jax.shard_map`; references are replicated.

Ties: among reference points at the same distance the smallest index wins, as `np.argmin` on the
full row would choose.

XLA:CPU note (jaxlib 0.10.2): the YNNPACK "reduce" library fusion miscompiles a uint8 subtract
fused into a max-reduction over a non-minor axis (`max(max(a, b) - min(a, b), axis=1)` returned
wrong values for 90% of entries). The tile below uses only elementwise ops inside its loop, which
is both correct under any XLA_FLAGS and the fastest form measured; tests run both paths against
NumPy. `dim_chunk` below 16 makes XLA:CPU emit code ~40x slower (measured; cause not found).
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

AXIS = "q"
# Distance of "no such point" (an empty class, or no point of another label): int path.
NO_POINT_INT = np.iinfo(np.int32).max
NO_INDEX = -1


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes of the brute force: they change speed and memory, never results.

    query_block:     queries per tile (the tile's rows).
    ref_block:       reference points per tile (the tile's columns, the vector lanes).
    dim_chunk:       pixels fused into one loop step; D is zero-padded to a multiple of it.
    blocks_per_call: query blocks per device in one jitted call (one progress step).
    Defaults measured on the 2-core CPU (BUILD_NOTES); small data shrink them automatically.
    """

    query_block: int = 256
    ref_block: int = 512
    dim_chunk: int = 32
    blocks_per_call: int = 8


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each jitted call."""

    calls_done: int
    calls_total: int
    pairs_done: int  # (query, reference) pairs computed so far, padding excluded
    pairs_total: int
    dims: int  # pixels per point
    elapsed_s: float

    @property
    def pair_dims_per_s(self) -> float:
        return self.pairs_done * self.dims / max(self.elapsed_s, 1e-9)

    @property
    def eta_s(self) -> float:
        rate = self.pairs_done / max(self.elapsed_s, 1e-9)
        return (self.pairs_total - self.pairs_done) / max(rate, 1e-9)


def stderr_progress(label: str, min_interval_s: float = 10.0) -> Callable[[Progress], None]:
    """A progress callback printing '<label>: calls 3/30, 2.1e+10 pair-dims/s, ETA 25 s'.

    Prints at most every `min_interval_s` seconds, and always after the last call.
    """
    last = {"t": -np.inf}  # state local to this callback

    def report(p: Progress) -> None:
        now = time.monotonic()
        if p.calls_done < p.calls_total and now - last["t"] < min_interval_s:
            return
        last["t"] = now
        sys.stderr.write(
            f"{label}: calls {p.calls_done}/{p.calls_total}, {p.pair_dims_per_s:.3g} "
            f"pair-dims/s, elapsed {p.elapsed_s:.0f} s, ETA {p.eta_s:.0f} s\n"
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


# ----------------------------------------------------------------------------- the scan
#
# References are sorted by class (stable) and each class is padded to whole blocks by repeating
# its last point, so every reference block holds ONE class: a tile updates one column of the
# running [bq, C] minimum with one row-minimum, whatever C is. A repeated point sits at a larger
# position than its original, so it never wins a tie and changes no result.
#
# uint8 path: distance (<= 255) and position are packed into one int32 key,
# key = distance << POS_BITS | position, and one integer min-reduction gives both the minimum and
# the smallest position attaining it. float path: a min, then the smallest position attaining it.

POS_BITS = 22  # positions in the sorted, padded reference set: at most 4,194,304 points
NO_KEY = 256 << POS_BITS  # above every real key (distances are at most 255)
NO_POS = np.iinfo(np.int32).max


def _fold_tile_int(best_key, d, block_class, pos, same_point):
    """best_key [bq, C] int32; d [bq, br] uint8; pos [br] int32 positions; same_point [bq, br]
    bool or None (exclude_self). Returns the new best_key."""
    key = (d.astype(jnp.int32) << POS_BITS) | pos[None, :]
    if same_point is not None:
        key = jnp.where(same_point, NO_KEY, key)
    kmin = jnp.min(key, axis=1)
    column = jnp.arange(best_key.shape[1]) == block_class
    return jnp.where(column[None, :], jnp.minimum(best_key, kmin[:, None]), best_key)


def _fold_tile_float(best, d, block_class, pos, same_point):
    """best: ([bq, C] float32 distances, [bq, C] int32 positions); d [bq, br] float32."""
    best_d, best_pos = best
    if same_point is not None:
        d = jnp.where(same_point, jnp.inf, d)
    dmin = jnp.min(d, axis=1)
    pmin = jnp.min(jnp.where(d == dmin[:, None], pos[None, :], NO_POS), axis=1)
    column = jnp.arange(best_d.shape[1]) == block_class
    better = column[None, :] & (dmin[:, None] < best_d)  # strict: earlier blocks keep ties
    return jnp.where(better, dmin[:, None], best_d), jnp.where(better, pmin[:, None], best_pos)


def _device_class_nearest(xq, q_index, ref_t, ref_index, block_class, *, num_classes,
                          exclude_self, tiling):
    """One device's share: queries xq [n, Dp] (n = blocks * bq) against every reference block.

    ref_t [nb, Dp, br] transposed single-class blocks, ref_index [nb, br] original indices,
    block_class [nb]. Returns (dist [n, C], pos [n, C]): int32 grey levels (uint8; NO_KEY >>
    POS_BITS = 256 where none) or float32 (inf), and positions in the sorted reference set
    (NO_POS where none).
    """
    bq = tiling.query_block
    n, dp = xq.shape
    nb, _, br = ref_t.shape
    is_int = jnp.issubdtype(xq.dtype, jnp.integer)
    q_blocks = xq.reshape(n // bq, bq, dp).transpose(0, 2, 1)  # [blocks, Dp, bq]
    q_index_blocks = q_index.reshape(n // bq, bq)
    positions = jnp.arange(nb * br, dtype=jnp.int32).reshape(nb, br)
    if is_int:
        init = jnp.full((bq, num_classes), NO_KEY, jnp.int32)
    else:
        init = (jnp.full((bq, num_classes), jnp.inf, jnp.float32),
                jnp.full((bq, num_classes), NO_POS, jnp.int32))
    fold = _fold_tile_int if is_int else _fold_tile_float

    def one_query_block(args):
        q_t, qi = args

        def step(best, ref):
            r_t, r_index, r_class, pos = ref
            d = tile_distances(q_t, r_t, tiling.dim_chunk)
            same = (r_index[None, :] == qi[:, None]) if exclude_self else None
            return fold(best, d, r_class, pos, same), None

        best, _ = lax.scan(step, init, (ref_t, ref_index, block_class, positions))
        return best

    best = lax.map(one_query_block, (q_blocks, q_index_blocks))
    if is_int:
        dist, pos = best >> POS_BITS, best & ((1 << POS_BITS) - 1)
        pos = jnp.where(best == NO_KEY, NO_POS, pos)
    else:
        dist, pos = best
    return dist.reshape(n, num_classes), pos.reshape(n, num_classes)


@functools.partial(jax.jit, static_argnames=("num_classes", "exclude_self", "tiling", "mesh"))
def _class_nearest_call(xq, q_index, ref_t, ref_index, block_class, *, num_classes,
                        exclude_self, tiling, mesh):
    body = functools.partial(_device_class_nearest, num_classes=num_classes,
                             exclude_self=exclude_self, tiling=tiling)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P(), P()),
                         out_specs=P(AXIS), check_vma=False)(
                             xq, q_index, ref_t, ref_index, block_class)


# ----------------------------------------------------------------------------- host side


def default_mesh() -> Mesh:
    """A 1-D mesh over every device, axis "q" (queries are split over it)."""
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


def _fit_tiling(tiling: Tiling, n_query: int, class_counts: np.ndarray, dims: int,
                n_dev: int) -> Tiling:
    """Shrinks blocks for small inputs (less padding); never changes results.

    The reference block is the multiple of 64 in [ref_block / 2, ref_block] that pads the
    classes least (each class is padded to whole blocks), the largest on ties.
    """
    per_dev = -(-n_query // n_dev)
    query_block = min(tiling.query_block, _round_up(max(per_dev, 1), 8))
    blocks = min(tiling.blocks_per_call, -(-per_dev // query_block))
    largest = int(class_counts.max()) if len(class_counts) else 1
    top = min(tiling.ref_block, _round_up(max(largest, 1), 64))
    candidates = range(top, max(top // 2, 64) - 1, -64) if top >= 64 else [top]
    ref_block = min(candidates, key=lambda b: sum(_round_up(int(n), b) for n in class_counts))
    dim_chunk = min(tiling.dim_chunk, dims)
    return Tiling(query_block, ref_block, dim_chunk, max(blocks, 1))


def _class_blocks(y_ref: np.ndarray, num_classes: int, ref_block: int):
    """Sorted, padded reference order: (index [nb * br] into x_ref, block class [nb]).

    Class c's points in index order, then its last point repeated up to a whole block.
    """
    order, block_class = [], []
    for c in range(num_classes):
        members = np.flatnonzero(y_ref == c)
        if len(members) == 0:
            continue
        n_blocks = -(-len(members) // ref_block)
        padded = np.full(n_blocks * ref_block, members[-1], np.int32)
        padded[: len(members)] = members
        order.append(padded)
        block_class += [c] * n_blocks
    if not order:
        return np.zeros((0,), np.int32), np.zeros((0,), np.int32)
    return np.concatenate(order), np.asarray(block_class, np.int32)


def class_nearest(x_query, x_ref, y_ref, num_classes: int, *, exclude_self: bool = False,
                  tiling: Tiling = Tiling(), mesh: Mesh | None = None,
                  progress: Callable[[Progress], None] | None = None):
    """Per-class nearest l_inf distance from each query to the reference points.

    x_query: [Nq, ...] and x_ref: [Nr, ...], both uint8 (grey levels) or both floating;
    y_ref: [Nr] ints in [0, num_classes). exclude_self: the query with index i skips the
    reference point with index i (for train-train, x_query = x_ref or its first Nq points).
    Returns (dist [Nq, C], index [Nq, C]): int32 grey levels (uint8 input; NO_POINT_INT where a
    class has no point) or float32 pixel units (float input; inf), and int32 indices into x_ref
    (-1 where none). Ties go to the smallest index.
    """
    xq = _flatten(x_query, "x_query")
    xr = _flatten(x_ref, "x_ref")
    y_ref = np.asarray(y_ref)
    if xq.dtype != xr.dtype:
        raise ValueError(f"x_query is {xq.dtype} but x_ref is {xr.dtype}; pass both uint8 or "
                         "both float")
    if xq.shape[1] != xr.shape[1]:
        raise ValueError(f"points differ in size: {xq.shape[1]} vs {xr.shape[1]} values")
    if y_ref.shape != (len(xr),):
        raise ValueError(f"y_ref must have shape ({len(xr)},), got {y_ref.shape}")
    if len(y_ref) and (y_ref.min() < 0 or y_ref.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    mesh = mesh or default_mesh()
    n_dev = mesh.size
    nq, dims = xq.shape
    counts = np.bincount(y_ref, minlength=num_classes) if len(y_ref) else np.zeros(1, int)
    tiling = _fit_tiling(tiling, nq, counts, dims, n_dev)
    dp = _round_up(dims, tiling.dim_chunk)
    order, block_class = _class_blocks(y_ref, num_classes, tiling.ref_block)
    if xq.dtype == np.uint8 and len(order) > (1 << POS_BITS):
        raise ValueError(f"at most {1 << POS_BITS} reference points (padded) on the uint8 path")
    is_int = xq.dtype == np.uint8
    out_d = np.full((nq, num_classes), NO_POINT_INT if is_int else np.inf,
                    np.int32 if is_int else np.float32)
    out_i = np.full((nq, num_classes), NO_INDEX, np.int32)
    if nq == 0 or len(order) == 0:
        return out_d, out_i

    nb, br = len(block_class), tiling.ref_block
    ref = np.zeros((nb * br, dp), xr.dtype)
    ref[:, :dims] = xr[order]
    ref_t = np.ascontiguousarray(ref.reshape(nb, br, dp).transpose(0, 2, 1))  # [nb, Dp, br]
    replicated = NamedSharding(mesh, P())
    by_query = NamedSharding(mesh, P(AXIS))
    ref_args = [jax.device_put(a, replicated)
                for a in (ref_t, order.reshape(nb, br), block_class)]

    chunk = n_dev * tiling.blocks_per_call * tiling.query_block
    calls = -(-nq // chunk)
    start_time = time.monotonic()
    for call in range(calls):
        lo, hi = call * chunk, min((call + 1) * chunk, nq)
        q = np.zeros((chunk, dp), xq.dtype)
        q[: hi - lo, :dims] = xq[lo:hi]
        q_index = np.arange(lo, lo + chunk, dtype=np.int32)
        d, pos = _class_nearest_call(
            jax.device_put(q, by_query), jax.device_put(q_index, by_query), *ref_args,
            num_classes=num_classes, exclude_self=exclude_self, tiling=tiling, mesh=mesh)
        d, pos = np.asarray(d)[: hi - lo], np.asarray(pos)[: hi - lo]
        found = pos != NO_POS
        out_d[lo:hi] = np.where(found, d, out_d[lo:hi])
        out_i[lo:hi] = np.where(found, order[np.where(found, pos, 0)], NO_INDEX)
        if progress is not None:
            progress(Progress(call + 1, calls, hi * len(xr), nq * len(xr), dims,
                              time.monotonic() - start_time))
    return out_d, out_i


def other_label_from_class_nearest(class_dist: np.ndarray, class_index: np.ndarray,
                                   y_query: np.ndarray):
    """Nearest point of another label from per-class results.

    class_dist, class_index: [Nq, C] from `class_nearest`; y_query: [Nq] labels.
    Returns (dist [Nq], index [Nq]); among equal distances the smallest index wins.
    """
    nq, num_classes = class_dist.shape
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
                                 progress: Callable[[Progress], None] | None = None):
    """For each query, the l_inf distance to the nearest reference point of ANOTHER label.

    x_query [Nq, ...], y_query [Nq]; x_ref [Nr, ...], y_ref [Nr]; images both uint8 (exact grey
    levels) or both floating. exclude_self: skip reference i for query i (train-train; matters
    only for duplicates with different labels, same-label points are skipped anyway).
    Returns (dist [Nq], index [Nq] into x_ref): int32 grey levels for uint8 (divide by the data
    set's `levels`), float32 pixel units for float. No point of another label: NO_POINT_INT or
    inf, index -1. Among equal distances the smallest index wins.
    """
    y_query = np.asarray(y_query)
    y_ref = np.asarray(y_ref)
    if y_query.shape != (len(np.asarray(x_query)),):
        raise ValueError(f"y_query must have one label per query, got shape {y_query.shape}")
    if num_classes is None:
        num_classes = int(max(y_query.max(initial=0), y_ref.max(initial=0))) + 1
    class_dist, class_index = class_nearest(
        x_query, x_ref, y_ref, num_classes, exclude_self=exclude_self, tiling=tiling, mesh=mesh,
        progress=progress)
    return other_label_from_class_nearest(class_dist, class_index, y_query)


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
    gap = np.rint(2.0 * radius)  # integer grey levels (or inf)
    bound = 2 * fractions.Fraction(repr(float(eps))) * levels
    finite = np.isfinite(gap)
    out = np.ones(len(radius), bool)
    out[finite] = np.array([fractions.Fraction(int(g)) > bound for g in gap[finite]], bool)
    return out


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
