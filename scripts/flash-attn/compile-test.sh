#!/usr/bin/env bash
# Compiles the trimmed candle-flash-attn kernels (3 files) with the crate's own nvcc flags plus the
# FLASHATTENTION_DISABLE_* defines, times each, and checks that nothing references a dropped kernel.
set -euo pipefail
mkdir -p "${OBJ:-/tmp/fa-obj}"
C=$(realpath ${CUDA_VENV:-target/cuda-venv}/lib/python3*/site-packages/nvidia/cu13)
CUT=$HOME/.cudaforge/git/checkouts/cutlass-7d49e6c7e2f8896c
cd "${FA_DIR:?set FA_DIR to a copy of candle-flash-attn-0.11.1 with trim.patch applied}"
FLAGS=(-std=c++17 -O3 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__
  -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math
  -DFLASHATTENTION_DISABLE_DROPOUT -DFLASHATTENTION_DISABLE_ALIBI -DFLASHATTENTION_DISABLE_SOFTCAP
  -DFLASHATTENTION_DISABLE_LOCAL -DFLASHATTENTION_DISABLE_UNEVEN_K
  -Xcompiler -fPIC -gencode arch=compute_90,code=sm_90 -I "$CUT/include" -I "$CUT/tools/util/include" -I kernels)
export PATH="$C/bin:$PATH"
nvcc --version | tail -2
for f in flash_api flash_fwd_hdim128_bf16_causal_sm80 flash_fwd_hdim128_fp16_causal_sm80; do
  ( s=$(date +%s); nvcc "${FLAGS[@]}" -c "kernels/$f.cu" -o "${OBJ:-/tmp/fa-obj}/$f.o" 2> "${OBJ:-/tmp/fa-obj}/$f.log";
    echo "$f: $(( $(date +%s) - s )) s, $(stat -c %s ${OBJ:-/tmp/fa-obj}/$f.o) bytes" ) &
done
wait
echo "undefined run_mha_fwd symbols (must all be defined by the kernel objects):"
nm -C --undefined-only ${OBJ:-/tmp/fa-obj}/flash_api.o | grep -i "run_mha" || true
echo "defined:"
nm -C --defined-only ${OBJ:-/tmp/fa-obj}/flash_fwd_*.o | grep -i " T .*run_mha_fwd_<" || true
