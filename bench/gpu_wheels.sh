#!/usr/bin/env bash
# Download, here, the wheels of every pure-Python dependency the GPU paths import (bench/gpu_check.py,
# bench/throughput.py) into the git-ignored .whl/, for a GPU machine that has PyTorch and no package index.
#
#   bash bench/gpu_wheels.sh                 # for the GPU image's CPython 3.12 (see bench/RESULTS.md)
#   PY_VERSION=3.11 bash bench/gpu_wheels.sh # for another CPython
#
# The GPU image (its own pip list) already has torch, numpy, pillow, pyyaml, fsspec, packaging, psutil, tqdm,
# ninja, py-cpuinfo, msgpack and einops; only what it lacks is fetched, at the versions this project pins.
# DeepSpeed comes as its sdist and is built there with DS_BUILD_OPS=0 (bench/gpu_run.sh): a wheel built here
# would record this machine's CPU torch. DALI's wheel (nvidia-dali-cuda130, about 200 MB) is too large for the
# 64 MiB carry limit: the GPU check skips its loader parts and measures the PIL loader instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
PIP=${PIP:-/work/main/.venv/bin/python -m pip}
DEST=${DEST:-.whl}
ABI="cp${PY_VERSION/./}"
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/*.tar.gz

# name==version, as resolved in this project's venv
WHEELS=(
  kornia==0.9.0 kornia-rs==0.2.0 webdataset==1.0.2 braceexpand==0.1.7
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for spec in "${WHEELS[@]}"; do
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$DEST" "$spec"
done
# the sdist alone, unbuilt (pip download would build its metadata, importing torch)
$PIP download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST" deepspeed==0.19.8 2>/dev/null \
  || $PIP download -q --no-deps --no-binary=:all: -d "$DEST" deepspeed==0.19.8
ls -l "$DEST"
total=$(du -cb "$DEST"/* | tail -1 | cut -f1)
echo "total $((total / 1024)) KiB in $(ls "$DEST" | wc -l) files for CPython $PY_VERSION (carry limit 64 MiB)"
