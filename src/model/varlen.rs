//! Attention over the flat rows without padding (variable length, `cu_seqlens`): candle's flash
//! attention on CUDA (`flash-attn` feature; FlashAttention-3 on Hopper with `flash-attn-v3`), and a
//! matmul reference of the same contract that runs anywhere, so the flat layout is tested where no
//! GPU is.

use candle_core::{DType, Device, Result, Tensor};

use super::llama::Past;

/// Flash attention's grid has a block row per batch row in a dimension CUDA caps at 65,535.
const MAX_GRID_ROWS: usize = 65_535;

/// How the backbone computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Rows padded to a grid inside attention; causal attention in query blocks by matmul and softmax.
    /// Any device, any dtype.
    Blocked,
    /// Flash attention (variable length) over the flat rows: no padding, no score tensor. CUDA, bf16 or
    /// f16, head dim 128 (the only kernels the trimmed build compiles).
    Flash,
    /// FlashAttention-3 (Hopper's wgmma and TMA; sm_90a cubins, so compute capability 9.0 only) over
    /// the flat rows, with FlashAttention-2 for rows that continue cached prefixes (FA3's kernel
    /// aligns its causal mask bottom-right too, but more keys than queries stay on the kernel already
    /// measured until FA3 has run on a card). Same contract and dtypes as `Flash`.
    Flash3,
    /// Flash attention's contract computed row by row with matmuls: the flat layout, checked on any
    /// device. Slow; for tests.
    VarlenReference,
}

impl AttentionKind {
    /// Flash attention where this build, the device, the dtype and the head dim allow it, else blocked.
    pub fn auto(device: &Device, dtype: DType, head_dim: usize) -> Self {
        match flash_unsupported(device, dtype, head_dim) {
            None => AttentionKind::Flash,
            Some(_) => AttentionKind::Blocked,
        }
    }

    /// As `--attention` and the `armorm.attention` metadata name it.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKind::Blocked => "blocked",
            AttentionKind::Flash => "flash",
            AttentionKind::Flash3 => "flash3",
            AttentionKind::VarlenReference => "varlen-reference",
        }
    }

    /// Attention over the flat rows, without padding.
    pub fn is_varlen(self) -> bool {
        self != AttentionKind::Blocked
    }
}

/// Why flash attention cannot run here, or `None` when it can.
pub fn flash_unsupported(device: &Device, dtype: DType, head_dim: usize) -> Option<String> {
    if !cfg!(feature = "flash-attn") {
        return Some("this armorm was built without the flash-attn feature".into());
    }
    if !device.is_cuda() {
        return Some("flash attention runs on CUDA devices only".into());
    }
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Some(format!(
            "flash attention computes in bf16 or f16, not {dtype:?}"
        ));
    }
    if head_dim != 128 {
        return Some(format!(
            "flash attention is built for head dim 128 only; this model's is {head_dim}"
        ));
    }
    None
}

/// Why FlashAttention-3 cannot run here, or `None` when it can; `capability` is the CUDA device's
/// compute capability (major, minor), `None` off CUDA.
pub fn flash3_unsupported(
    device: &Device,
    dtype: DType,
    head_dim: usize,
    capability: Option<(i32, i32)>,
) -> Option<String> {
    flash3_refusal(
        cfg!(feature = "flash-attn-v3"),
        flash_unsupported(device, dtype, head_dim),
        capability,
    )
}

fn flash3_refusal(
    built: bool,
    flash2: Option<String>,
    capability: Option<(i32, i32)>,
) -> Option<String> {
    if !built {
        return Some("this armorm was built without the flash-attn-v3 feature".into());
    }
    if let Some(why) = flash2 {
        return Some(why);
    }
    match capability {
        // sm_90a code runs on compute capability 9.0 alone, not on later architectures.
        Some((9, 0)) => None,
        Some((major, minor)) => Some(format!(
            "FlashAttention-3 is built for Hopper (compute capability 9.0) only; this device is \
             {major}.{minor}"
        )),
        None => Some("the device's compute capability could not be read".into()),
    }
}

/// The flat rows as variable-length kernels take them: queries are each row's new tokens end to
/// end; keys are each row's cached tokens followed by its new ones, end to end.
pub(super) struct Varlen {
    /// Cumulative query (new token) counts, b + 1 entries, on the host and on the device (u32).
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    cu_q_dev: Tensor,
    cu_k_dev: Tensor,
    max_q: usize,
    max_k: usize,
    /// With cached prefixes: for each key of the flat key sequence, its token in [cache; new].
    keys_index: Option<Tensor>,
}

