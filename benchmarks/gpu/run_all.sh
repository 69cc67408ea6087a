#!/usr/bin/env bash
# Everything a lent GPU machine has to do, in one call of under 8 minutes, build included,
# then the decode matrix in a second call (docs/gpu.md):
#     bash benchmarks/gpu/run_all.sh            (from anywhere; OUT defaults to ./gpu-out)
#     STAGES=decode bash benchmarks/gpu/run_all.sh
# Stages (STAGES, default "build test bench shdd"):
#   build  LOCDIFF_CUDA=ON editable build (also run whenever locdiff is missing or CPU-only)
#   test   the CUDA and Triton tests, every failure listed (no -x)
#   bench  spherical harmonics on CUDA (trimmed matrix, data made on the GPU) + copy bandwidth
#   shdd   decode and SHDD-KL on CUDA
#   decode the whole decode matrix on CUDA (L 16-256, B 1-4096) against the naive path and
#          torch-harmonics; not a default stage: the second call, STAGES=decode
# The anchors' wheels (sphericart, torch-harmonics) are installed from ./.whl when present:
# benchmarks/gpu/fetch_anchors.sh downloads them where PyPI is reachable (docs/gpu.md).
# Each stage has its own timeout (below; the default stages' sum stays under 480 s, and so
# does the decode call's with a rebuild, which tests/test_gpu_script.py checks) and gets
# SIGINT first, so pytest still prints its summary; benchmark figures are appended to
# $OUT/*.jsonl case by case as they finish. The last screen is a summary
# (benchmarks/tools/gpu_summary.py). Anchors that are not installed skip their rows.
# DRY_RUN=1 runs the script's logic on a machine without a GPU: no build, the tests and
# benchmarks collected only, one tiny CPU benchmark through the recorder, the summary.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
STAGES="${STAGES:-build test bench shdd}"
DRY_RUN="${DRY_RUN:-0}"
# Stage timeouts in seconds.
T_BUILD=140
T_TEST=100
T_BENCH=110
T_SHDD=70
T_DECODE=200
status=0
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
step() { echo; echo "=== $* ($(date +%T))"; }
# SIGINT first (pytest reports what ran), SIGKILL 10 s later.
limit() { local t=$1; shift; timeout -s INT -k 10 "$t" "$@"; }
count() { grep -Eo '^[0-9]+ tests? collected|[0-9]+/[0-9]+ tests collected' "$1" | head -1; }

