//! Launches of `fused.cu`'s kernels (PTX built by build.rs).

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaStorageSlice as S, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};

use super::contiguous;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "armorm_fused";

/// Grid-stride elementwise launches: enough blocks to fill the card, 256 threads each.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn storage(slice: S, device: &CudaDevice, shape: &Shape) -> (CudaStorage, Shape) {
    let device = device.clone();
    (CudaStorage { slice, device }, shape.clone())
}

/// `out[i] = f(a[i], b[i])` by kernel `name`, with signature (a, b, out, n).
fn binary<A: DeviceRepr, B: DeviceRepr, O: DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    (a, ar): (&CudaSlice<A>, (usize, usize)),
    (b, br): (&CudaSlice<B>, (usize, usize)),
) -> Result<CudaSlice<O>> {
    let n = ar.1 - ar.0;
    if br.1 - br.0 != n {
        candle_core::bail!("fused {name}: inputs of {n} and {} values", br.1 - br.0)
    }
    let (a, b) = (a.slice(ar.0..ar.1), b.slice(br.0..br.1));
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<O>(n)? };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut l = func.builder();
    l.arg(&a);
    l.arg(&b);
    l.arg(&out);
    l.arg(&n);
    // SAFETY: the arguments match the kernel's signature; sizes are checked above.
    unsafe { l.launch(elementwise(n)) }.w()?;
    Ok(out)
}

/// The kernel's name: `base`, or its 16-byte-access variant, for dtype `T`.
fn name<T: WithDType>(base: &str, vector: bool) -> String {
    kernel_name::<T>(&if vector {
        format!("{base}_vec")
    } else {
        base.to_string()
    })
}

pub(super) fn silu_mul(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    vector: bool,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        gate: (&CudaSlice<T>, (usize, usize)),
        up: (&CudaSlice<T>, (usize, usize)),
        vector: bool,
    ) -> Result<CudaSlice<T>> {
        binary(dev, &name::<T>("silu_mul", vector), gate, up)
    }
    let (r1, r2) = (contiguous(l1, "silu·mul")?, contiguous(l2, "silu·mul")?);
    let dev = &s1.device;
    let out = match (&s1.slice, &s2.slice) {
        (S::BF16(g), S::BF16(u)) => S::BF16(run(dev, (g, r1), (u, r2), vector)?),
        (S::F16(g), S::F16(u)) => S::F16(run(dev, (g, r1), (u, r2), vector)?),
        (S::F32(g), S::F32(u)) => S::F32(run(dev, (g, r1), (u, r2), vector)?),
        _ => candle_core::bail!("fused silu·mul: bf16, f16 or f32 inputs of one dtype"),
    };
    Ok(storage(out, dev, l1.shape()))
}

pub(super) fn add_f32(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    vector: bool,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        residual: (&CudaSlice<f32>, (usize, usize)),
        block: (&CudaSlice<T>, (usize, usize)),
        vector: bool,
    ) -> Result<CudaSlice<f32>> {
        binary(dev, &name::<T>("add_f32", vector), residual, block)
    }
    let (r1, r2) = (contiguous(l1, "add")?, contiguous(l2, "add")?);
    let dev = &s1.device;
    let S::F32(residual) = &s1.slice else {
        candle_core::bail!("fused add: the residual stream must be f32")
    };
    let out = match &s2.slice {
        S::BF16(b) => run(dev, (residual, r1), (b, r2), vector)?,
        S::F16(b) => run(dev, (residual, r1), (b, r2), vector)?,
        S::F32(b) => run(dev, (residual, r1), (b, r2), vector)?,
        _ => candle_core::bail!("fused add: a bf16, f16 or f32 block"),
    };
    Ok(storage(S::F32(out), dev, l1.shape()))
}

