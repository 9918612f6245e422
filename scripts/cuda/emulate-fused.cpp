// The fused kernels of src/model/fused.cu run on the host: every CUDA thread of a block in turn (the
// elementwise kernels, which never synchronize) or each on a thread of its own with a barrier for
// __syncthreads and for each warp shuffle (the RMSNorm kernels; every thread of a block reaches each
// one). It compares the 16-byte-access kernels with the scalar ones, on aligned and misaligned
// pointers and on sizes with and without a tail, and the norm with a plain f64 reference. The GPU
// self-check compares both with candle's ops on the card; this runs where no GPU is, at each CUDA build
// (scripts/build-cuda.sh). Exit status 1 on any difference beyond rounding.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
struct Dim {
    unsigned x = 0, y = 0, z = 0;
};
static Dim blockIdx, blockDim, gridDim;
static thread_local Dim threadIdx;
static std::barrier<> *block_barrier;
static float shuffled[1024];
static float shuffle_xor(float v, int offset) {
    shuffled[threadIdx.x] = v;
    block_barrier->arrive_and_wait();
    const float r = shuffled[threadIdx.x ^ offset];
    block_barrier->arrive_and_wait();
    return r;
}
#include <vector_types.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#undef __shared__
#define __shared__ static
#define __shfl_xor_sync(mask, v, offset) shuffle_xor(v, offset)
#define __syncthreads() block_barrier->arrive_and_wait()
#define rsqrtf(x) (1.0f / sqrtf(x))
#include "../../src/model/fused.cu"

// Grid-stride kernels: a small grid covers any n, one thread after another.
template <typename F> static void launch_elementwise(size_t n, F kernel) {
    gridDim.x = (unsigned)std::min<size_t>(std::max<size_t>((n + 255) / 256, 1), 3);
    blockDim.x = 256;
    for (unsigned b = 0; b < gridDim.x; ++b) {
        for (unsigned t = 0; t < blockDim.x; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            kernel();
        }
    }
}

// One block per row, as src/model/fused/cuda.rs launches the norm.
template <typename F> static void launch_rows(unsigned rows, int cols, F kernel) {
    gridDim.x = rows;
    blockDim.x = std::min(std::max((cols + 31) / 32, 1), 32) * 32;
    for (unsigned b = 0; b < rows; ++b) {
        blockIdx.x = b;
        std::barrier<> barrier(blockDim.x);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < blockDim.x; ++t) {
            threads.emplace_back([&, t] {
                threadIdx.x = t;
                kernel();
            });
        }
        for (auto &t : threads) {
            t.join();
        }
    }
}

template <typename T> static int elementwise(size_t n, size_t off) {
    std::mt19937 rng(n * 31 + off);
    std::normal_distribution<float> d(0, 1);
    const size_t len = n + off + 8;
    std::vector<T> g(len), u(len), s1(len), s2(len);
    std::vector<float> r(len), a1(len), a2(len);
    for (size_t i = 0; i < len; ++i) {
        g[i] = T(d(rng));
        u[i] = T(d(rng));
        r[i] = d(rng);
    }
    launch_elementwise(n, [&] { silu_mul<T>(&g[off], &u[off], &s1[off], n); });
    launch_elementwise(n, [&] { silu_mul_vec<T>(&g[off], &u[off], &s2[off], n); });
    launch_elementwise(n, [&] { add_f32<T>(&r[off], &g[off], &a1[off], n); });
    launch_elementwise(n, [&] { add_f32_vec<T>(&r[off], &g[off], &a2[off], n); });
    int bad = 0;
    for (size_t i = 0; i < len; ++i) {
        bad += std::memcmp(&s1[i], &s2[i], sizeof(T)) != 0;
        bad += a1[i] != a2[i];
    }
    if (bad) {
        std::printf("silu_mul/add_f32 vector != scalar: %zu-byte values, n %zu, offset %zu: %d\n", sizeof(T), n,
                    off, bad);
    }
    return bad;
}

template <typename T> static int norm(int rows, int cols, int off) {
    std::mt19937 rng(rows * cols + off);
    std::normal_distribution<float> d(0, 1);
    const size_t n = (size_t)rows * cols, len = n + off + 8;
    std::vector<float> x(len), w(cols + off + 8);
    std::vector<T> o1(len), o2(len);
    for (auto &v : x) {
        v = d(rng);
    }
    for (auto &v : w) {
        v = 1.0f + 0.2f * d(rng);
    }
    launch_rows(rows, cols, [&] { rms_norm_to<T>(&x[off], &w[off], &o1[off], cols, 1e-5f); });
    launch_rows(rows, cols, [&] { rms_norm_to_vec<T>(&x[off], &w[off], &o2[off], cols, 1e-5f); });
    // Rounding of the output dtype; the vector kernel sums each row in another order.
    const double tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
    double worst = 0;
    for (int r = 0; r < rows; ++r) {
        double sum = 0;
        for (int c = 0; c < cols; ++c) {
            sum += (double)x[off + r * cols + c] * x[off + r * cols + c];
        }
        const double scale = 1.0 / std::sqrt(sum / cols + 1e-5);
        for (int c = 0; c < cols; ++c) {
            const size_t i = off + (size_t)r * cols + c;
            const double want = x[i] * scale * w[off + c];
            for (double got : {(double)(float)o1[i], (double)(float)o2[i]}) {
                worst = std::max(worst, std::abs(want - got) / std::max(1.0, std::abs(want)));
            }
        }
    }
    if (worst > tol) {
        std::printf("rms_norm_to: %zu-byte output, %d x %d, offset %d: %.2e from the reference\n", sizeof(T), rows,
                    cols, off, worst);
        return 1;
    }
    return 0;
}