WHEELS=(.whl/*.whl)
if [ -e "${WHEELS[0]}" ]; then
  # Only the wheels this Python can take: one that cannot would fail the whole install.
  PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  FIT=()
  for w in "${WHEELS[@]}"; do
    case "$(basename "$w")" in
      *-py3-none-*|*-py2.py3-none-*|*-"$PYTAG"-*) FIT+=("$w") ;;
      *) echo "anchor wheel $(basename "$w") is not for $PYTAG: its rows skip" ;;
    esac
  done
  step "anchors: installing ${#FIT[@]} of ${#WHEELS[@]} wheels from .whl"
  SITE="$(mktemp -d)"
  # One install for all: sphericart's torch binding goes into sphericart's own folder.
  if [ "${#FIT[@]}" -gt 0 ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SITE" "${FIT[@]}" > "$OUT/wheels.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    tail -3 "$OUT/wheels.log" 2>/dev/null; echo "anchor wheels not installed: their rows skip"
  fi
fi

step environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "sphericart.torch", "torch_harmonics", "pytest_benchmark", "scikit_build_core", "pybind11"):
    try:
        m = importlib.import_module(name)
        print(" ", name, getattr(m, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(" ", name, "missing:", type(exc).__name__)
PY
  cmake --version 2>/dev/null | head -1 || echo "no cmake"
  nvcc --version 2>/dev/null | tail -2 | head -1 || echo "no nvcc"
} 2>&1 | tee "$OUT/environment.txt"

has_cuda_build() { "$PY" -c "import locdiff, sys; sys.exit(0 if locdiff.has_cuda() else 1)" 2>/dev/null; }
if [ "$DRY_RUN" = 1 ]; then
  step "build: skipped (dry run)"
  "$PY" -c "import locdiff" || { echo "DRY RUN: locdiff does not import"; exit 1; }
elif has build || ! has_cuda_build; then
  step "build (LOCDIFF_CUDA=ON, budget ${T_BUILD}s)"
  if ! LOCDIFF_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" limit "$T_BUILD" "$PY" -m pip install \
      --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  tail -2 "$OUT/build.log"
  has_cuda_build || { echo "locdiff was built without CUDA (is nvcc on PATH?)"; exit 1; }
fi

# The op table's interpreted Triton rows are CPU work (minutes): CI runs them, not the GPU budget.
TESTS="tests/test_sh_cuda.py tests/test_shdd_cuda.py tests/test_op_table.py
       --deselect tests/test_op_table.py::test_interpreted_triton_rows"
if has test; then
  step "tests: CUDA vs CPU, Triton vs CUDA, the op table (budget ${T_TEST}s)"
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m pytest -p no:cacheprovider --collect-only -q $TESTS > "$OUT/tests.txt" 2>&1 || status=1
    echo "collected: $(count "$OUT/tests.txt")"
  else
    limit "$T_TEST" "$PY" -m pytest -p no:cacheprovider -rfEs --tb=short --junitxml="$OUT/tests.xml" $TESTS \
      > "$OUT/tests.txt" 2>&1 || { echo "CUDA TESTS FAILED (benchmarks still run)"; status=1; }
    grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
  fi
  tail -1 "$OUT/tests.txt"
fi

# pytest-benchmark options for short rounds; the per-case recorder writes $OUT/<name>.jsonl.
BENCH_OPTS="--benchmark-only -p no:cacheprovider -q --benchmark-min-rounds=3 --benchmark-max-time=0.1
  --benchmark-warmup=on --benchmark-warmup-iterations=1 --benchmark-columns=min,median,rounds"
bench() {  # bench NAME BUDGET -k EXPR FILES...
  local name=$1 budget=$2; shift 2
  rm -f "$OUT/$name.jsonl"
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m pytest -p no:cacheprovider --collect-only -q "$@" > "$OUT/$name.txt" 2>&1 || status=1
    echo "collected: $(count "$OUT/$name.txt")"
    grep -q " collected" "$OUT/$name.txt" && ! grep -q "^0 tests\| 0/" "$OUT/$name.txt" \
      || { echo "DRY RUN: no $name benchmark selected"; status=1; }
  else
    LOCDIFF_BENCH_JSONL="$OUT/$name.jsonl" limit "$budget" "$PY" -m pytest $BENCH_OPTS \
      --benchmark-json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1 || { echo "$name BENCHMARKS FAILED"; status=1; }
    tail -3 "$OUT/$name.txt"
  fi
}

if has bench; then
  step "spherical harmonics on CUDA and copy bandwidth (budget ${T_BENCH}s)"
  bench sh_cuda "$T_BENCH" -k "(test_sh and cuda) or gpu_bandwidth" benchmarks/test_sh_bench.py \
    benchmarks/test_gpu_bandwidth.py
fi

if has shdd; then
  step "decode and SHDD-KL on CUDA (budget ${T_SHDD}s)"
  LOCDIFF_BENCH_CUDA_DECODE="${LOCDIFF_BENCH_CUDA_DECODE:-32,128}" bench shdd_cuda "$T_SHDD" -k cuda \
    benchmarks/test_decode_bench.py benchmarks/test_kl_bench.py
fi

if has decode; then
  step "decode matrix on CUDA against the naive path and torch-harmonics (budget ${T_DECODE}s)"
  LOCDIFF_BENCH_CUDA_DECODE= bench decode_cuda "$T_DECODE" -k "cuda" benchmarks/test_decode_bench.py
fi

if [ "$DRY_RUN" = 1 ]; then
  step "dry run: one CPU benchmark through the per-case recorder"
  LOCDIFF_BENCH_VALUES=4096 LOCDIFF_BENCH_JSONL="$OUT/sh_cuda.jsonl" "$PY" -m pytest $BENCH_OPTS \
    "benchmarks/test_sh_bench.py::test_sh[cpu-4-locdiff-float32-fwd]" > "$OUT/dry_bench.txt" 2>&1 \
    || { tail -20 "$OUT/dry_bench.txt"; status=1; }
  [ -s "$OUT/sh_cuda.jsonl" ] || { echo "DRY RUN: the recorder wrote nothing"; status=1; }
fi

step summary
"$PY" benchmarks/tools/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.txt"
exit $status
