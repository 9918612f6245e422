#!/usr/bin/env bash
# The GPU check, prepared to run on a device machine that has torch and transformers but no Rust and no
# internet. Build and pack the binary here first:
#   scripts/build-cuda.sh && mkdir -p target/gpu && xz -9 -T2 -c target/release/armorm-cuda > target/gpu/armorm.xz
# then, on the device machine (carry target/gpu):
#   bash scripts/gpu-check.sh target/gpu/armorm.xz
# It generates random bf16 weights of ArmoRM-Llama3-8B's shape, then (scripts/gpu_check.py): the first-run
# kernel compile, armorm bf16 (flash attention, fused ops) on 1,024 short rows and on 32 long rows, one
# ARMORM_PROFILE=1 run of each (and of the experimental fused kernels together, with FlashAttention-2 and
# with FlashAttention-3), the same sets with --attention flash3 (alone, and with every experimental
# kernel), with the experimental kernels added one at a time (vector, qkv, gateup, accumulate), with
# ARMORM_KEEP_FREED=0 and with ARMORM_FUSED_OPS=0, torch's GEMM rate on the projections' shapes and its
# FA2 varlen kernel on the same rows, transformers bf16 at several sorted batch sizes on both, f32 parity
# on short and long rows, the bf16 Pearson figures, the same with ARMORM_BF16_RESIDUAL=1, and armorm with the
# old blocked attention; a one-screen summary ends the log. Extra arguments go to gpu_check.py (e.g.
# `--skip profile,parity`, `--best-of-8`, `--time-limit 300`); `--help` lists them.
# Budget: about 6 minutes on an H200 with every phase (measured 2026-11-28: 347 s and 306 s for the two
# runs in scripts/perf-notes.md 15; the phases added since, ~3 minutes more, predicted; perf-notes 17
# gives the --skip list for the next run); phases not started by --time-limit (400 s) are skipped; the log and
# gpu-check.json go to $OUT. The working tree that travels must stay under 64 MiB: move the fixture
# models' weights (fixtures/tiny-armorm*/ *.safetensors, tokenizer.json) aside for the call.
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

out=${OUT:-$work}
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --armorm "$bin" --work "$work" --json "$out/gpu-check.json" \
  "${@:2}" 2>&1 | tee "$out/gpu-check.log"
