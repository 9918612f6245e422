// Fused elementwise kernels for the CUDA path (src/model/fused/): each replaces two of candle's passes
// over a layer's activations with one, or reads a joined projection's output in place. Compiled to PTX
// by build.rs when the `cuda` feature is on; scripts/cuda/emulate-fused.cpp runs them on the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// silu(gate) · up, in f32, rounded once.
template <typename T>
__device__ __forceinline__ T silu_mul_one(const T g, const T u) {
    const float x = static_cast<float>(g);
    return static_cast<T>(x / (1.0f + expf(-x)) * static_cast<float>(u));
}

template <typename T>
__device__ void silu_mul(const T *gate, const T *up, T *out, const size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        out[i] = silu_mul_one(gate[i], up[i]);
    }
}

// The f32 residual stream plus a block's output in the compute dtype.
template <typename T>
__device__ void add_f32(const float *residual, const T *block, float *out, const size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        out[i] = residual[i] + static_cast<float>(block[i]);
    }
}

// The sum over the block of each thread's `sum` (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float sum) {
    __shared__ float partial[32];
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
    return sum;
}

// RMSNorm of f32 rows with an f32 weight, written in the compute dtype: one block per row.
template <typename T>
__device__ void rms_norm_to(const float *x, const float *weight, T *out, const int cols, const float eps) {
    const float *row = x + (size_t)blockIdx.x * cols;
    T *dst = out + (size_t)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        sum += row[c] * row[c];
    }
    const float scale = rsqrtf(block_sum(sum) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dst[c] = static_cast<T>(row[c] * scale * weight[c]);
    }
}

// Vector variants (`ARMORM_FUSED_OPS=vector`, experimental): the same arithmetic on 16-byte loads and
// stores. The H200 check measured the scalar kernels above at 1.2-2.1 TB/s: 2-4 byte accesses keep too
// few bytes in flight for HBM3e. Each falls back to the scalar loop for misaligned pointers and does
// the tail (n not a multiple of the vector width) one value at a time.

template <int BYTES> struct Bits;
template <> struct Bits<2> { typedef unsigned short type; };
template <> struct Bits<4> { typedef unsigned int type; };
template <> struct Bits<8> { typedef uint2 type; };
template <> struct Bits<16> { typedef uint4 type; };

__device__ __forceinline__ bool aligned_to(const void *p, size_t bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// W values of T through one load or store of W * sizeof(T) bytes (8 or 16).
template <typename T, int W> struct Pack {
    typedef typename Bits<W * sizeof(T)>::type bits;
    union {
        bits raw;
        T v[W];
    };
    __device__ __forceinline__ static Pack load(const T *p, size_t chunk) {
        Pack out;
        out.raw = reinterpret_cast<const bits *>(p)[chunk];
        return out;
    }
    __device__ __forceinline__ void store(T *p, size_t chunk) const {
        reinterpret_cast<bits *>(p)[chunk] = raw;
    }
};

template <typename T>
__device__ void silu_mul_vec(const T *gate, const T *up, T *out, const size_t n) {
    constexpr int W = 16 / sizeof(T);
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)blockDim.x * gridDim.x;
    size_t done = 0;
    if (aligned_to(gate, 16) && aligned_to(up, 16) && aligned_to(out, 16)) {
        const size_t chunks = n / W;
        for (size_t c = first; c < chunks; c += stride) {
            const Pack<T, W> g = Pack<T, W>::load(gate, c), u = Pack<T, W>::load(up, c);
            Pack<T, W> o;
#pragma unroll
            for (int k = 0; k < W; ++k) {
                o.v[k] = silu_mul_one(g.v[k], u.v[k]);
            }
            o.store(out, c);
        }
        done = chunks * W;
    }
    for (size_t i = done + first; i < n; i += stride) {
        out[i] = silu_mul_one(gate[i], up[i]);
    }
}

template <typename T>
__device__ void add_f32_vec(const float *residual, const T *block, float *out, const size_t n) {
    constexpr int W = 4;
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)blockDim.x * gridDim.x;
    size_t done = 0;
    if (aligned_to(residual, 16) && aligned_to(out, 16) && aligned_to(block, W * sizeof(T))) {
        const size_t chunks = n / W;
        for (size_t c = first; c < chunks; c += stride) {
            const Pack<float, W> r = Pack<float, W>::load(residual, c);
            const Pack<T, W> b = Pack<T, W>::load(block, c);
            Pack<float, W> o;
#pragma unroll
            for (int k = 0; k < W; ++k) {
                o.v[k] = r.v[k] + static_cast<float>(b.v[k]);
            }
            o.store(out, c);
        }
        done = chunks * W;
    }
    for (size_t i = done + first; i < n; i += stride) {
        out[i] = residual[i] + static_cast<float>(block[i]);
    }
}

template <typename T>
__device__ void rms_norm_to_vec(const float *x, const float *weight, T *out, const int cols, const float eps) {
    constexpr int W = 4;
    const float *row = x + (size_t)blockIdx.x * cols;
    T *dst = out + (size_t)blockIdx.x * cols;
    const bool vec = cols % W == 0 && aligned_to(row, 16) && aligned_to(weight, 16) && aligned_to(dst, W * sizeof(T));
    float sum = 0.0f;
    if (vec) {
        for (int c = threadIdx.x; c < cols / W; c += blockDim.x) {
            const Pack<float, W> v = Pack<float, W>::load(row, c);
#pragma unroll
            for (int k = 0; k < W; ++k) {
                sum += v.v[k] * v.v[k];
            }
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            sum += row[c] * row[c];
        }
    }
    const float scale = rsqrtf(block_sum(sum) / cols + eps);
    if (vec) {
        for (int c = threadIdx.x; c < cols / W; c += blockDim.x) {
            const Pack<float, W> v = Pack<float, W>::load(row, c), w = Pack<float, W>::load(weight, c);
            Pack<T, W> o;
#pragma unroll
            for (int k = 0; k < W; ++k) {
                o.v[k] = static_cast<T>(v.v[k] * scale * w.v[k]);
            }
            o.store(dst, c);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            dst[c] = static_cast<T>(row[c] * scale * weight[c]);
        }
    }
}

