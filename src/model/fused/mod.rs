//! Fused elementwise ops (on by default on CUDA): SiLU·mul, the residual add with its cast, and RMSNorm
//! with its cast, each one pass over a layer's activations instead of two. On CUDA they run armorm's
//! kernels (`fused.cu`), scalar or (`vector`, experimental) on 16-byte accesses; on the CPU a plain loop
//! of the same arithmetic, so that the model's use of them is tested anywhere. Also the experimental
//! ops behind joined projections: RoPE in place on a q/k/v buffer, SiLU·mul from a gate/up buffer, and
//! an output projection that adds into the residual stream in its GEMM (cuBLAS on CUDA).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, InplaceOp3, Layout, Result, Shape, Tensor,
    WithDType,
};

use super::check::relative_diff;

/// silu(gate) · up in f32, rounded once to their dtype. `gate`, `up` (n, i) -> (n, i).
pub(super) fn silu_mul(gate: &Tensor, up: &Tensor, vector: bool) -> Result<Tensor> {
    gate.apply_op2_no_bwd(up, &SiluMul { vector })
}

/// The f32 residual stream plus a block's output in the compute dtype: (n, h) f32.
pub(super) fn add_f32(residual: &Tensor, block: &Tensor, vector: bool) -> Result<Tensor> {
    residual.apply_op2_no_bwd(block, &AddF32 { vector })
}

/// RMSNorm of f32 rows with an f32 weight, in `dtype`. `x` (n, h) f32 -> (n, h).
pub(super) fn rms_norm_to(
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    dtype: DType,
    vector: bool,
) -> Result<Tensor> {
    x.apply_op2_no_bwd(weight, &RmsNormTo { eps, dtype, vector })
}

/// silu(gate) · up from one gate/up projection: `gate_up` (n, 2·i), the gate half first -> (n, i). The
/// arithmetic of `silu_mul`; the CUDA kernel reads both halves of each row on 16-byte accesses where
/// aligned.
pub(super) fn silu_mul_joined(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.apply_op1_no_bwd(&SiluMulJoined)
}

/// RoPE in place on the first `heads` heads (of `head_dim` values) of each row of `x` (n, row), with
/// each row's cos and sin (n, head_dim / 2): the query and key heads of one q/k/v projection, its value
/// heads left alone. The arithmetic of candle's `rope_thd`, in x's dtype; `x` must be contiguous and
/// not shared (it is the projection just computed).
pub(super) fn rope_qk(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    x.inplace_op3(cos, sin, &RopeQk { heads, head_dim })
}

/// `residual` + `x`·Wᵀ, the f32 residual stream plus a block's output projection (`weight` (m, k),
/// `x` (n, k) in the compute dtype, `residual` (n, m) f32). On CUDA one cuBLAS GEMM that accumulates
/// into `residual` in place, in f32, so the projection's output is neither written in the compute dtype
/// nor read back by an add; `residual` must not be read by anyone else afterwards (it is the stream the
/// caller is replacing). Elsewhere the same arithmetic by candle's ops, into a new tensor.
pub(super) fn accumulate(residual: &Tensor, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if residual.device().is_cuda() {
        // Both no-ops on the layer's tensors; a strided view gets a buffer of its own.
        let (residual, x) = (residual.contiguous()?, x.contiguous()?);
        residual.inplace_op3(&x, weight, &GemmAdd)?;
        return Ok(residual);
    }
    let product = x
        .to_dtype(DType::F32)?
        .matmul(&weight.to_dtype(DType::F32)?.t()?)?;
    residual + product
}