pub(super) fn rms_norm_to(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    eps: f32,
    dtype: DType,
    vector: bool,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        x: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
        w: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
        (rows, cols): (usize, usize),
        (eps, vector): (f32, bool),
    ) -> Result<CudaSlice<T>> {
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let func = dev.get_or_load_custom_func(&name::<T>("rms_norm_to", vector), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (cols.div_ceil(32).clamp(1, 32) as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = cols as i32;
        let mut b = func.builder();
        b.arg(x);
        b.arg(w);
        b.arg(&out);
        b.arg(&cols);
        b.arg(&eps);
        // SAFETY: the arguments match the kernel's signature; sizes are checked by the caller.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
    let (r1, r2) = (contiguous(l1, "rms norm")?, contiguous(l2, "rms norm")?);
    let dev = &s1.device;
    let (S::F32(x), S::F32(w)) = (&s1.slice, &s2.slice) else {
        candle_core::bail!("fused rms norm: f32 rows and weight")
    };
    let cols = r2.1 - r2.0;
    if cols == 0 || (r1.1 - r1.0) % cols != 0 {
        candle_core::bail!("fused rms norm: rows do not match the weight of {cols}")
    }
    let shape = ((r1.1 - r1.0) / cols, cols);
    let (x, w) = (x.slice(r1.0..r1.1), w.slice(r2.0..r2.1));
    let out = match dtype {
        DType::BF16 => S::BF16(run(dev, &x, &w, shape, (eps, vector))?),
        DType::F16 => S::F16(run(dev, &x, &w, shape, (eps, vector))?),
        DType::F32 => S::F32(run(dev, &x, &w, shape, (eps, vector))?),
        other => candle_core::bail!("fused rms norm: no output in {other:?}"),
    };
    Ok(storage(out, dev, l1.shape()))
}

/// residual (n, m) f32 += x (n, k) · weight (m, k)ᵀ by `cublasGemmEx` on candle's handle and
/// stream, f32 accumulation and output (beta = 1). Row-major tensors seen column-major: the call
/// computes residualᵀ (m × n) += weight (k × m, transposed) · xᵀ (k × n), as candle's matmul does.
pub(super) fn gemm_add(
    s1: &mut CudaStorage,
    l1: &Layout,
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    shape: (usize, usize, usize),
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t as Type;

    let ranges = [
        contiguous(l1, "accumulate")?,
        contiguous(l2, "accumulate")?,
        contiguous(l3, "accumulate")?,
    ];
    let dev = s1.device.clone();
    let S::F32(residual) = &mut s1.slice else {
        candle_core::bail!("fused accumulate: the residual stream must be f32")
    };
    let io = |kind| (&dev, ranges, shape, kind);
    match (&s2.slice, &s3.slice) {
        (S::BF16(x), S::BF16(w)) => gemm_add_typed(residual, x, w, io(Type::CUDA_R_16BF)),
        (S::F16(x), S::F16(w)) => gemm_add_typed(residual, x, w, io(Type::CUDA_R_16F)),
        (S::F32(x), S::F32(w)) => gemm_add_typed(residual, x, w, io(Type::CUDA_R_32F)),
        _ => {
            candle_core::bail!("fused accumulate: x and weight of one dtype, bf16, f16 or f32")
        }
    }
}

type GemmIo<'a> = (
    &'a CudaDevice,
    [(usize, usize); 3],
    (usize, usize, usize),
    candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t,
);

fn gemm_add_typed<T>(
    residual: &mut CudaSlice<f32>,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    (dev, [r1, r2, r3], (n, m, k), kind): GemmIo,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};

    let int = |v: usize| {
        std::ffi::c_int::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("fused accumulate: {v} too large")))
    };
    let stream = dev.cuda_stream();
    let (x, w) = (x.slice(r2.0..r2.1), w.slice(r3.0..r3.1));
    let mut out = residual.slice_mut(r1.0..r1.1);
    let (x, _x_guard) = x.device_ptr(&stream);
    let (w, _w_guard) = w.device_ptr(&stream);
    let (out, _out_guard) = out.device_ptr_mut(&stream);
    let (one, blas) = (1f32, dev.cublas_handle());
    // SAFETY: the three ranges hold (n, m), (n, k) and (m, k) values (checked by the caller), the
    // leading dimensions are those of contiguous rows, and the handle runs on candle's stream, so
    // the GEMM is ordered after the kernels that wrote its inputs.
    unsafe {
        gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            int(m)?,
            int(n)?,
            int(k)?,
            (&one) as *const f32 as *const _,
            w as *const _,
            kind,
            int(k)?,
            x as *const _,
            kind,
            int(k)?,
            (&one) as *const f32 as *const _,
            out as *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            int(m)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("fused accumulate: cuBLAS: {e:?}")))?;
    Ok(())
}

