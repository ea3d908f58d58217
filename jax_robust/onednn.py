"""oneDNN's convolutions inside XLA:CPU programs (SpeedConfig.conv_kernels='onednn').

`conv(x, kernel, strides, pads)` is a 2-D NHWC/HWIO convolution whose forward, input gradient
and kernel gradient are each one XLA FFI call into oneDNN (jax_robust/native/onednn_conv.cc),
the library PyTorch's CPU convolutions use. The handler is compiled on first use with the
machine's C++ compiler against the `onednn-devel-cpu-gomp` headers and XLA's FFI headers
(`jax.ffi.include_dir()`), and cached in $JAX_ROBUST_CACHE (default ~/.cache/jax_robust) under
a name that hashes the source, jaxlib's version and the command, written atomically beside
its sha256 (a cached library that does not match it is built again, never loaded).

`conv_pool(x, kernel, strides, pads, ties, relu_input)` is such a conv followed by a 2x2/2
max-pool, optionally with a ReLU before it, one call each way (SpeedConfig.conv_pool='fused'):
the ReLU'd input and the conv output are made, and their gradients un-pooled, a few images
at a time while in cache, so none of them is written out whole.

`supports(dtype)` says whether this CPU's oneDNN has convolutions in a dtype (bfloat16 needs
AVX-512). `available()` says whether it built and loaded; `unavailable_reason()` says why
not (no compiler, no oneDNN, a failed build). JAX_ROBUST_ONEDNN=0 turns it off. Every
entry point leaves the choice to the caller: nothing here falls back silently.

The calls carry no sharding rule: in a program partitioned over several devices XLA gathers
their operands onto every device (the values stay right, the work is repeated), so
recipes.resolve picks oneDNN only for a single CPU device.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_robust.files import write_text_atomic

TARGET = "jax_robust_onednn_conv"
# The conv + 2x2 max-pool handlers (conv_pool), each its own FFI target.
POOL_TARGETS = {"forward": ("jax_robust_onednn_conv_pool", "JrOnednnConvPool"),
                "input_grad": ("jax_robust_onednn_conv_pool_input_grad",
                               "JrOnednnConvPoolInputGrad"),
                "kernel_grad": ("jax_robust_onednn_conv_pool_kernel_grad",
                                "JrOnednnConvPoolKernelGrad")}
# conv_pool's images per step inside a batch part: as many as fit this many bytes of conv
# output (at least one), so the output is pooled while in cache.
POOL_CHUNK_BYTES = 384 * 1024
_SOURCE = Path(__file__).parent / "native" / "onednn_conv.cc"
_FORWARD, _INPUT_GRAD, _KERNEL_GRAD = 0, 1, 2


def _prefixes() -> list[Path]:
    """Where pip puts the onednn wheels' lib/ and include/ (a venv, the base, --user)."""
    import site

    found = [os.environ.get("ONEDNN_ROOT"), sys.prefix, sys.base_prefix,
             getattr(site, "USER_BASE", None), sysconfig.get_config_var("prefix")]
    return list(dict.fromkeys(Path(p) for p in found if p))


def _find_onednn() -> tuple[Path, Path] | None:
    """(include dir, lib dir) of a oneDNN 3 with its C++ header, or None."""
    for prefix in _prefixes():
        header = prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
        if header.is_file() and (prefix / "lib" / "libdnnl.so.3").exists():
            return prefix / "include", prefix / "lib"
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("JAX_ROBUST_CACHE", Path.home() / ".cache" / "jax_robust"))


def _build(include: Path, lib: Path) -> Path:
    """Compiles the handler (once per source, jaxlib and command) and returns the .so path.
    Raises RuntimeError with the compiler's last lines when the build fails."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build it")
    # -fno-trapping-math lets the pool loops' float compares be vectorised as selects.
    command = [compiler, "-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC",
               "-fvisibility=hidden", "-w",
               f"-I{jax.ffi.include_dir()}", f"-I{include}", str(_SOURCE), f"-L{lib}", "-ldnnl",
               f"-Wl,-rpath,{lib}"]
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join(command + [jax.lib.__version__]).encode())
    target = _cache_dir() / f"onednn_conv-{digest.hexdigest()[:16]}.so"
    if _intact(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run(command + ["-o", scratch], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"its build failed ({compiler}): {tail}")
        # The checksum first, then the library, each replaced atomically: a library without
        # its matching checksum is never loaded (dlopen of a truncated one crashes).
        write_text_atomic(str(_checksum_path(target)), _sha256(Path(scratch)))
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether `library` exists and matches the checksum written when it was built."""
    try:
        return _checksum_path(library).read_text().strip() == _sha256(library)
    except OSError:
        return False


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded handler library, "") or (None, why not); registers the FFI target once."""
    if os.environ.get("JAX_ROBUST_ONEDNN", "1") == "0":
        return None, "JAX_ROBUST_ONEDNN=0"
    if sys.platform != "linux":
        return None, f"built for Linux only (this is {sys.platform})"
    found = _find_onednn()
    if found is None:
        return None, ("oneDNN 3 is not installed (pip install onednn-cpu-gomp "
                      "onednn-devel-cpu-gomp)")
    try:
        library = ctypes.CDLL(str(_build(*found)))  # rebuilt when not _intact
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JrOnednnConv),
                                    platform="cpu")
        for target, symbol in POOL_TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (RuntimeError, OSError, AttributeError) as err:
        return None, str(err)
    return library, ""


def available() -> bool:
    """Whether the oneDNN handler built and loaded (builds it on the first call)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