// RoPE in place on the query and key heads of one q/k/v projection (`ARMORM_FUSED_OPS=qkv`): `tokens`
// rows of `row` values each, of which the first `heads` heads of `d` values are rotated by their token's
// cos and sin (tokens, d/2) and the rest (the value heads) are left alone. The arithmetic is candle's
// rope_thd, in T. W values of each half at a time: 16 bytes, or 1 (the fallback).
template <typename T, int W>
__device__ void rope_heads(T *x, const T *cos, const T *sin, const size_t tokens, const int heads, const size_t row,
                           const int d) {
    const int half = d / 2, chunks = half / W;
    const size_t per_token = (size_t)heads * chunks, items = tokens * per_token;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < items; i += (size_t)blockDim.x * gridDim.x) {
        const size_t t = i / per_token;
        const int rest = (int)(i - t * per_token), h = rest / chunks, j = (rest - h * chunks) * W;
        T *lo = x + t * row + (size_t)h * d + j, *hi = lo + half;
        const size_t cs = t * half + j;
        const Pack<T, W> a = Pack<T, W>::load(lo, 0), b = Pack<T, W>::load(hi, 0);
        const Pack<T, W> c = Pack<T, W>::load(cos + cs, 0), s = Pack<T, W>::load(sin + cs, 0);
        Pack<T, W> first, second;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            first.v[k] = a.v[k] * c.v[k] - b.v[k] * s.v[k];
            second.v[k] = a.v[k] * s.v[k] + b.v[k] * c.v[k];
        }
        first.store(lo, 0);
        second.store(hi, 0);
    }
}

template <typename T>
__device__ void rope_qk(T *x, const T *cos, const T *sin, const size_t tokens, const int heads, const size_t row,
                        const int d) {
    constexpr int W = 16 / sizeof(T);
    if ((d / 2) % W == 0 && row % W == 0 && aligned_to(x, 16) && aligned_to(cos, 16) && aligned_to(sin, 16)) {
        rope_heads<T, W>(x, cos, sin, tokens, heads, row, d);
    } else {
        rope_heads<T, 1>(x, cos, sin, tokens, heads, row, d);
    }
}

// silu(gate) · up from one gate/up projection (`ARMORM_FUSED_OPS=gateup`): rows of 2 · cols values, the
// gate half first, into rows of cols. W values at a time: 16 bytes, or 1 (the fallback).
template <typename T, int W>
__device__ void silu_mul_halves(const T *gate_up, T *out, const size_t rows, const int cols) {
    const int chunks = cols / W;
    const size_t items = rows * chunks;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < items; i += (size_t)blockDim.x * gridDim.x) {
        const size_t r = i / chunks;
        const int c = (int)(i - r * chunks) * W;
        const T *gate = gate_up + r * 2 * cols + c;
        const Pack<T, W> g = Pack<T, W>::load(gate, 0), u = Pack<T, W>::load(gate + cols, 0);
        Pack<T, W> o;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            o.v[k] = silu_mul_one(g.v[k], u.v[k]);
        }
        o.store(out + r * cols + c, 0);
    }
}

template <typename T>
__device__ void silu_mul_joined(const T *gate_up, T *out, const size_t rows, const int cols) {
    constexpr int W = 16 / sizeof(T);
    if (cols % W == 0 && aligned_to(gate_up, 16) && aligned_to(out, 16)) {
        silu_mul_halves<T, W>(gate_up, out, rows, cols);
    } else {
        silu_mul_halves<T, 1>(gate_up, out, rows, cols);
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
    }                                                                                                      \
    extern "C" __global__ void silu_mul_vec_##NAME(const T *gate, const T *up, T *out, const size_t n) {  \
        silu_mul_vec<T>(gate, up, out, n);                                                                 \
    }                                                                                                      \
    extern "C" __global__ void add_f32_vec_##NAME(const float *residual, const T *block, float *out,       \
                                                  const size_t n) {                                        \
        add_f32_vec<T>(residual, block, out, n);                                                           \
    }                                                                                                      \
    extern "C" __global__ void rms_norm_to_vec_##NAME(const float *x, const float *weight, T *out,         \
                                                      const int cols, const float eps) {                   \
        rms_norm_to_vec<T>(x, weight, out, cols, eps);                                                     \
    }                                                                                                      \
    extern "C" __global__ void silu_mul_joined_##NAME(const T *gate_up, T *out, const size_t rows,         \
                                                      const int cols) {                                    \
        silu_mul_joined<T>(gate_up, out, rows, cols);                                                      \
    }                                                                                                      \
    extern "C" __global__ void rope_qk_##NAME(T *x, const T *cos, const T *sin, const size_t tokens,       \
                                              const int heads, const size_t row, const int d) {            \
        rope_qk<T>(x, cos, sin, tokens, heads, row, d);                                                    \
    }

FUSED(__nv_bfloat16, bf16)
FUSED(__half, f16)
FUSED(float, f32)
