"""oneDNN's convolutions inside XLA:CPU programs (SpeedConfig.conv_kernels='onednn').

`conv(x, kernel, strides, pads)` is a 2-D NHWC/HWIO convolution whose forward, input gradient
and kernel gradient are each one XLA FFI call into oneDNN (jax_robust/native/onednn_conv.cc),
the library PyTorch's CPU convolutions use. The handler is compiled on first use (the first
`available()`, `supports()` or call; importing this module builds nothing) with the machine's
C++ compiler against the `onednn-devel-cpu-gomp` headers and XLA's FFI headers
(`jax.ffi.include_dir()`), with -Wall -Wextra and no warning left, and cached in
$JAX_ROBUST_CACHE (default ~/.cache/jax_robust) under a name that hashes the source, the
flags, jaxlib's version and oneDNN's. Concurrent first runs build once (an flock on
onednn_conv.lock in the cache); the library is written atomically after a manifest holding
its sha256 and the oneDNN version it was built against: a cached library that does not match
its sha256, or was built against another oneDNN than the one installed, is built again,
never loaded. docs/native.md has the details; `python -m jax_robust.onednn` builds it and
says what it found.

`conv_pool(x, kernel, strides, pads, ties, relu_input)` is such a conv followed by a 2x2/2
max-pool, optionally with a ReLU before it, one call each way (SpeedConfig.conv_pool='fused'):
the ReLU'd input and the conv output are made, and their gradients un-pooled, a few images
at a time while in cache, so none of them is written out whole.

Every function checks that its operands' shapes and dtypes make one convolution and raises
ValueError naming the first mismatch ("onednn kernel_grad: x batch 2 != gradient batch 64");
the handler checks the same on its own and refuses a misshapen call with the same words (a
jax.errors.JaxRuntimeError), never reading or writing out of bounds.

`supports(dtype)` says whether this CPU's oneDNN has convolutions in a dtype (bfloat16 needs
AVX-512). `available()` says whether it built and loaded; `unavailable_reason()` says why
not (no compiler, no oneDNN, a failed build, JAX_ROBUST_ONEDNN=0, which turns it off). Every
entry point leaves the choice to the caller: nothing here falls back silently.

The calls carry no sharding rule: in a program partitioned over several devices XLA gathers
their operands onto every device (the values stay right, the work is repeated), so
recipes.resolve picks oneDNN only for a single CPU device.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_robust.files import write_json_atomic

try:
    import fcntl
except ImportError:  # not POSIX: the handler is Linux-only, never built there
    fcntl = None

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
# JAX_ROBUST_ONEDNN set to one of these turns the handler off (read on the first use).
SWITCH = "JAX_ROBUST_ONEDNN"
_OFF = ("0", "false", "no", "off")
BUILD_TIMEOUT_S = 600
_SOURCE = Path(__file__).parent / "native" / "onednn_conv.cc"
_LOCK_NAME = "onednn_conv.lock"
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


def _header_version(include: Path) -> str:
    """oneDNN's version as its headers give it (DNNL_VERSION_*): '3.2.0 (git hash)'."""
    text = (include / "oneapi" / "dnnl" / "dnnl_version.h").read_text()
    fields = dict(re.findall(r'#define\s+DNNL_VERSION_(\w+)\s+"?([^"\s]*)"?', text))
    try:
        return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']} ({fields.get('HASH', '')})"
    except KeyError:
        raise RuntimeError(f"no DNNL_VERSION_* in {include}/oneapi/dnnl/dnnl_version.h") from None


class _DnnlVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]


def _library_version(lib: Path) -> str:
    """The version of the oneDNN library in `lib` (its dnnl_version()), in _header_version's
    form. Loads libdnnl.so.3, which the handler loads anyway."""
    dnnl = ctypes.CDLL(str(lib / "libdnnl.so.3"))
    dnnl.dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
    v = dnnl.dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch} ({(v.hash or b'').decode()})"