// RoPE in place on `heads` rotated heads of rows holding `heads + 2` heads of d values (two value heads
// after them, as in a q/k/v projection): the kernel's entry (16-byte accesses where it can) against its
// one-value-at-a-time loop (bit for bit), the value heads untouched, and both against an f64 reference.
template <typename T> static int rope(size_t tokens, int heads, int d, size_t off) {
    std::mt19937 rng(tokens * 131 + heads * 17 + d + off);
    std::normal_distribution<float> dist(0, 1);
    const int half = d / 2;
    const size_t row = (size_t)(heads + 2) * d, len = tokens * row + off + 8, cs_len = tokens * half + off + 8;
    std::vector<T> x(len), cos(cs_len), sin(cs_len);
    for (auto &v : x) {
        v = T(dist(rng));
    }
    for (size_t i = 0; i < cs_len; ++i) {
        const float angle = dist(rng) * 3.0f;
        cos[i] = T(std::cos(angle));
        sin[i] = T(std::sin(angle));
    }
    std::vector<T> entry = x, scalar = x;
    const size_t n = tokens * heads * half;
    launch_elementwise(n, [&] { rope_qk<T>(&entry[off], &cos[off], &sin[off], tokens, heads, row, d); });
    launch_elementwise(n, [&] { rope_heads<T, 1>(&scalar[off], &cos[off], &sin[off], tokens, heads, row, d); });
    int bad = 0;
    double worst = 0;
    for (size_t t = 0; t < tokens; ++t) {
        for (int h = 0; h < heads + 2; ++h) {
            for (int j = 0; j < d; ++j) {
                const size_t i = off + t * row + (size_t)h * d + j;
                bad += std::memcmp(&entry[i], &scalar[i], sizeof(T)) != 0;
                if (h >= heads) {
                    bad += std::memcmp(&entry[i], &x[i], sizeof(T)) != 0;
                    continue;
                }
                const size_t lo = i - (j < half ? 0 : half), c = off + t * half + j % half;
                const double a = (float)x[lo], b = (float)x[lo + half], co = (float)cos[c], si = (float)sin[c];
                const double want = j < half ? a * co - b * si : a * si + b * co;
                worst = std::max(worst, std::abs(want - (double)(float)entry[i]));
            }
        }
    }
    // Rounding: T's products and sum of values of magnitude up to ~4.
    const double tol = sizeof(T) == 4 ? 1e-5 : 8e-2;
    if (bad || worst > tol) {
        std::printf("rope_qk: %zu-byte values, %zu tokens x %d heads of %d, offset %zu: %d differences from "
                    "the scalar loop or in value heads, %.2e from the reference\n",
                    sizeof(T), tokens, heads, d, off, bad, worst);
        return 1;
    }
    return 0;
}

// silu·mul from one gate/up buffer: the kernel's entry against its one-value loop (bit for bit) and
// both against the two-input kernel on the halves (the same arithmetic).
template <typename T> static int joined(size_t rows, int cols, size_t off) {
    std::mt19937 rng(rows * 7 + cols + off);
    std::normal_distribution<float> dist(0, 2);
    const size_t len = rows * 2 * cols + off + 8, out_len = rows * cols + off + 8;
    std::vector<T> gu(len), entry(out_len), scalar(out_len);
    for (auto &v : gu) {
        v = T(dist(rng));
    }
    const size_t n = rows * cols;
    launch_elementwise(n, [&] { silu_mul_joined<T>(&gu[off], &entry[off], rows, cols); });
    launch_elementwise(n, [&] { silu_mul_halves<T, 1>(&gu[off], &scalar[off], rows, cols); });
    int bad = 0;
    for (size_t r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            const size_t o = off + r * cols + c, g = off + r * 2 * cols + c;
            const T want = silu_mul_one(gu[g], gu[g + cols]);
            bad += std::memcmp(&entry[o], &scalar[o], sizeof(T)) != 0;
            bad += std::memcmp(&entry[o], &want, sizeof(T)) != 0;
        }
    }
    if (bad) {
        std::printf("silu_mul_joined: %zu-byte values, %zu rows of %d, offset %zu: %d differences\n", sizeof(T),
                    rows, cols, off, bad);
    }
    return bad != 0;
}

int main() {
    int bad = 0;
    for (size_t n : {1ul, 7ul, 8ul, 9ul, 4099ul, 64ul * 4096}) {
        for (size_t off : {0ul, 1ul, 4ul, 8ul}) {
            bad += elementwise<float>(n, off) + elementwise<__nv_bfloat16>(n, off) + elementwise<__half>(n, off);
        }
    }
    for (int cols : {4096, 99, 100}) {
        for (int off : {0, 1, 4}) {
            bad += norm<float>(2, cols, off) + norm<__nv_bfloat16>(2, cols, off) + norm<__half>(2, cols, off);
        }
    }
    for (int d : {128, 16, 6}) {
        for (size_t off : {0ul, 1ul, 8ul}) {
            bad += rope<float>(3, 5, d, off) + rope<__nv_bfloat16>(3, 5, d, off) + rope<__half>(3, 5, d, off);
        }
    }
    for (int cols : {64, 24, 5}) {
        for (size_t off : {0ul, 1ul, 8ul}) {
            bad += joined<float>(3, cols, off) + joined<__nv_bfloat16>(3, cols, off) + joined<__half>(3, cols, off);
        }
    }
    std::printf("fused kernels on the host: %s\n",
                bad ? "DIFFERENCES (see above)" : "vector = scalar, norm and rope = reference, joined = halves");
    return bad != 0;
}