impl Varlen {
    pub(super) fn new(cu_lens: &[usize], past: Option<Past>, dev: &Device) -> Result<Self> {
        match past {
            None => Self::from_cu(cu_lens, cu_lens, None, dev),
            Some(p) => {
                let (cu_k, index) = key_sequence(cu_lens, &p.cache.cu_lens, p.of);
                let len = index.len();
                let index = Tensor::from_vec(index, len, dev)?;
                Self::from_cu(cu_lens, &cu_k, Some(index), dev)
            }
        }
    }

    fn from_cu(
        cu_q: &[usize],
        cu_k: &[usize],
        keys_index: Option<Tensor>,
        dev: &Device,
    ) -> Result<Self> {
        let longest = |cu: &[usize]| cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let to_dev = |cu: &[usize]| {
            let cu: Vec<u32> = cu.iter().map(|&c| c as u32).collect();
            Tensor::from_vec(cu, cu_q.len(), dev)
        };
        Ok(Self {
            cu_q_dev: to_dev(cu_q)?,
            cu_k_dev: to_dev(cu_k)?,
            max_q: longest(cu_q),
            max_k: longest(cu_k),
            cu_q: cu_q.to_vec(),
            cu_k: cu_k.to_vec(),
            keys_index,
        })
    }

    /// Keys or values of the flat key sequence (total_k, heads·d): the new tokens' own (n, heads·d),
    /// or each row's cached ones (`old`, flat over the cache's rows) followed by its new ones.
    pub(super) fn keys(&self, new: &Tensor, old: Option<&Tensor>) -> Result<Tensor> {
        match (&self.keys_index, old) {
            (Some(index), Some(old)) => Tensor::cat(&[old, new], 0)?.index_select(index, 0),
            (None, None) => Ok(new.clone()),
            _ => candle_core::bail!("varlen keys: a cache without its rows, or rows without it"),
        }
    }

    /// Causal attention of each row's queries to its keys, the last query aligned with the last key
    /// (so a row with c cached tokens has query j see keys 0..=c + j). `q` (n, nh, d), `k`/`v`
    /// (total_k, nkv, d) -> (n, nh, d).
    pub(super) fn attend(
        &self,
        kind: AttentionKind,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(2)? as f32).sqrt();
        let rows = self.cu_q.len() - 1;
        if matches!(kind, AttentionKind::Flash | AttentionKind::Flash3) && rows > MAX_GRID_ROWS {
            // The launch would fail, and the kernels report no errors: refuse rather than return garbage.
            candle_core::bail!(
                "flash attention takes at most {MAX_GRID_ROWS} rows in a batch, not {rows}"
            )
        }
        match kind {
            AttentionKind::Flash => self.flash(q, k, v, scale),
            AttentionKind::Flash3 if self.cu_q == self.cu_k => self.flash3(q, k, v, scale),
            AttentionKind::Flash3 => self.flash(q, k, v, scale),
            AttentionKind::VarlenReference => self.reference(q, k, v, scale),
            AttentionKind::Blocked => candle_core::bail!("varlen attention called for blocked"),
        }
    }

    #[cfg(feature = "flash-attn")]
    fn flash(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        candle_flash_attn::flash_attn_varlen(
            q,
            k,
            v,
            &self.cu_q_dev,
            &self.cu_k_dev,
            self.max_q,
            self.max_k,
            scale,
            true,
        )
    }

    #[cfg(not(feature = "flash-attn"))]
    fn flash(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: f32) -> Result<Tensor> {
        let _ = (&self.cu_q_dev, &self.cu_k_dev, self.max_q, self.max_k);
        candle_core::bail!("this armorm was built without the flash-attn feature")
    }

    #[cfg(feature = "flash-attn-v3")]
    fn flash3(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        candle_flash_attn_v3::flash_attn_varlen_causal(
            q,
            k,
            v,
            &self.cu_q_dev,
            &self.cu_k_dev,
            self.max_q,
            self.max_k,
            scale,
        )
    }

    #[cfg(not(feature = "flash-attn-v3"))]
    fn flash3(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: f32) -> Result<Tensor> {
        candle_core::bail!("this armorm was built without the flash-attn-v3 feature")
    }

    /// The same contract, one row at a time: grouped-query attention with an f32 softmax.
    fn reference(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let b = self.cu_q.len() - 1;
        let mut rows = Vec::with_capacity(b);
        for r in 0..b {
            let (q0, lq) = (self.cu_q[r], self.cu_q[r + 1] - self.cu_q[r]);
            let (k0, lk) = (self.cu_k[r], self.cu_k[r + 1] - self.cu_k[r]);
            let head_major = |x: &Tensor, start, len| x.narrow(0, start, len)?.transpose(0, 1);
            let (qr, kr, vr) = (
                head_major(q, q0, lq)?, // (nh, lq, d)
                head_major(k, k0, lk)?, // (nkv, lk, d)
                head_major(v, k0, lk)?,
            );
            let (nh, nkv, d) = (qr.dim(0)?, kr.dim(0)?, qr.dim(2)?);
            let n_rep = nh / nkv;
            // The n_rep query heads of one kv head stacked along the query axis.
            let qr = qr.contiguous()?.reshape((nkv, n_rep * lq, d))?;
            let scores = qr.matmul(&kr.contiguous()?.t()?)?; // (nkv, n_rep·lq, lk)
            let scores = (scores.to_dtype(DType::F32)? * scale as f64)?
                .reshape((nkv, n_rep, lq, lk))?
                .broadcast_add(&bottom_right_mask(lq, lk, q.device())?)?
                .reshape((nkv, n_rep * lq, lk))?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            let out = probs.matmul(&vr.contiguous()?)?; // (nkv, n_rep·lq, d)
            rows.push(out.reshape((nh, lq, d))?.transpose(0, 1)?); // (lq, nh, d)
        }
        Tensor::cat(&rows, 0)
    }
}