def _flags(include: Path, lib: Path) -> list[str]:
    """The compiler's arguments but the output. Every warning on (-Wall -Wextra; the handler
    has none), except in oneDNN's and XLA's own headers (-isystem)."""
    # -fno-trapping-math lets the pool loops' float compares be vectorised as selects.
    return ["-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC",
            "-fvisibility=hidden", "-Wall", "-Wextra", "-isystem", str(jax.ffi.include_dir()),
            "-isystem", str(include), str(_SOURCE), f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]


def _library_path(include: Path, lib: Path, version: str) -> Path:
    """Where the handler for this source, these flags, this jaxlib and this oneDNN is cached.
    The compiler is not in the name: a cached library loads where no compiler is."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update("\0".join(_flags(include, lib) + [jax.lib.__version__, version]).encode())
    return _cache_dir() / f"onednn_conv-{digest.hexdigest()[:16]}.so"


def _compiler() -> list[str] | None:
    """$CXX (split as a shell would), else g++ or c++ on PATH; None if there is none."""
    if os.environ.get("CXX", "").strip():
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++")
    return [found] if found else None


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Holds an exclusive flock on `directory`/onednn_conv.lock (waits for it): processes
    that find no library at once build it one after the other, and the later ones find it
    built. The OS drops the lock when its holder ends, however it ends."""
    with open(directory / _LOCK_NAME, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _build(include: Path, lib: Path, version: str) -> Path:
    """The handler built against oneDNN `version` (in include/lib): the cached one when
    _intact, else compiled (under _build_lock) and cached. Raises RuntimeError with the
    compiler's last lines when the build fails."""
    target = _library_path(include, lib, version)
    if _intact(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent):
        if _intact(target, version):  # built by another process while this one waited
            return target
        compiler = _compiler()
        if not compiler:
            raise RuntimeError("no C++ compiler (g++ or c++ on PATH, or $CXX) to build it")
        command = compiler + _flags(include, lib)
        handle, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        try:
            try:
                done = subprocess.run(command + ["-o", scratch], capture_output=True, text=True,
                                      check=False, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"its build ran over {BUILD_TIMEOUT_S} s") from None
            if done.returncode != 0:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:])
                raise RuntimeError(f"its build failed ({shlex.join(compiler)}): {tail}")
            # The manifest first, then the library, each replaced atomically: a library
            # without its matching manifest is never loaded (dlopen of a truncated one
            # crashes).
            write_json_atomic(str(_manifest_path(target)), {
                "sha256": _sha256(Path(scratch)), "onednn": version,
                "jaxlib": jax.lib.__version__, "command": shlex.join(command),
                "warnings": done.stderr})
            os.replace(scratch, target)
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_path(library: Path) -> Path:
    return library.with_name(library.name + ".json")


def _manifest(library: Path) -> dict:
    """What the build of `library` wrote beside it ({} if unreadable)."""
    try:
        return json.loads(_manifest_path(library).read_text())
    except (OSError, ValueError):
        return {}


def _intact(library: Path, version: str) -> bool:
    """Whether `library` exists, matches the sha256 written when it was built, and was built
    against oneDNN `version`."""
    manifest = _manifest(library)
    try:
        return manifest.get("onednn") == version and manifest.get("sha256") == _sha256(library)
    except OSError:
        return False


def _string(library: ctypes.CDLL, symbol: str) -> str:
    """The text a `int64_t f(char* out, int64_t size)` export of the handler writes."""
    fn = getattr(library, symbol)
    fn.restype = ctypes.c_int64
    size = fn(None, ctypes.c_int64(0))
    out = ctypes.create_string_buffer(int(size) + 1)
    fn(out, ctypes.c_int64(size))
    return out.value.decode()


_LOAD_LOCK = threading.Lock()


