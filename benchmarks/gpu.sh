#!/usr/bin/env bash
# The GPU benchmark of issue 15 (deliverable 5) in one command, under ~9 minutes wall:
#
#   bash benchmarks/gpu.sh                  # on the GPU machine, from any directory
#   GPU_SH_QUICK=1 OUT=/tmp/q bash benchmarks/gpu.sh   # plumbing check anywhere (CPU: minutes)
#
# Parts, each under `timeout` (budgets shrink to what is left of GPU_SH_BUDGET seconds):
#   env  nvidia-smi, python, jax/torch versions and devices; only if JAX has no GPU backend or
#        torch no CUDA (and a GPU is there): pip installs with short timeouts (no network is
#        fine: noted, and the parts run on what there is)
#   a    benchmarks/at_step.py: WRN-40-10 AT step (PGD-10 + SGD), batch 128, float32, JAX vs
#        torch_nchw, torch_cl, torch_compile, torch_compile_nograd; --peak_tflops = the GPU's
#        dense TF32 peak (JAX's default float32 precision on convolutions and matmuls)
#   b    the same in bfloat16 (JAX dtype=bfloat16; PyTorch autocast), the dense BF16 peak
#   d    benchmarks/autoattack.py: AutoAttack's standard version on CNN1 (1 epoch of AT here),
#        ours against the reference (pyautoattack, if installed with CUDA torch) on the same
#        points: robust accuracy, agreement, time (issue 25)
#   c    benchmarks/separation.py --full: train-train l_inf separation of 60,000 x 60,000 x 784
#        (sklearn and numpy on --baseline_queries, extrapolated). Fashion-MNIST from
#        $FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist, shared/fashion-mnist or
#        data/fashion-mnist; else synthetic IDX files of its shape (random grey levels, 6,000
#        per class: the exact brute force's work depends on the class sizes only)
# Output in $OUT if set, else ./gpu_results/: env.log, a_wrn_float32.log, b_wrn_bfloat16.log,
# c_separation.log and summary.txt (the RESULT lines, tables and separation lines, written
# after each part). Exits 0 whatever failed; summary.txt says which part did.
# torch.compile runs with --torch_compile_cache (inductor's caches, empty at the start of the
# script: the recompile after dynamo's resets and the graphs the two compiled modes share hit
# them, so torch_compile_nograd's compile time is a little low) to fit the time;
# GPU_SH_FRESH_COMPILE=1 compiles each mode in an empty cache (honest compile times, slower).
# Knobs: PYTHON (default python3), GPU_SH_BUDGET (530 s), GPU_SH_TORCH_MODES, PEAK_TF32,
# PEAK_BF16, GPU_SH_SYNTHETIC=1 (synthetic separation data even when the real data are there).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 0
ROOT=$PWD
OUTDIR=${OUT:-$ROOT/gpu_results}
mkdir -p "$OUTDIR"
QUICK=${GPU_SH_QUICK:-0}
PY=${PYTHON:-python3}
BUDGET=${GPU_SH_BUDGET:-530}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in one process: JAX takes 45% up front, PyTorch grows into
# the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
# Inductor's caches start empty in every run of this script (a rerun on a warm machine would
# otherwise report cached compiles); within the run they serve --torch_compile_cache.
TMPDIRS=()
trap 'rm -rf "${TMPDIRS[@]}"' EXIT
if [ -z "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) && TMPDIRS+=("$TORCHINDUCTOR_CACHE_DIR")
    export TORCHINDUCTOR_CACHE_DIR
fi
SUMMARY=$OUTDIR/summary.txt
: >"$SUMMARY"
FAILED=()
T0=$SECONDS

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
# budget <wanted seconds> <seconds to keep for later parts>: min(wanted, left - reserve), >= 30
budget() {
    local b=$(($(left) - $2))
    ((b > $1)) && b=$1
    ((b < 30)) && b=30
    echo $b
}

REV=$(git rev-parse --short HEAD 2>/dev/null) \
    && { git diff --quiet HEAD 2>/dev/null || REV+=+dirty; }
note "gpu.sh $(date -Is) quick=$QUICK budget=${BUDGET}s out=$OUTDIR git ${REV:-n/a}"

# ---------------------------------------------------------------- env
ENVLOG=$OUTDIR/env.log
{
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
        || echo "no nvidia-smi"
    echo "== python: $(command -v "$PY") $($PY --version 2>&1)"
} 2>&1 | tee "$ENVLOG"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
HAVE_GPU=0
[ -n "$GPU_NAME" ] && HAVE_GPU=1

if [ "$QUICK" != 1 ] && [ "$HAVE_GPU" = 1 ]; then
    PIP="timeout 150 $PY -m pip install -q --retries 0 --timeout 10"
    if ! $PY -c "import jax; assert jax.default_backend() == 'gpu'" >>"$ENVLOG" 2>&1; then
        note "env: JAX has no GPU backend; trying pip (the project's [cuda] extra)"
        { $PIP 'jax[cuda12]==0.10.2' || $PIP -e '.[cuda]'; } >>"$ENVLOG" 2>&1 \
            || note "env: pip install of jax[cuda12] failed (no network?); JAX runs as it is"
    fi
    if ! $PY -c "import torch; assert torch.cuda.is_available()" >>"$ENVLOG" 2>&1; then
        note "env: torch without CUDA; trying pip"
        { $PIP torch --index-url https://download.pytorch.org/whl/cu124 || $PIP torch; } \
            >>"$ENVLOG" 2>&1 \
            || note "env: pip install of torch failed (no network?); torch runs as it is"
    fi
fi

$PY - >>"$ENVLOG" 2>&1 <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
             "torch", "triton", "numpy", "scikit-learn"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
import jax
print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}")
try:
    import torch
    print(f"torch {torch.__version__} cuda {torch.version.cuda} available "
          f"{torch.cuda.is_available()}"
          + (f" {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
except ImportError as e:
    print(f"torch: {e}")
EOF
[ $? = 0 ] || note "env: the version check failed (see env.log)"
grep -E '^(jax .* backend|torch .* cuda|torch:)' "$ENVLOG" | tee -a "$SUMMARY"

# The project's CPU XLA flag (speed_flags.py) on this XLA: an unknown flag aborts XLA.
SPEED=--speed_flags
if ! $PY -c "from jax_robust.speed_flags import append_speed_flags
print('XLA_FLAGS', append_speed_flags())
import jax.numpy as jnp
jnp.zeros(1).block_until_ready()" >>"$ENVLOG" 2>&1; then
    SPEED=--nospeed_flags
    note "env: XLA rejects the project's CPU speed flags: at_step.py --nospeed_flags;" \
        "separation.py may fail"
fi

# Dense peaks (vendor datasheets, TFLOP/s without sparsity) by the GPU's name.
case "$GPU_NAME" in
    *H100*PCIe*) TF32=378; BF16=756.5 ;;
    *H100*NVL* | *H200*NVL*) TF32=417.5; BF16=835.5 ;;
    *A100*) TF32=156; BF16=312 ;;
    *) TF32=494.7; BF16=989.4 ;;  # H100 SXM, H200 (SXM), GH200; the default