/// The largest difference between flash attention (`kind`: either version) and the reference on
/// random rows on `device`, in `dtype`, with this model's heads: rows of 1, 69 and 230 tokens, rows
/// of 700, 1,500 and 3 (several 128-row query tiles, and tiles past a shorter row's end), and rows
/// with more keys than queries (as after a cached prefix); with `joined`, the first rows again with
/// queries, keys and values as strided views of one q/k/v buffer (as `ARMORM_FUSED_OPS=qkv` hands
/// them over). The kernels report no errors (a failed launch leaves the output uninitialized), so a
/// run checks them once before trusting them. NaN reads as infinity.
pub fn flash_self_check(
    kind: AttentionKind,
    device: &Device,
    dtype: DType,
    (num_heads, num_kv_heads): (usize, usize),
    joined: bool,
) -> Result<f32> {
    let mut worst = 0f32;
    let rows = [0, 1, 70, 300];
    let long = [0, 700, 2200, 2203];
    let cases = [
        (&rows[..], &rows[..], false),
        (&long[..], &long[..], false),
        (&[0, 3, 8][..], &[0, 50, 58][..], false),
    ];
    let views = [(&rows[..], &rows[..], true)];
    let random = |tokens: usize, heads: usize| {
        Tensor::randn(0f32, 1.0, (tokens, heads, 128), device)?.to_dtype(dtype)
    };
    for (cu_q, cu_k, view) in cases
        .into_iter()
        .chain(views.into_iter().filter(|_| joined))
    {
        let grid = Varlen::from_cu(cu_q, cu_k, None, device)?;
        let (q, k, v) = if view {
            let all = random(cu_q[cu_q.len() - 1], num_heads + 2 * num_kv_heads)?;
            (
                all.narrow(1, 0, num_heads)?,
                all.narrow(1, num_heads, num_kv_heads)?,
                all.narrow(1, num_heads + num_kv_heads, num_kv_heads)?,
            )
        } else {
            (
                random(cu_q[cu_q.len() - 1], num_heads)?,
                random(cu_k[cu_k.len() - 1], num_kv_heads)?,
                random(cu_k[cu_k.len() - 1], num_kv_heads)?,
            )
        };
        let flash = grid.attend(kind, &q, &k, &v)?;
        let reference = grid.attend(AttentionKind::VarlenReference, &q, &k, &v)?;
        worst = worst.max(super::check::abs_diff(&flash, &reference)?);
    }
    Ok(worst)
}

/// The flat key sequence of rows that continue cached ones: row r's cached row `of[r]` and then its
/// own new tokens, as indices into [the cache's tokens; the batch's new tokens], and its cumulative
/// lengths.
fn key_sequence(cu_lens: &[usize], cached_cu: &[usize], of: &[usize]) -> (Vec<usize>, Vec<u32>) {
    let new_start = cached_cu.last().copied().unwrap_or(0);
    let mut cu_k = vec![0];
    let mut index = Vec::new();
    for (r, &c) in of.iter().enumerate() {
        let cached = cached_cu[c]..cached_cu[c + 1];
        let new = (new_start + cu_lens[r])..(new_start + cu_lens[r + 1]);
        index.extend(cached.chain(new).map(|i| i as u32));
        cu_k.push(index.len());
    }
    (cu_k, index)
}

