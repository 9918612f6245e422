#!/usr/bin/env bash
# Builds target/release/armorm-cuda with candle's CUDA backend and flash attention on a machine without a
# GPU: the toolkit (nvcc, headers, libraries) comes from PyPI's NVIDIA wheels, CUTLASS (for flash
# attention's kernels) from ../shared/cutlass. CUDA_COMPUTE_CAP defaults to 90 (H100/H200; FlashAttention-3
# is then built as well, `--attention flash3`);
# FEATURES=cuda builds without flash attention.
# The binary needs libcuda.so.1 (the driver), libcublas.so.13, libcurand.so.10 and libcudart.so.13 where it
# runs: PyTorch's CUDA 13 wheels carry the last three (scripts/gpu-check.sh puts them on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/cuda-venv
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv"
fi
# 13.0, not 13.5: cudarc 0.19 does not know newer toolkits; nvidia-cuda-crt holds crt/host_config.h.
"$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas nvidia-curand
C=$(realpath "$venv"/lib/python3*/site-packages/nvidia/cu13)

# The linker asks for unversioned names the wheels do not ship.
for lib in libcublas libcublasLt libcudart libnvrtc libcurand; do
  real=$(ls "$C/lib/$lib.so."* | sort | head -n 1)
  ln -sf "$(basename "$real")" "$C/lib/$lib.so"
done
# The driver library is not in any wheel: link against a stub of the entry points cudarc binds. It is
# never shipped; the real driver provides libcuda.so.1 at run time.
mkdir -p "$C/lib/stubs"
sed 's/.*/void &(void) {}/' scripts/cuda/libcuda-symbols.txt > "$C/lib/stubs/libcuda-stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$C/lib/stubs/libcuda-stub.c"

# armorm's fused kernels (src/model/fused.cu) run on the host first, each vector kernel against its
# scalar one (scripts/cuda/emulate-fused.cpp): a wrong index fails here, not on a rented GPU.
g++ -O1 -std=c++20 -pthread -I"$C/include" scripts/cuda/emulate-fused.cpp -o target/emulate-fused
target/emulate-fused

# FlashAttention-3 (`--attention flash3`) has Hopper kernels only (sm_90a): built for compute cap 90.
cap=${CUDA_COMPUTE_CAP:-90}
if [ "$cap" = 90 ]; then default_features=cuda,flash-attn,flash-attn-v3; else default_features=cuda,flash-attn; fi
features=${FEATURES:-$default_features}
# candle-flash-attn's build helper clones CUTLASS from GitHub unless a checkout of the pinned commit is
# cached where it looks: put one there from ../shared (no network).
case "$features" in
  *flash-attn*) bash ../shared/cutlass/install.sh ;;
esac

# LIBRARY_PATH (not RUSTFLAGS) points the linker at them, so the default build's artifacts stay valid.
PATH="$C/bin:$PATH" CUDA_ROOT="$C" CUDA_COMPUTE_CAP="$cap" \
  LIBRARY_PATH="$C/lib:$C/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" \
  cargo build --release --features "$features"
cp target/release/armorm target/release/armorm-cuda
cargo build --release
echo "built target/release/armorm-cuda"