/// The largest difference between `accumulate` and candle's unfused ops (`residual` + the product in
/// f32) on random rows on `device`, in `dtype`, relative to the largest magnitude (at least 1): the
/// shapes of the model's two output projections (o_proj (hidden, attention width), down_proj (hidden,
/// intermediate)) and a small odd one. cuBLAS is called with armorm's own leading dimensions here, so
/// a run checks them once before trusting them. NaN reads as infinity.
pub fn accumulate_self_check(
    device: &Device,
    dtype: DType,
    (hidden, width, intermediate): (usize, usize, usize),
) -> Result<f32> {
    let mut worst = 0f32;
    for (n, m, k) in [(64, hidden, width), (64, hidden, intermediate), (5, 37, 99)] {
        let residual = Tensor::randn(0f32, 1.0, (n, m), device)?;
        let x = Tensor::randn(0f32, 1.0, (n, k), device)?.to_dtype(dtype)?;
        let w = (Tensor::randn(0f32, 1.0, (m, k), device)? / (k as f64).sqrt())?.to_dtype(dtype)?;
        let product = x
            .to_dtype(DType::F32)?
            .matmul(&w.to_dtype(DType::F32)?.t()?)?;
        let want = (&residual + product)?;
        let got = accumulate(&residual.copy()?, &x, &w)?;
        worst = worst.max(relative_diff(&got, &want)?);
    }
    Ok(worst)
}

/// The largest difference between the fused ops (the `vector` kernels or the scalar ones) and candle's
/// unfused ones on random rows on `device`, in `dtype`, relative to the largest magnitude of each op's
/// output (at least 1): rows of `hidden` values, and a small odd shape that takes the kernels' scalar
/// tails and fallbacks. armorm's kernels are compiled here but first run on the user's card, so a run
/// checks them once before trusting them. NaN reads as infinity.
pub fn self_check(device: &Device, dtype: DType, hidden: usize, vector: bool) -> Result<f32> {
    let mut worst = 0f32;
    for (rows, cols) in [(64, hidden), (5, 99)] {
        worst = worst.max(self_check_shape(device, dtype, (rows, cols), vector)?);
    }
    Ok(worst)
}

fn self_check_shape(
    device: &Device,
    dtype: DType,
    shape: (usize, usize),
    vector: bool,
) -> Result<f32> {
    let x = Tensor::randn(0f32, 1.0, shape, device)?;
    let w = Tensor::randn(1f32, 0.2, shape.1, device)?;
    let g = Tensor::randn(0f32, 2.0, shape, device)?.to_dtype(dtype)?;
    let u = Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?;
    let block = x.to_dtype(dtype)?;
    let pairs = [
        (silu_mul(&g, &u, vector)?, (candle_nn::ops::silu(&g)? * &u)?),
        (
            add_f32(&x, &block, vector)?,
            (&x + block.to_dtype(DType::F32)?)?,
        ),
        (
            rms_norm_to(&x, &w, 1e-5, dtype, vector)?,
            candle_nn::ops::rms_norm(&x, &w, 1e-5)?.to_dtype(dtype)?,
        ),
    ];
    let mut worst = 0f32;
    for (fused, unfused) in pairs {
        worst = worst.max(relative_diff(&fused, &unfused)?);
    }
    Ok(worst)
}

/// The largest difference between `rope_qk` and candle's `rope_thd` on random q/k/v rows of this
/// model's heads on `device`, in `dtype`, relative to the largest magnitude (at least 1), the value
/// heads included (they must come back unchanged); and on a small odd shape that takes the kernel's
/// one-value-at-a-time fallback. NaN reads as infinity.
pub fn rope_self_check(
    device: &Device,
    dtype: DType,
    (num_heads, num_kv_heads, head_dim): (usize, usize, usize),
) -> Result<f32> {
    let mut worst = 0f32;
    for (tokens, nh, nkv, d) in [(64, num_heads, num_kv_heads, head_dim), (5, 3, 1, 6)] {
        let x = Tensor::randn(0f32, 1.0, (tokens, nh + 2 * nkv, d), device)?.to_dtype(dtype)?;
        let angles = Tensor::randn(0f32, 3.0, (tokens, d / 2), device)?;
        let (cos, sin) = (
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        );
        let rope = |from: usize, heads: usize| {
            let part = x.narrow(1, from, heads)?.contiguous()?.unsqueeze(0)?; // (1, t, heads, d)
            candle_nn::rotary_emb::rope_thd(&part, &cos, &sin)?.squeeze(0)
        };
        let want = Tensor::cat(&[rope(0, nh + nkv)?, x.narrow(1, nh + nkv, nkv)?], 1)?;
        let got = x.flatten_from(1)?.copy()?; // (t, row), not shared with `x`
        rope_qk(&got, &cos, &sin, nh + nkv, d)?;
        worst = worst.max(relative_diff(&got.reshape(want.shape())?, &want)?);
    }
    Ok(worst)
}