esac
TF32=${PEAK_TF32:-$TF32}
BF16=${PEAK_BF16:-$BF16}
note "env: GPU '${GPU_NAME:-none}': dense peaks TF32 $TF32, BF16 $BF16 TFLOP/s"

# ---------------------------------------------------------------- a, b: the AT step
if [ "$QUICK" = 1 ]; then
    AT_ARGS=(--models=wrn --wrn_depth=10 --wrn_width=1 --batch=128 --repeats=1 --steps=1
             --warmup=0 --pgd_steps=2 --peak_size=512)
    MODES=${GPU_SH_TORCH_MODES:-torch_nchw,torch_compile_nograd}
else
    AT_ARGS=(--models=wrn --wrn_depth=40 --wrn_width=10 --batch=128 --repeats=3 --steps=2)
    MODES=${GPU_SH_TORCH_MODES:-torch_nchw,torch_cl,torch_compile,torch_compile_nograd}
fi
AT_ARGS+=(--torch_modes="$MODES" --json "$SPEED")
[ "${GPU_SH_FRESH_COMPILE:-0}" = 1 ] || AT_ARGS+=(--torch_compile_cache)

# run_part <name> <log> <seconds> <command...>: runs it under timeout, tees the log
run_part() {
    local name=$1 log=$2 secs=$3
    shift 3
    note "part $name: $(printf '%q ' "$@")(timeout ${secs}s, at $((SECONDS - T0))s)"
    timeout -k 15 "$secs" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then
        note "part $name: ok in $((SECONDS - T0))s total"
    else
        [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc="$rc (timed out after ${secs}s)"
        FAILED+=("$name")
        note "part $name: FAILED, exit $rc (see $(basename "$log"))"
    fi
}

at_part() {  # at_part <part> <dtype> <peak> <seconds>
    local log=$OUTDIR/$1_wrn_$2.log
    run_part "$1 (WRN AT step, $2)" "$log" "$4" \
        "$PY" benchmarks/at_step.py "${AT_ARGS[@]}" --dtype="$2" --peak_tflops="$3"
    grep -E '^(RESULT |\| |AT step:|float32 matmul peak|wrn +(torch|jax|best))' "$log" \
        | grep -v ' rep [0-9]' >>"$SUMMARY"
}

at_part a float32 "$TF32" "$(budget 270 270)"
at_part b bfloat16 "$BF16" "$(budget 270 60)"

# ---------------------------------------------------------------- c: separation, 60k x 60k
has_idx() {
    local d=$1 f
    [ -n "$d" ] || return 1
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
             t10k-labels-idx1-ubyte; do
        [ -f "$d/$f.gz" ] || [ -f "$d/$f" ] || return 1
    done
}
DATA=
if [ "${GPU_SH_SYNTHETIC:-0}" != 1 ]; then
    for d in "${FASHION_MNIST_DIR:-}" /usr/share/datasets/fashion-mnist \
             "$ROOT/shared/fashion-mnist" "$ROOT/data/fashion-mnist"; do
        if has_idx "$d"; then DATA=$d; break; fi
    done
fi
if [ -n "$DATA" ]; then
    note "part c: Fashion-MNIST from $DATA"
else
    DATA=$(mktemp -d) && TMPDIRS+=("$DATA")
    if $PY - "$DATA" <<'EOF'
import gzip, sys
import numpy as np
rng = np.random.default_rng(0)
def write(name, a):
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    with gzip.open(f"{sys.argv[1]}/{name}.gz", "wb", compresslevel=1) as f:
        f.write(header + a.astype(np.uint8).tobytes())
for split, n in (("train", 60000), ("t10k", 10000)):
    write(f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write(f"{split}-labels-idx1-ubyte", rng.permutation(np.repeat(np.arange(10), n // 10)))
EOF
    then
        note "part c: no Fashion-MNIST found: SYNTHETIC data of its shape in $DATA (random" \
            "grey levels, 6,000 per class: the brute force's time depends on the class sizes" \
            "only; the distances are not Fashion-MNIST's)"
    else
        DATA=
        FAILED+=("c (no data)")
        note "part c: SKIPPED: no Fashion-MNIST and the synthetic data could not be written"
    fi
fi
if [ -n "$DATA" ]; then
    if [ "$QUICK" = 1 ]; then
        SEP_ARGS=(--n=1000 --baseline_queries=64)
    else
        SEP_ARGS=(--full --baseline_queries=32)  # sklearn, numpy: ~10-60 s on 32 x 60k
    fi
    SEPLOG=$OUTDIR/c_separation.log
    run_part "c (separation)" "$SEPLOG" "$(budget 150 100)" \
        "$PY" benchmarks/separation.py --data_dir="$DATA" "${SEP_ARGS[@]}"
    grep -E '^(fashion_mnist train-train|jax_|sklearn|numpy|ratio )' "$SEPLOG" \
        | grep -v ': tiles ' >>"$SUMMARY"
fi

# ---------------------------------------------------------------- d: AutoAttack
if [ -n "$DATA" ]; then
    if [ "$QUICK" = 1 ]; then
        AA_ARGS=(--archs=cnn1 --n=50 --train_size=500)
    else
        AA_ARGS=(--archs=cnn1 --n=1000)
    fi
    AALOG=$OUTDIR/d_autoattack.log
    run_part "d (AutoAttack)" "$AALOG" "$(budget 100 0)" \
        "$PY" benchmarks/autoattack.py --data_dir="$DATA" "${AA_ARGS[@]}"
    grep -E '^\|' "$AALOG" >>"$SUMMARY"
fi

# ---------------------------------------------------------------- end
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
    >>"$ENVLOG" 2>&1
if [ ${#FAILED[@]} = 0 ]; then
    note "gpu.sh: all parts ok in $((SECONDS - T0))s"
else
    note "gpu.sh: FAILED parts: ${FAILED[*]}; $((SECONDS - T0))s"
fi
echo "== summary.txt ($SUMMARY)"
cat "$SUMMARY"
exit 0