/// Additive mask (1, 1, lq, lk): query j sees keys 0..=j + lk - lq.
fn bottom_right_mask(lq: usize, lk: usize, dev: &Device) -> Result<Tensor> {
    let mut mask = vec![f32::NEG_INFINITY; lq * lk];
    for j in 0..lq {
        mask[j * lk..j * lk + (j + lk + 1 - lq).min(lk)].fill(0.0);
    }
    Tensor::from_vec(mask, (1, 1, lq, lk), dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continued_rows_see_their_cached_row_then_their_own_tokens() {
        // Cached rows of 3 and 1 tokens; row 0 continues cached row 1 with 2 tokens, row 1 continues
        // cached row 0 with 1 token. Tokens: [cache 0..4; new 4..7].
        let (cu_k, index) = key_sequence(&[0, 2, 3], &[0, 3, 4], &[1, 0]);
        assert_eq!(cu_k, [0, 3, 7]);
        assert_eq!(index, [3, 4, 5, 0, 1, 2, 6]);
    }

    #[test]
    fn the_mask_aligns_the_last_query_with_the_last_key() {
        let m: Vec<f32> = bottom_right_mask(2, 4, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, [0., 0., 0., inf, 0., 0., 0., 0.]);
    }

    #[test]
    fn flash_is_refused_where_it_cannot_run() {
        let why = flash_unsupported(&Device::Cpu, DType::BF16, 128).unwrap();
        assert!(why.contains("flash-attn") || why.contains("CUDA"), "{why}");
        assert_eq!(
            AttentionKind::auto(&Device::Cpu, DType::BF16, 128),
            AttentionKind::Blocked
        );
    }

    /// FlashAttention-3 serves rows with as many keys as queries; rows after a cached prefix go to
    /// FlashAttention-2. Told apart here by which missing feature each call names.
    #[test]
    #[cfg(not(feature = "flash-attn"))]
    fn flash3_leaves_rows_with_cached_keys_to_flash2() {
        let x = |n: usize, h: usize| Tensor::zeros((n, h, 8), DType::F32, &Device::Cpu).unwrap();
        let own = Varlen::from_cu(&[0, 2, 5], &[0, 2, 5], None, &Device::Cpu).unwrap();
        let err = own
            .attend(AttentionKind::Flash3, &x(5, 2), &x(5, 1), &x(5, 1))
            .unwrap_err();
        assert!(err.to_string().contains("flash-attn-v3 feature"), "{err}");
        let cached = Varlen::from_cu(&[0, 2, 5], &[0, 4, 9], None, &Device::Cpu).unwrap();
        let err = cached
            .attend(AttentionKind::Flash3, &x(5, 2), &x(9, 1), &x(9, 1))
            .unwrap_err();
        assert!(err.to_string().contains("flash-attn feature"), "{err}");
        assert!(!err.to_string().contains("v3"), "{err}");
    }

    /// More rows than a CUDA grid dimension holds: refused before any kernel is launched (a failed
    /// launch would return garbage), whichever flash kernel was asked for.
    #[test]
    fn flash_refuses_more_rows_than_its_grid_holds() {
        let rows = MAX_GRID_ROWS + 1;
        let cu: Vec<usize> = (0..=rows).collect();
        let grid = Varlen::from_cu(&cu, &cu, None, &Device::Cpu).unwrap();
        let x = |h: usize| Tensor::zeros((rows, h, 8), DType::F32, &Device::Cpu).unwrap();
        for kind in [AttentionKind::Flash, AttentionKind::Flash3] {
            let err = grid.attend(kind, &x(2), &x(1), &x(1)).unwrap_err();
            assert!(err.to_string().contains("at most 65535 rows"), "{err}");
        }
    }

    #[test]
    fn flash3_runs_on_compute_capability_9_0_alone() {
        assert_eq!(flash3_refusal(true, None, Some((9, 0))), None);
        for (cap, shown) in [((8, 0), "8.0"), ((8, 9), "8.9"), ((10, 0), "10.0")] {
            let why = flash3_refusal(true, None, Some(cap)).unwrap();
            assert!(why.contains("Hopper") && why.contains(shown), "{why}");
        }
        assert!(flash3_refusal(true, None, None).is_some());
        let flash2 = Some("flash attention runs on CUDA devices only".to_string());
        assert_eq!(flash3_refusal(true, flash2.clone(), Some((9, 0))), flash2);
        let why = flash3_refusal(false, None, Some((9, 0))).unwrap();
        assert!(why.contains("flash-attn-v3"), "{why}");
        if !cfg!(feature = "flash-attn-v3") {
            let why = flash3_unsupported(&Device::Cpu, DType::BF16, 128, None).unwrap();
            assert!(why.contains("flash-attn-v3"), "{why}");
        }
    }
}