def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded handler library, "") or (None, why not, one line); builds it and registers
    the FFI targets on the first call of the process, never again."""
    with _LOAD_LOCK:
        return _load_once()


@functools.cache
def _load_once() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(SWITCH, "1").strip().lower() in _OFF:
        return None, f"turned off by {SWITCH}={os.environ[SWITCH]}"
    if sys.platform != "linux":
        return None, f"built for Linux only (this is {sys.platform})"
    found = _find_onednn()
    if found is None:
        return None, ("oneDNN 3 is not installed (pip install onednn-cpu-gomp "
                      "onednn-devel-cpu-gomp)")
    try:
        headers, runtime = _header_version(found[0]), _library_version(found[1])
        if headers != runtime:
            raise RuntimeError(f"oneDNN's headers are {headers} but its library is {runtime} "
                               f"(in {found[1]}): install one version of both")
        path = _build(*found, runtime)  # rebuilt when not _intact
        library = ctypes.CDLL(str(path))
        built = _string(library, "JrOnednnConvBuiltVersion")
        loaded = _string(library, "JrOnednnConvRuntimeVersion")
        if built != runtime or loaded != runtime:
            raise RuntimeError(f"{path} was built against oneDNN {built} and runs with "
                               f"{loaded}, not {runtime}")
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JrOnednnConv),
                                    platform="cpu")
        for target, symbol in POOL_TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (RuntimeError, OSError, AttributeError) as err:
        return None, " ".join(str(err).split())
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
    records = _string(library, "JrOnednnConvImpls").split(";")
    return [(int(r.split(":", 1)[0]), r.split(":", 1)[1]) for r in records if r]


def describe() -> dict:
    """What the loaded handler is: {'onednn': its version, 'isa': the instruction set
    oneDNN's kernels dispatch to here, 'library': the .so's path, 'manifest': what its build
    wrote (command, warnings), 'dtypes': the dtypes `supports`}. RuntimeError where
    unavailable."""
    library = _load()[0]
    if library is None:
        raise RuntimeError(f"oneDNN's convolutions are unavailable: {unavailable_reason()}")
    path = Path(library._name)
    return {"onednn": _string(library, "JrOnednnConvRuntimeVersion"),
            "isa": _string(library, "JrOnednnConvIsa"), "library": str(path),
            "manifest": _manifest(path),
            "dtypes": [np.dtype(t).name for t in (np.float32, jnp.bfloat16) if supports(t)]}


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


# ------------------------------------------------------------------ refusing misshapen calls
# The handler's own checks (onednn_conv.cc, Mismatch and DtypeMismatch), made here first in
# the same words so that a misshapen call fails where it is traced, with a Python traceback.

# Each function's names for its conv input, kernel and conv (or pooled) output.
_ROLES = {"conv": ("x", "kernel", "output"), "input_grad": ("x_shape", "kernel", "gradient"),
          "kernel_grad": ("x", "k_shape", "gradient"), "conv_pool": ("x", "kernel", "output"),
          "pool_input_grad": ("x", "kernel", "gradient"),
          "pool_kernel_grad": ("x", "k_shape", "gradient")}


def _dtype_mismatch(*roles) -> str:
    """'' when the first (name, dtype) is float32 or bfloat16 and the others are of its dtype,
    else what is wrong."""
    name, first = roles[0][0], np.dtype(roles[0][1])
    if first not in (np.dtype(np.float32), np.dtype(jnp.bfloat16)):
        return f"float32 or bfloat16 only: {name} is {first.name}"
    for other, dtype in roles[1:]:
        if np.dtype(dtype) != first:
            return f"{other} dtype {np.dtype(dtype).name} != {name} dtype {first.name}"
    return ""


def _mismatch(call, x, k, y, strides, pads, pooled) -> str:
    """'' when shapes x [n, h, w, i], k [kh, kw, i, o] and y [n, ho, wo, o] make one
    convolution (with `pooled`, y is the shape of its 2x2/2 max-pool, [n, ho // 2, wo // 2,
    o]), else the first mismatch, named with `call`'s roles. y None: made from x and k."""
    names = dict(zip("xky", _ROLES[call]))
    shapes = {"x": tuple(x), "k": tuple(k), "y": None if y is None else tuple(y)}
    for role, shape in shapes.items():
        if shape is not None and len(shape) != 4:
            return f"{names[role]} shape {shape} is not 4-D"
    x, k, y = shapes.values()
    (top, bottom), (left, right) = pads
    if min(strides) < 1:
        return f"strides ({strides[0]}, {strides[1]}) are not >= 1"
    if min(top, bottom, left, right) < 0:
        return f"pads (({top}, {bottom}), ({left}, {right})) are not >= 0"
    if min(x[1:]) < 1:
        return f"{names['x']} shape {x} has an empty image or channels"
    if min(k) < 1:
        return f"{names['k']} shape {k} has a size of 0"
    if y is not None and x[0] != y[0]:
        return f"{names['x']} batch {x[0]} != {names['y']} batch {y[0]}"
    if x[3] != k[2]:
        return f"{names['x']} channels {x[3]} != {names['k']} input channels {k[2]}"
    if y is not None and y[3] != k[3]:
        return f"{names['y']} channels {y[3]} != {names['k']} output channels {k[3]}"
    for a, axis in enumerate(("height", "width")):
        size, kernel, stride, (lo, hi) = x[1 + a], k[a], strides[a], pads[a]
        if size + lo + hi < kernel:
            return (f"{names['k']} {axis} {kernel} > {names['x']} {axis} {size} + pads "
                    f"{lo}+{hi}")
        how = (f"{names['x']} {axis} {size}, {names['k']} {axis} {kernel}, stride {stride}, "
               f"pads {lo}+{hi}")
        conv = (size + lo + hi - kernel) // stride + 1
        if pooled and conv < 2:
            return f"the conv output's {axis} {conv} has no 2x2 window ({how})"
        want = conv // 2 if pooled else conv
        if y is not None and y[1 + a] != want:
            return (f"{names['y']} {axis} {y[1 + a]} != {want} (the "
                    f"{'pooled ' if pooled else ''}conv's {axis} for {how})")
    return ""


