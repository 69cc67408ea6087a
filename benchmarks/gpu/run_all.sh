#!/usr/bin/env bash
# Everything the lent GPU machine has to do for the spherical-harmonics issue, in one call
# (budget: 10 minutes). From the repository root:
#     bash benchmarks/gpu/run_all.sh
# Writes under $OUT (default ./gpu-out): environment, build log, test log, sh_cuda.json.
# STAGES (default "build test bench") picks stages, e.g. STAGES=bench on a warm machine whose
# build from an earlier call is still there. Stage timeouts keep the whole under 10 minutes.
# STAGES=decode (a second call, right after the first: the build stays while the machine is
# warm) times the SHDD decode on CUDA against the naive path and torch-harmonics on the same
# GPU, and the SHDD-KL against the dense path and torch-harmonics (decode_cuda.json, about 3
# minutes), then the refinement's two CUDA routes alone (refine_ab.txt).
# Needs a Python with torch (CUDA build), triton, pytest, pytest-benchmark, scikit-build-core
# and pybind11; sphericart / e3nn / cuequivariance are measured where installed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0
STAGES="${STAGES:-build test bench}"
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

step() { echo; echo "=== $* ($(date +%T))"; }

step environment
{
  nvidia-smi || true
  nvcc --version || true
  git rev-parse HEAD 2>/dev/null || true
  "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "sphericart", "e3nn", "cuequivariance", "cuequivariance_torch", "pytest_benchmark"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "missing:", type(exc).__name__)
PY
} 2>&1 | tee "$OUT/environment.txt"

if has build; then
step "build (LOCDIFF_CUDA=ON)"
if ! LOCDIFF_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" timeout 200 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
tail -3 "$OUT/build.log"
fi
"$PY" -c "import locdiff, sys; print('has_cuda', locdiff.has_cuda()); sys.exit(0 if locdiff.has_cuda() else 1)" \
  || { echo "locdiff was built without CUDA"; exit 1; }

if has test; then
step "tests: CUDA vs CPU, Triton vs CUDA"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_sh_cuda.py tests/test_shdd_cuda.py 2>&1 | tee "$OUT/test_sh_cuda.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "CUDA TESTS FAILED (benchmarks still run)"; status=1; }
fi

if has bench; then
step "benchmarks (device=cuda) and copy bandwidth, same run"
# test_sh_bench.py (lead) parametrises device, impl, op, degree, dtype; keep the CUDA ones.
# Short timing rounds: about 240 CUDA cases must fit in the budget.
timeout 300 "$PY" -m pytest benchmarks --benchmark-only -p no:cacheprovider -q \
  --benchmark-min-rounds=3 --benchmark-max-time=0.25 --benchmark-warmup=on --benchmark-warmup-iterations=1 \
  -k "(sh and cuda and not decode and not test_kl) or gpu_bandwidth" --benchmark-json "$OUT/sh_cuda.json" \
  --benchmark-columns=min,median,rounds 2>&1 | tee "$OUT/bench.txt" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "BENCHMARKS FAILED"; status=1; }
fi

if has decode; then
step "decode and SHDD-KL benchmarks (device=cuda): locdiff vs naive / dense vs torch-harmonics, same run"
timeout 300 "$PY" -m pytest benchmarks/test_decode_bench.py benchmarks/test_kl_bench.py --benchmark-only -p no:cacheprovider -q \
  -k "cuda" --benchmark-json "$OUT/decode_cuda.json" --benchmark-columns=min,median,rounds 2>&1 \
  | tee "$OUT/decode_bench.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "DECODE BENCHMARKS FAILED"; status=1; }
"$PY" benchmarks/report.py "$OUT/decode_cuda.json" 2>&1 | tee "$OUT/decode_summary.txt"
step "refinement on CUDA: torch loop vs one Triton kernel"
timeout 120 "$PY" benchmarks/gpu/refine_ab.py 2>&1 | tee "$OUT/refine_ab.txt"
fi

if has bench; then
step "summary: output bandwidth vs measured copy bandwidth"
"$PY" benchmarks/gpu/summarize.py "$OUT/sh_cuda.json" 2>&1 | tee "$OUT/summary.txt"
fi
exit $status