@functools.cache
def supports(dtype) -> bool:
    """Whether this CPU has oneDNN convolutions in `dtype` (float32 always; bfloat16 needs
    AVX-512: oneDNN 3.2 has no bf16 convolution on an AVX2 CPU). False where unavailable."""
    library = _load()[0]
    if library is None:
        return False
    codes = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 1}
    if np.dtype(dtype) not in codes:
        return False
    library.JrOnednnConvSupports.restype = ctypes.c_int64
    return bool(library.JrOnednnConvSupports(ctypes.c_int64(codes[np.dtype(dtype)])))


def implementations() -> list[tuple[int, str]]:
    """(kind, oneDNN implementation name) of every primitive built so far in this process:
    kind 0 forward, 1 input gradient, 2 kernel gradient; e.g. (0, 'brgconv:avx512_core')."""
    library = _load()[0]
    if library is None:
        return []
    library.JrOnednnConvImpls.restype = ctypes.c_int64
    size = library.JrOnednnConvImpls(None, 0)
    out = ctypes.create_string_buffer(int(size) + 1)
    library.JrOnednnConvImpls(out, size)
    records = out.value.decode().split(";")
    return [(int(r.split(":", 1)[0]), r.split(":", 1)[1]) for r in records if r]


def _ffi_call(target: str, out, *operands, **attrs):
    """One call of a handler (vmapped as a loop over the mapped axis)."""
    if not available():
        raise RuntimeError(f"oneDNN's convolutions are unavailable: {unavailable_reason()} "
                           "(SpeedConfig.conv_kernels='xla' computes without them)")
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*operands, **attrs)


def _geometry(strides, pads) -> dict:
    """The handlers' geometry attributes."""
    (top, bottom), (left, right) = pads
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
                pad_right=np.int64(right))


def _call(kind: int, a, b, out: jax.ShapeDtypeStruct, strides, pads):
    return _ffi_call(TARGET, out, a, b, kind=np.int64(kind), **_geometry(strides, pads))