/// The largest difference between `silu_mul_joined` and candle's ops on the halves, on random rows
/// of `intermediate` values (and a small odd width) on `device`, in `dtype`, relative (at least 1).
pub fn joined_self_check(device: &Device, dtype: DType, intermediate: usize) -> Result<f32> {
    let mut worst = 0f32;
    for (rows, cols) in [(64, intermediate), (5, 21)] {
        let gu = Tensor::randn(0f32, 2.0, (rows, 2 * cols), device)?.to_dtype(dtype)?;
        let (gate, up) = (gu.narrow(1, 0, cols)?, gu.narrow(1, cols, cols)?);
        let want = (candle_nn::ops::silu(&gate.contiguous()?)? * up)?;
        worst = worst.max(relative_diff(&silu_mul_joined(&gu)?, &want)?);
    }
    Ok(worst)
}

fn contiguous(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(range) => Ok(range),
        None => candle_core::bail!("fused {what}: input not contiguous"),
    }
}

fn f32_of<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}

struct SiluMul {
    /// The CUDA kernel on 16-byte accesses; the CPU has one loop for both.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    vector: bool,
}

impl SiluMul {
    fn cpu<T: WithDType>(gate: &[T], up: &[T]) -> Vec<T> {
        gate.iter()
            .zip(up)
            .map(|(&g, &u)| {
                let g = f32_of(g);
                T::from_f64((g / (1.0 + (-g).exp()) * f32_of(u)) as f64)
            })
            .collect()
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "armorm-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((a1, b1), (a2, b2)) = (contiguous(l1, "silu·mul")?, contiguous(l2, "silu·mul")?);
        let out = match (s1, s2) {
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => {
                CpuStorage::BF16(Self::cpu(&g[a1..b1], &u[a2..b2]))
            }
            (CpuStorage::F16(g), CpuStorage::F16(u)) => {
                CpuStorage::F16(Self::cpu(&g[a1..b1], &u[a2..b2]))
            }
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(Self::cpu(&g[a1..b1], &u[a2..b2]))
            }
            _ => candle_core::bail!("fused silu·mul: bf16, f16 or f32 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::silu_mul(s1, l1, s2, l2, self.vector)
    }
}

struct AddF32 {
    /// The CUDA kernel on 16-byte accesses; the CPU has one loop for both.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    vector: bool,
}

impl AddF32 {
    fn cpu<T: WithDType>(residual: &[f32], block: &[T]) -> Vec<f32> {
        residual
            .iter()
            .zip(block)
            .map(|(&r, &b)| r + f32_of(b))
            .collect()
    }
}

impl CustomOp2 for AddF32 {
    fn name(&self) -> &'static str {
        "armorm-add-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((a1, b1), (a2, b2)) = (contiguous(l1, "add")?, contiguous(l2, "add")?);
        let CpuStorage::F32(residual) = s1 else {
            candle_core::bail!("fused add: the residual stream must be f32")
        };
        let residual = &residual[a1..b1];
        let out = match s2 {
            CpuStorage::BF16(b) => Self::cpu(residual, &b[a2..b2]),
            CpuStorage::F16(b) => Self::cpu(residual, &b[a2..b2]),
            CpuStorage::F32(b) => Self::cpu(residual, &b[a2..b2]),
            _ => candle_core::bail!("fused add: a bf16, f16 or f32 block"),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::add_f32(s1, l1, s2, l2, self.vector)
    }
}

struct RmsNormTo {
    eps: f32,
    dtype: DType,
    /// The CUDA kernel on 16-byte accesses; the CPU has one loop for both.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    vector: bool,
}

impl RmsNormTo {
    fn cpu<T: WithDType>(x: &[f32], weight: &[f32], eps: f32) -> Vec<T> {
        let cols = weight.len();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(cols) {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            out.extend(
                row.iter()
                    .zip(weight)
                    .map(|(&v, &w)| T::from_f64((v * scale * w) as f64)),
            );
        }
        out
    }
}

impl CustomOp2 for RmsNormTo {
    fn name(&self) -> &'static str {
        "armorm-rms-norm-to"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((a1, b1), (a2, b2)) = (contiguous(l1, "rms norm")?, contiguous(l2, "rms norm")?);
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("fused rms norm: f32 rows and weight")
        };
        let (x, w) = (&x[a1..b1], &w[a2..b2]);
        if w.is_empty() || x.len() % w.len() != 0 {
            candle_core::bail!(
                "fused rms norm: rows of {} values, weight of {}",
                x.len(),
                w.len()
            )
        }
        let out = match self.dtype {
            DType::BF16 => CpuStorage::BF16(Self::cpu(x, w, self.eps)),
            DType::F16 => CpuStorage::F16(Self::cpu(x, w, self.eps)),
            DType::F32 => CpuStorage::F32(Self::cpu(x, w, self.eps)),
            other => candle_core::bail!("fused rms norm: no output in {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm_to(s1, l1, s2, l2, self.eps, self.dtype, self.vector)
    }
}

struct SiluMulJoined;

impl SiluMulJoined {
    /// (rows, half width) of a (rows, 2·i) gate/up buffer.
    fn shape(l: &Layout) -> Result<(usize, usize)> {
        let (rows, width) = l.shape().dims2()?;
        if width % 2 != 0 {
            candle_core::bail!("fused silu·mul: a gate/up row of odd width {width}")
        }
        Ok((rows, width / 2))
    }