/// `silu_mul_joined` on the card: one grid-stride launch over the output.
pub(super) fn silu_mul_joined(
    s: &CudaStorage,
    range: (usize, usize),
    (rows, cols): (usize, usize),
) -> Result<(CudaStorage, Shape)> {
    fn run<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        gate_up: &CudaSlice<T>,
        range: (usize, usize),
        (rows, cols): (usize, usize),
    ) -> Result<CudaSlice<T>> {
        let gate_up = gate_up.slice(range.0..range.1);
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("silu_mul_joined"), MODULE, PTX)?;
        let cols_arg = cols as i32;
        let mut b = func.builder();
        b.arg(&gate_up);
        b.arg(&out);
        b.arg(&rows);
        b.arg(&cols_arg);
        // SAFETY: the arguments match the kernel's signature; the range holds rows · 2 · cols
        // values (checked by the caller's shape).
        unsafe { b.launch(elementwise(rows * cols)) }.w()?;
        Ok(out)
    }
    let dev = &s.device;
    let out = match &s.slice {
        S::BF16(x) => S::BF16(run(dev, x, range, (rows, cols))?),
        S::F16(x) => S::F16(run(dev, x, range, (rows, cols))?),
        S::F32(x) => S::F32(run(dev, x, range, (rows, cols))?),
        _ => candle_core::bail!("fused silu·mul: bf16, f16 or f32 rows"),
    };
    Ok(storage(out, dev, &Shape::from((rows, cols))))
}

/// `rope_qk` on the card: one grid-stride launch over (token, head, pair of values).
pub(super) fn rope_qk(
    s1: &mut CudaStorage,
    l1: &Layout,
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    (tokens, row): (usize, usize),
    (heads, d): (usize, usize),
) -> Result<()> {
    fn run<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        x: &mut CudaSlice<T>,
        (cos, sin): (&CudaSlice<T>, &CudaSlice<T>),
        ranges: [(usize, usize); 3],
        (tokens, row, heads, d): (usize, usize, usize, usize),
    ) -> Result<()> {
        let [r1, r2, r3] = ranges;
        let mut x = x.slice_mut(r1.0..r1.1);
        let (cos, sin) = (cos.slice(r2.0..r2.1), sin.slice(r3.0..r3.1));
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("rope_qk"), MODULE, PTX)?;
        let (heads_arg, d_arg) = (heads as i32, d as i32);
        let mut b = func.builder();
        b.arg(&mut x);
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&tokens);
        b.arg(&heads_arg);
        b.arg(&row);
        b.arg(&d_arg);
        // SAFETY: the arguments match the kernel's signature; the shapes are checked by the
        // caller, so every access stays inside the three ranges.
        unsafe { b.launch(elementwise(tokens * heads * d / 2)) }.w()?;
        Ok(())
    }
    let ranges = [
        contiguous(l1, "rope")?,
        contiguous(l2, "rope")?,
        contiguous(l3, "rope")?,
    ];
    let dev = s1.device.clone();
    let shape = (tokens, row, heads, d);
    match (&mut s1.slice, &s2.slice, &s3.slice) {
        (S::BF16(x), S::BF16(c), S::BF16(s)) => run(&dev, x, (c, s), ranges, shape),
        (S::F16(x), S::F16(c), S::F16(s)) => run(&dev, x, (c, s), ranges, shape),
        (S::F32(x), S::F32(c), S::F32(s)) => run(&dev, x, (c, s), ranges, shape),
        _ => candle_core::bail!("fused rope: bf16, f16 or f32 rows and tables of one dtype"),
    }
}