def output_shape(x_shape, k_shape, strides, pads) -> tuple[int, int, int, int]:
    n, h, w, _ = x_shape
    kh, kw, _, o = k_shape
    return (n, (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1,
            (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
         pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """x [n, h, w, i] (*) kernel [kh, kw, i, o] -> [n, ho, wo, o] in x's dtype, through oneDNN.

    strides (sh, sw) >= 1; pads ((top, bottom), (left, right)), each >= 0; float32 or
    bfloat16 operands of one dtype. Needs `available()`. Reverse mode to any order (GR and
    LLR differentiate input gradients): the conv, its input gradient and its kernel gradient
    are bilinear, and each one's VJP is made of the other two. No forward mode (jax.jvp).
    """
    shape = output_shape(x.shape, kernel.shape, strides, pads)
    return _call(_FORWARD, x, kernel, jax.ShapeDtypeStruct(shape, x.dtype), strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def input_grad(g, kernel, strides, pads, x_shape):
    """The VJP of `conv` w.r.t. x: g [n, ho, wo, o], kernel -> [n, h, w, i] (x_shape)."""
    return _call(_INPUT_GRAD, g, kernel, jax.ShapeDtypeStruct(x_shape, g.dtype), strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def kernel_grad(x, g, strides, pads, k_shape):
    """The VJP of `conv` w.r.t. the kernel: x, g [n, ho, wo, o] -> [kh, kw, i, o] (k_shape)."""
    return _call(_KERNEL_GRAD, x, g, jax.ShapeDtypeStruct(k_shape, x.dtype), strides, pads)


def _conv_fwd(x, kernel, strides, pads):
    return conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    return (input_grad(g, kernel, strides, pads, x.shape),
            kernel_grad(x, g, strides, pads, kernel.shape))


def _input_grad_fwd(g, kernel, strides, pads, x_shape):
    return input_grad(g, kernel, strides, pads, x_shape), (g, kernel)


def _input_grad_bwd(strides, pads, x_shape, residuals, u):
    # <u, input_grad(g, k)> = <conv(u, k), g>
    g, kernel = residuals
    return conv(u, kernel, strides, pads), kernel_grad(u, g, strides, pads, kernel.shape)


def _kernel_grad_fwd(x, g, strides, pads, k_shape):
    return kernel_grad(x, g, strides, pads, k_shape), (x, g)


def _kernel_grad_bwd(strides, pads, k_shape, residuals, v):
    # <v, kernel_grad(x, g)> = <conv(x, v), g>
    x, g = residuals
    return input_grad(g, v, strides, pads, x.shape), conv(x, v, strides, pads)


conv.defvjp(_conv_fwd, _conv_bwd)
input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)
kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


# ----------------------------------------------------------------------------- conv + max-pool


def _pool_call(name: str, out, *operands, **attrs):
    return _ffi_call(POOL_TARGETS[name][0], out, *operands, **attrs)


def pooled_shape(x_shape, k_shape, strides, pads) -> tuple[int, int, int, int]:
    """The shape of `conv_pool`'s result: the conv output's, rows and columns halved (floor)."""
    n, ho, wo, o = output_shape(x_shape, k_shape, strides, pads)
    return n, ho // 2, wo // 2, o


def _conv_pool_call(x, kernel, strides, pads, ties, relu_input):
    shape = pooled_shape(x.shape, kernel.shape, strides, pads)
    if min(shape[1:3]) < 1:
        raise ValueError(f"conv_pool: a conv output of {shape[1] * 2}x{shape[2] * 2} or less "
                         "has no 2x2 window")
    if ties not in ("split", "first"):
        raise ValueError(f"unknown pool ties {ties!r}")
    return _pool_call("forward", (jax.ShapeDtypeStruct(shape, x.dtype),
                                  jax.ShapeDtypeStruct(shape, np.uint8)),
                      x, kernel, ties_first=np.int64(ties == "first"),
                      chunk_bytes=np.int64(POOL_CHUNK_BYTES), relu_input=np.int64(relu_input),
                      **_geometry(strides, pads))


def unpool(g: jax.Array, mask: jax.Array, y_shape) -> jax.Array:
    """The transpose of `conv_pool`'s pooling in plain JAX: g and mask [n, ph, pw, o] ->
    [n, ho, wo, o] (y_shape); each corner marked in mask (bit j: corner j of the 2x2
    window, row-major) gets g / (corners marked), every other element 0."""
    n, ho, wo, o = y_shape
    bits = [(mask >> j) & 1 for j in range(4)]
    count = sum(b.astype(np.int32) for b in bits)
    share = jnp.where(count > 0, g / jnp.maximum(count, 1).astype(g.dtype),
                      jnp.zeros((), g.dtype))
    corners = jnp.stack([jnp.where(b == 1, share, jnp.zeros((), g.dtype)) for b in bits], 3)
    ph, pw = g.shape[1:3]
    y = corners.reshape(n, ph, pw, 2, 2, o).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(n, 2 * ph, 2 * pw, o)
    return jnp.pad(y, ((0, 0), (0, ho - 2 * ph), (0, wo - 2 * pw), (0, 0)))


def conv_pool(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              pads: tuple[tuple[int, int], tuple[int, int]], ties: str,
              relu_input: bool = False) -> jax.Array:
    """`conv(x, kernel, strides, pads)` then a 2x2/2 max-pool (floor mode), as one oneDNN call:
    x [n, h, w, i] -> [n, ho // 2, wo // 2, o]. The conv output is pooled a few images at a
    time (POOL_CHUNK_BYTES) while in cache, never written whole; the backward un-pools the
    gradient the same way before oneDNN's input and kernel gradients. ties: a window with
    several maxima sends its gradient to all of them in equal shares ('split', JAX's
    reduce-max rule and layers.max_pool_2x2's) or to the first in row-major order ('first',
    PyTorch's, layers.max_pool_2x2_first). A window holding a NaN pools to NaN.
    relu_input: the conv reads relu(x) instead (`jax.nn.relu`, made per chunk in cache, so
    the ReLU's output and its gradient are never written whole either). Reverse mode to any
    order (the gradients' own VJPs are plain JAX un-pooling and `conv`'s ops)."""
    return conv_pool_with_mask(x, kernel, strides, pads, ties, bool(relu_input))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_pool_with_mask(x, kernel, strides, pads, ties, relu_input):
    """(`conv_pool(...)`, its mask [n, ph, pw, o] uint8: bit j marks corner j (row-major) of
    the window as a maximum that takes a share of the gradient)."""
    return _conv_pool_call(x, kernel, strides, pads, ties, relu_input)


def _conv_pool_fwd(x, kernel, strides, pads, ties, relu_input):
    pooled, mask = conv_pool_with_mask(x, kernel, strides, pads, ties, relu_input)
    return (pooled, mask), (x, kernel, mask)


def _conv_pool_bwd(strides, pads, ties, relu_input, residuals, cotangents):
    x, kernel, mask = residuals
    g = cotangents[0]  # the mask's is float0: it is piecewise constant in x and kernel
    return (pool_input_grad(g, mask, kernel, x, strides, pads, relu_input),
            pool_kernel_grad(x, g, mask, strides, pads, kernel.shape, relu_input))


conv_pool_with_mask.defvjp(_conv_pool_fwd, _conv_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def pool_input_grad(g, mask, kernel, x, strides, pads, relu_input):
    """`conv_pool`'s VJP w.r.t. x: g and mask [n, ph, pw, o], kernel -> [n, h, w, i] (x's
    shape; x itself is read only with relu_input, for the ReLU's gradient)."""
    relu_x = x if relu_input else jnp.zeros((0,), x.dtype)
    return _pool_call("input_grad", jax.ShapeDtypeStruct(x.shape, g.dtype), g, mask, kernel,
                      relu_x, chunk_bytes=np.int64(POOL_CHUNK_BYTES),
                      relu_input=np.int64(relu_input), **_geometry(strides, pads))


def _pool_input_grad_plain(g, kernel, mask, x, strides, pads, relu_input):
    y_shape = output_shape(x.shape, kernel.shape, strides, pads)
    dx = input_grad(unpool(g, mask, y_shape), kernel, strides, pads, x.shape)
    return jnp.where(x > 0, dx, jnp.zeros((), dx.dtype)) if relu_input else dx


def _pool_input_grad_fwd(g, mask, kernel, x, strides, pads, relu_input):
    return pool_input_grad(g, mask, kernel, x, strides, pads, relu_input), (g, mask, kernel, x)


def _pool_input_grad_bwd(strides, pads, relu_input, residuals, u):
    g, mask, kernel, x = residuals
    _, vjp = jax.vjp(lambda g_, k_: _pool_input_grad_plain(g_, k_, mask, x, strides, pads,
                                                          relu_input), g, kernel)
    dg, dkernel = vjp(u)
    # x enters through masks only (the pool's and the ReLU's): piecewise constant.
    return dg, None, dkernel, jnp.zeros_like(x)


pool_input_grad.defvjp(_pool_input_grad_fwd, _pool_input_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def pool_kernel_grad(x, g, mask, strides, pads, k_shape, relu_input):
    """`conv_pool`'s VJP w.r.t. the kernel: x, g and mask [n, ph, pw, o] -> k_shape."""
    return _pool_call("kernel_grad", jax.ShapeDtypeStruct(k_shape, x.dtype), x, g, mask,
                      chunk_bytes=np.int64(POOL_CHUNK_BYTES), relu_input=np.int64(relu_input),
                      **_geometry(strides, pads))


def _pool_kernel_grad_plain(x, g, mask, strides, pads, k_shape, relu_input):
    y_shape = output_shape(x.shape, k_shape, strides, pads)
    src = jax.nn.relu(x) if relu_input else x
    return kernel_grad(src, unpool(g, mask, y_shape), strides, pads, k_shape)


def _pool_kernel_grad_fwd(x, g, mask, strides, pads, k_shape, relu_input):
    return (pool_kernel_grad(x, g, mask, strides, pads, k_shape, relu_input), (x, g, mask))


def _pool_kernel_grad_bwd(strides, pads, k_shape, relu_input, residuals, v):
    x, g, mask = residuals
    _, vjp = jax.vjp(lambda x_, g_: _pool_kernel_grad_plain(x_, g_, mask, strides, pads,
                                                           k_shape, relu_input), x, g)
    dx, dg = vjp(v)
    return dx, dg, None


pool_kernel_grad.defvjp(_pool_kernel_grad_fwd, _pool_kernel_grad_bwd)
