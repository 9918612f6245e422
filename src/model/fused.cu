// Fused elementwise kernels for the CUDA path (src/model/fused.rs): each replaces two of candle's passes
// over a layer's activations with one. Compiled to PTX by build.rs when the `cuda` feature is on.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// silu(gate) · up, in f32, rounded once.
template <typename T>
__device__ void silu_mul(const T *gate, const T *up, T *out, const size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        const float g = static_cast<float>(gate[i]);
        out[i] = static_cast<T>(g / (1.0f + expf(-g)) * static_cast<float>(up[i]));
    }
}

// The f32 residual stream plus a block's output in the compute dtype.
template <typename T>
__device__ void add_f32(const float *residual, const T *block, float *out, const size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        out[i] = residual[i] + static_cast<float>(block[i]);
    }
}

// RMSNorm of f32 rows with an f32 weight, written in the compute dtype: one block per row.
template <typename T>
__device__ void rms_norm_to(const float *x, const float *weight, T *out, const int cols, const float eps) {
    __shared__ float partial[32];
    const float *row = x + (size_t)blockIdx.x * cols;
    T *dst = out + (size_t)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        sum += row[c] * row[c];
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(0xffffffff, sum, offset);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
    if (lane == 0) {
        partial[warp] = sum;
    }
    __syncthreads();
    sum = lane < warps ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(0xffffffff, sum, offset);
    }
    const float scale = rsqrtf(sum / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dst[c] = static_cast<T>(row[c] * scale * weight[c]);
    }
}

#define FUSED(T, NAME)                                                                                     \
    extern "C" __global__ void silu_mul_##NAME(const T *gate, const T *up, T *out, const size_t n) {      \
        silu_mul<T>(gate, up, out, n);                                                                     \
    }                                                                                                      \
    extern "C" __global__ void add_f32_##NAME(const float *residual, const T *block, float *out,           \
                                              const size_t n) {                                            \
        add_f32<T>(residual, block, out, n);                                                               \
    }                                                                                                      \
    extern "C" __global__ void rms_norm_to_##NAME(const float *x, const float *weight, T *out,             \
                                                  const int cols, const float eps) {                       \
        rms_norm_to<T>(x, weight, out, cols, eps);                                                         \
    }

FUSED(__nv_bfloat16, bf16)
FUSED(__half, f16)
FUSED(float, f32)