    fn cpu<T: WithDType>(gate_up: &[T], cols: usize) -> Vec<T> {
        gate_up
            .chunks(2 * cols)
            .flat_map(|row| SiluMul::cpu(&row[..cols], &row[cols..]))
            .collect()
    }
}

impl CustomOp1 for SiluMulJoined {
    fn name(&self) -> &'static str {
        "armorm-silu-mul-joined"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = Self::shape(l)?;
        let (a, b) = contiguous(l, "silu·mul")?;
        let out = match s {
            CpuStorage::BF16(x) => CpuStorage::BF16(Self::cpu(&x[a..b], cols)),
            CpuStorage::F16(x) => CpuStorage::F16(Self::cpu(&x[a..b], cols)),
            CpuStorage::F32(x) => CpuStorage::F32(Self::cpu(&x[a..b], cols)),
            _ => candle_core::bail!("fused silu·mul: bf16, f16 or f32 rows"),
        };
        Ok((out, Shape::from((rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = Self::shape(l)?;
        cuda::silu_mul_joined(s, contiguous(l, "silu·mul")?, (rows, cols))
    }
}

/// `accumulate`'s in-place GEMM (CUDA only: elsewhere `accumulate` runs candle's ops).
struct GemmAdd;

impl GemmAdd {
    /// (n, m, k) of residual (n, m) += x (n, k) · weight (m, k)ᵀ, after checking the shapes.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn shape(residual: &Layout, x: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
        let (n, m) = residual.shape().dims2()?;
        let (xn, k) = x.shape().dims2()?;
        if (xn, (m, k)) != (n, weight.shape().dims2()?) {
            candle_core::bail!(
                "fused accumulate: residual {:?}, x {:?}, weight {:?}",
                residual.shape(),
                x.shape(),
                weight.shape()
            )
        }
        Ok((n, m, k))
    }
}

impl InplaceOp3 for GemmAdd {
    fn name(&self) -> &'static str {
        "armorm-gemm-add"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!(
            "fused accumulate: the in-place GEMM is CUDA's; the CPU runs candle's ops"
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let shape = Self::shape(l1, l2, l3)?;
        cuda::gemm_add(s1, l1, (s2, l2), (s3, l3), shape)
    }
}

struct RopeQk {
    heads: usize,
    head_dim: usize,
}

impl RopeQk {
    /// (tokens, values per row) of `x`, after checking that the three shapes fit together.
    fn shape(&self, x: &Layout, cos: &Layout, sin: &Layout) -> Result<(usize, usize)> {
        let (tokens, row) = x.shape().dims2()?;
        let half = (tokens, self.head_dim / 2);
        if self.head_dim % 2 != 0
            || self.heads * self.head_dim > row
            || cos.shape().dims2()? != half
            || sin.shape().dims2()? != half
        {
            candle_core::bail!(
                "fused rope: rows {:?}, cos {:?}, sin {:?} for {} heads of {}",
                x.shape(),
                cos.shape(),
                sin.shape(),
                self.heads,
                self.head_dim
            )
        }
        Ok((tokens, row))
    }

    fn cpu<T: WithDType>(&self, x: &mut [T], cos: &[T], sin: &[T], row: usize) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let tables = cos.chunks(half).zip(sin.chunks(half));
        for (values, (c, s)) in x.chunks_mut(row).zip(tables) {
            for head in values[..self.heads * d].chunks_mut(d) {
                let (lo, hi) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (lo[j], hi[j]);
                    lo[j] = a * c[j] - b * s[j];
                    hi[j] = a * s[j] + b * c[j];
                }
            }
        }
    }
}

impl InplaceOp3 for RopeQk {
    fn name(&self) -> &'static str {
        "armorm-rope-qk"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (_, row) = self.shape(l1, l2, l3)?;
        let (r1, r2, r3) = (
            contiguous(l1, "rope")?,
            contiguous(l2, "rope")?,
            contiguous(l3, "rope")?,
        );
        match (s1, s2, s3) {
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                self.cpu(&mut x[r1.0..r1.1], &c[r2.0..r2.1], &s[r3.0..r3.1], row)
            }
            (CpuStorage::F16(x), CpuStorage::F16(c), CpuStorage::F16(s)) => {
                self.cpu(&mut x[r1.0..r1.1], &c[r2.0..r2.1], &s[r3.0..r3.1], row)
            }
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                self.cpu(&mut x[r1.0..r1.1], &c[r2.0..r2.1], &s[r3.0..r3.1], row)
            }
            _ => candle_core::bail!("fused rope: bf16, f16 or f32 rows and tables of one dtype"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let shape = self.shape(l1, l2, l3)?;
        cuda::rope_qk(
            s1,
            l1,
            (s2, l2),
            (s3, l3),
            shape,
            (self.heads, self.head_dim),
        )
    }
}

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::seeded_randn;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        relative_diff(a, b).unwrap()
    }

    #[test]
    fn the_self_check_passes_on_the_cpu() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // The CPU runs one loop for both kernels; on a GPU the check compares each with candle.
            for vector in [false, true] {
                let diff = self_check(&Device::Cpu, dtype, 100, vector).unwrap();
                assert!(diff < 5e-2, "{dtype:?}: {diff}");
            }
        }
    }

    #[test]
    fn silu_mul_of_one_gate_up_buffer_equals_the_two_inputs() {
        for dtype in [DType::F32, DType::BF16] {
            let gu = seeded_randn(0.0, 2.0, (4, 2 * 12), 10)
                .to_dtype(dtype)
                .unwrap();
            let (g, u) = (
                gu.narrow(1, 0, 12).unwrap().contiguous().unwrap(),
                gu.narrow(1, 12, 12).unwrap().contiguous().unwrap(),
            );
            let got = silu_mul_joined(&gu).unwrap();
            assert_eq!(got.dims2().unwrap(), (4, 12));
            assert_eq!(max_diff(&got, &silu_mul(&g, &u, false).unwrap()), 0.0);
            assert!(joined_self_check(&Device::Cpu, dtype, 12).unwrap() < 1e-2);
        }
        let odd = seeded_randn(0.0, 1.0, (2, 7), 11);
        assert!(silu_mul_joined(&odd).is_err());
    }

    #[test]
    fn accumulate_adds_the_projection_unrounded() {
        let residual = seeded_randn(0.0, 1.0, (6, 8), 7);
        let x = seeded_randn(0.0, 1.0, (6, 20), 8)
            .to_dtype(DType::BF16)
            .unwrap();
        let w = seeded_randn(0.0, 0.3, (8, 20), 9)
            .to_dtype(DType::BF16)
            .unwrap();
        let got = accumulate(&residual, &x, &w).unwrap();
        assert_eq!((got.dims2().unwrap(), got.dtype()), ((6, 8), DType::F32));
        // The unfused path: the projection rounded to bf16, then added in f32.
        let rounded = x.matmul(&w.t().unwrap()).unwrap();
        let unfused = (&residual + rounded.to_dtype(DType::F32).unwrap()).unwrap();
        let d = max_diff(&got, &unfused);
        assert!(
            d > 0.0 && d < 2e-2,
            "within bf16 rounding, and not rounded: {d}"
        );
        // Shapes that do not fit are refused.
        assert!(accumulate(&residual, &x, &w.narrow(0, 0, 7).unwrap()).is_err());
        assert_eq!(
            accumulate_self_check(&Device::Cpu, DType::BF16, (8, 8, 20)).unwrap(),
            0.0
        );
    }

    #[test]
    fn rope_in_place_equals_candles_rope() {
        // GQA heads as in Llama-3 (4 query heads per kv head), the odd shape, f32 and bf16.
        for dtype in [DType::F32, DType::BF16] {
            let diff = rope_self_check(&Device::Cpu, dtype, (8, 2, 16)).unwrap();
            assert_eq!(
                diff, 0.0,
                "{dtype:?}: the same arithmetic in the same order"
            );
        }
        // The value heads come back as they were; the others do not.
        let x = seeded_randn(0.0, 1.0, (3, 4 * 8), 5); // 3 tokens, 2 rotated heads + 2 value heads
        let angles = seeded_randn(0.0, 3.0, (3, 4), 6);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let got = x.copy().unwrap();
        rope_qk(&got, &cos, &sin, 2, 8).unwrap();
        let part = |t: &Tensor, from, len| t.narrow(1, from, len).unwrap();
        assert_eq!(max_diff(&part(&got, 16, 16), &part(&x, 16, 16)), 0.0);
        assert!(max_diff(&part(&got, 0, 16), &part(&x, 0, 16)) > 0.1);
        // Shapes that do not fit are refused.
        assert!(rope_qk(&got, &cos, &sin, 5, 8).is_err());
        assert!(rope_qk(&got, &cos.narrow(1, 0, 3).unwrap(), &sin, 2, 8).is_err());
    }

    #[test]
    fn fused_ops_equal_the_unfused_ones() {
        let x = seeded_randn(0.0, 1.0, (5, 48), 1);
        let w = seeded_randn(1.0, 0.2, 48, 2);
        for dtype in [DType::F32, DType::BF16] {
            let (g, u) = (
                seeded_randn(0.0, 2.0, (5, 48), 3).to_dtype(dtype).unwrap(),
                seeded_randn(0.0, 1.0, (5, 48), 4).to_dtype(dtype).unwrap(),
            );
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            // bf16: the unfused path rounds twice, the fused one once (relative differences).
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(
                max_diff(&silu_mul(&g, &u, false).unwrap(), &want) < tol,
                "silu·mul {dtype:?}"
            );

            let block = x.to_dtype(dtype).unwrap();
            let want = (&x + block.to_dtype(DType::F32).unwrap()).unwrap();
            assert!(
                max_diff(&add_f32(&x, &block, false).unwrap(), &want) < 1e-6,
                "add {dtype:?}"
            );

            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = rms_norm_to(&x, &w, 1e-5, dtype, false).unwrap();
            assert_eq!(got.dtype(), dtype);
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(max_diff(&got, &want) < tol, "rms norm {dtype:?}");
        }
    }
}
