#!/usr/bin/env bash
# The GPU check, prepared to run on a device machine that has torch and transformers but no Rust and no
# internet. Build and pack the binary here first:
#   scripts/build-cuda.sh && mkdir -p target/gpu && xz -9 -T2 -c target/release/armorm-cuda > target/gpu/armorm.xz
# then, on the device machine (carry target/gpu):
#   bash scripts/gpu-check.sh target/gpu/armorm.xz
# It generates random bf16 weights of ArmoRM-Llama3-8B's shape, checks armorm against transformers,
# times both on the same 512 rows and prints tokens/s, the ratio and MFU (scripts/gpu_check.py).
# Budget: about 8 minutes on an H100 (weights ~2 min, two armorm runs and two transformers loads).
set -euo pipefail
cd "$(dirname "$0")/.."
packed=${1:-target/gpu/armorm.xz}
work=${WORK:-/tmp/armorm-gpu-check}
mkdir -p "$work"

bin="$work/armorm"
case "$packed" in
  # Python's lzma: the device image need not have the xz tool.
  *.xz) python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$packed" "$bin" ;;
  *) cp "$packed" "$bin" ;;
esac
chmod +x "$bin"

# libcublas.so.13, libcurand.so.10 and libcudart.so.13 come with PyTorch's CUDA 13 wheels.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
libs=$(find "$site/nvidia" -type d -name lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$bin" --version

PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --armorm "$bin" --work "$work" "${@:2}" 2>&1 \
  | tee "${OUT:-$work}/gpu-check.log"
