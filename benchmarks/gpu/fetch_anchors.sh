#!/usr/bin/env bash
# Downloads the anchors' wheels (sphericart with its torch binding, torch-harmonics) into
# ./.whl for a GPU machine that cannot reach PyPI; run_all.sh installs them from there.
#     bash benchmarks/gpu/fetch_anchors.sh       (here, where PyPI is reachable)
# PY_VERSION is the GPU machine's Python (default 3.12); the wheels are x86-64 Linux builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
PY_VERSION="${PY_VERSION:-3.12}"
ANCHORS="${ANCHORS:-sphericart==2.0.4 sphericart-torch==2.0.4 torch-harmonics==0.9.3}"
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# shellcheck disable=SC2086 # ANCHORS is a list of requirements
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platforms[@]}" -d .whl $ANCHORS
ls -l .whl
echo "carry .whl with the call: run_all.sh installs every wheel in it"