def _check(call, dtypes, x, k, y, strides, pads, pooled=False, mask=None):
    """Raises ValueError('onednn <call>: <the first mismatch>') unless the dtypes ((name,
    dtype) pairs) and shapes make one call of the handler; `mask`: conv_pool's mask, which
    must be uint8 of y's shape."""
    why = _dtype_mismatch(*dtypes) or _mismatch(call, x, k, y, strides, pads, pooled)
    if not why and mask is not None:
        if tuple(mask.shape) != tuple(y):
            why = f"mask shape {tuple(mask.shape)} != {_ROLES[call][2]} shape {tuple(y)}"
        elif mask.dtype != np.uint8:
            why = f"mask dtype {np.dtype(mask.dtype).name} != uint8"
    if why:
        raise ValueError(f"onednn {call}: {why}")


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
    _check("conv", (("x", x.dtype), ("kernel", kernel.dtype)), x.shape, kernel.shape, None,
           strides, pads)
    shape = output_shape(x.shape, kernel.shape, strides, pads)
    return _call(_FORWARD, x, kernel, jax.ShapeDtypeStruct(shape, x.dtype), strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def input_grad(g, kernel, strides, pads, x_shape):
    """The VJP of `conv` w.r.t. x: g [n, ho, wo, o], kernel -> [n, h, w, i] (x_shape)."""
    _check("input_grad", (("gradient", g.dtype), ("kernel", kernel.dtype)), x_shape,
           kernel.shape, g.shape, strides, pads)
    return _call(_INPUT_GRAD, g, kernel, jax.ShapeDtypeStruct(x_shape, g.dtype), strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def kernel_grad(x, g, strides, pads, k_shape):
    """The VJP of `conv` w.r.t. the kernel: x, g [n, ho, wo, o] -> [kh, kw, i, o] (k_shape)."""
    _check("kernel_grad", (("x", x.dtype), ("gradient", g.dtype)), x.shape, k_shape, g.shape,
           strides, pads)
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
    _check("conv_pool", (("x", x.dtype), ("kernel", kernel.dtype)), x.shape, kernel.shape,
           None, strides, pads, pooled=True)
    shape = pooled_shape(x.shape, kernel.shape, strides, pads)
    if ties not in ("split", "first"):
        raise ValueError(f"unknown pool ties {ties!r}")
    return _pool_call("forward", (jax.ShapeDtypeStruct(shape, x.dtype),
                                  jax.ShapeDtypeStruct(shape, np.uint8)),
                      x, kernel, ties_first=np.int64(ties == "first"),
                      chunk_bytes=np.int64(POOL_CHUNK_BYTES), relu_input=np.int64(relu_input),
                      **_geometry(strides, pads))


def _check_unpool(g, mask, y_shape):
    """ValueError('onednn unpool: ...') unless g and mask [n, ph, pw, o] (mask uint8) are the
    2x2/2 pool of y_shape [n, ho, wo, o]."""
    y, p = tuple(y_shape), tuple(g.shape)
    why = ""
    if len(y) != 4 or len(p) != 4:
        why = f"y_shape {y} and gradient shape {p} are not both 4-D"
    elif tuple(mask.shape) != p:
        why = f"mask shape {tuple(mask.shape)} != gradient shape {p}"
    elif mask.dtype != np.uint8:
        why = f"mask dtype {np.dtype(mask.dtype).name} != uint8"
    elif y[0] != p[0]:
        why = f"y_shape batch {y[0]} != gradient batch {p[0]}"
    elif y[3] != p[3]:
        why = f"y_shape channels {y[3]} != gradient channels {p[3]}"
    else:
        for a, axis in enumerate(("height", "width")):
            if p[1 + a] != y[1 + a] // 2:
                why = (f"gradient {axis} {p[1 + a]} != {y[1 + a] // 2} (the pooled {axis} for "
                       f"y_shape {axis} {y[1 + a]})")
                break
    if why:
        raise ValueError(f"onednn unpool: {why}")


def unpool(g: jax.Array, mask: jax.Array, y_shape) -> jax.Array:
    """The transpose of `conv_pool`'s pooling in plain JAX: g and mask [n, ph, pw, o] ->
    [n, ho, wo, o] (y_shape); each corner marked in mask (bit j: corner j of the 2x2
    window, row-major) gets g / (corners marked), every other element 0."""
    _check_unpool(g, mask, y_shape)
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
    dtypes = (("gradient", g.dtype), ("kernel", kernel.dtype)) + ((("x", x.dtype),)
                                                                  if relu_input else ())
    _check("pool_input_grad", dtypes, x.shape, kernel.shape, g.shape, strides, pads,
           pooled=True, mask=mask)
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
    _check("pool_kernel_grad", (("x", x.dtype), ("gradient", g.dtype)), x.shape, k_shape,
           g.shape, strides, pads, pooled=True, mask=mask)
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


# ----------------------------------------------------------------------------- diagnosis


def main() -> int:
    """`python -m jax_robust.onednn`: builds the handler (or finds it cached), runs a conv and
    both its gradients, and prints oneDNN's version, the instruction set it dispatches to,
    the implementations it chose and where the library is; exit status 0. Where it cannot
    build, load or run, one line on stderr saying why, and exit status 1."""
    from jax_robust import onednn  # this file as the package imports it: one registration

    try:
        facts = onednn.describe()
        x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
        jax.block_until_ready(jax.grad(
            lambda x, k: onednn.conv(x, k, (1, 1), ((1, 1), (1, 1))).sum(), (0, 1))(x, k))
    except Exception as err:  # noqa: BLE001 (one line, whatever failed)
        print(f"oneDNN handler unusable: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    kinds = {0: "forward", 1: "input gradient", 2: "kernel gradient"}
    chosen = ", ".join(f"{kinds[kind]} {impl}" for kind, impl in onednn.implementations())
    warnings = facts["manifest"].get("warnings", "").strip()
    print(f"oneDNN {facts['onednn']}")
    print(f"ISA: {facts['isa']} (dnnl_get_effective_cpu_isa); float32 implementations: "
          f"{chosen}")
    print(f"dtypes: {', '.join(facts['dtypes'])}")
    print(f"library: {facts['library']}")
    print(f"built by: {facts['manifest'].get('command', '?')}")
    print(f"build warnings: {warnings or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
