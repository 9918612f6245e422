//! Where each token of a flat batch sits in the padded grids attention works on, with or without
//! cached prefixes: RoPE positions, and the padded grids and masks of blocked attention or the
//! cumulative lengths of variable-length attention, built once per batch.

use candle_core::{DType, Device, Result, Shape, Tensor};

use super::llama::Past;
use super::profile::Timer;
use super::rope::RopeTables;
use super::varlen::{AttentionKind, Varlen};

/// Where each token of a flat batch sits, built once per batch and shared by every layer.
///
/// Row r has `past[r]` cached tokens (0 without a cache) and `n[r]` new ones. Blocked attention pads
/// them (`Grid::Padded`); variable-length attention keeps them flat (`Grid::Varlen`).
pub(super) struct Layout {
    /// The compute dtype of the blocks' matmuls.
    pub(super) dtype: DType,
    pub(super) b: usize,
    pub(super) picks: Vec<usize>,
    pub(super) pick_index: Tensor,
    pub(super) cos: Tensor, // (n, d/2)
    pub(super) sin: Tensor,
    pub(super) pick_cos: Tensor, // (p, d/2)
    pub(super) pick_sin: Tensor,
    pub(super) attention: AttentionKind,
    /// Fused elementwise ops (`fused`) instead of candle's pairs of passes.
    pub(super) fused: bool,
    /// The fused ops' 16-byte-access kernels (CUDA; experimental).
    pub(super) vector: bool,
    /// Output projections accumulating into the f32 residual stream (experimental; implies the fused
    /// ops and an f32 stream: `Llama::accumulate`).
    pub(super) accumulate: bool,
    pub(super) grid: Grid,
    /// The model's timer (off unless a profile is on).
    pub(super) timer: Timer,
}

pub(super) enum Grid {
    Padded(Padded),
    Varlen(Varlen),
}

/// Queries are the new tokens, padded to (b, tq), tq = max n; keys and values are the cached tokens
/// followed by the new ones, padded to (b, t), t = max(past + n). Without a cache the two grids are
/// the same.
pub(super) struct Padded {
    b: usize,
    pub(super) tq: usize,
    pub(super) t: usize,
    /// The most cached tokens of any row.
    pub(super) max_past: usize,
    /// For each slot of the padded (b, tq) query grid, the flat new token it holds (padding repeats
    /// token 0).
    to_padded: Tensor,
    /// For each slot of the padded (b, t) key grid, its token in [cached tokens; new tokens].
    keys_to_padded: Tensor,
    /// For each flat new token, its slot in the padded query grid.
    to_flat: Tensor,
    /// Additive causal mask (1, 1, 1, t, t) without a cache, (b, 1, 1, tq, t) with one: query j of row r
    /// sees the keys up to its position, past[r] + j. With right padding that is all that is needed: a
    /// real token never sees a later position, and every padding slot comes after the row's last token.
    pub(super) causal: Tensor,
    /// (b, 1, 1, per_row, t): each picked query sees the keys up to its own position.
    pub(super) pick_mask: Tensor,
}

impl Layout {
    pub(super) fn new(
        cu_lens: &[usize],
        picks: &[usize],
        past: Option<Past>,
        rope: &RopeTables,
        (dtype, attention): (DType, AttentionKind),
        dev: &Device,
    ) -> Result<Self> {
        let b = cu_lens.len() - 1;
        let cached: Vec<usize> = match past {
            Some(p) => p.of.iter().map(|&c| p.cache.len_of(c)).collect(),
            None => vec![0; b],
        };
        let t = (0..b)
            .map(|r| cached[r] + cu_lens[r + 1] - cu_lens[r])
            .max()
            .unwrap_or(0);
        let row_of = |i: usize| cu_lens.partition_point(|&c| c <= i) - 1;
        let pos_of = |i: usize| cached[row_of(i)] + i - cu_lens[row_of(i)];
        debug_assert!(picks
            .iter()
            .enumerate()
            .all(|(k, &i)| row_of(i) == k % b.max(1)));

        let positions: Vec<u32> = (0..cu_lens[b]).map(|i| pos_of(i) as u32).collect();
        let pick_positions: Vec<u32> = picks.iter().map(|&i| pos_of(i) as u32).collect();
        let (cos_t, sin_t) = rope.upto(t)?; // (≥ t, d/2)
        let gather = |table: &Tensor, idx: &[u32]| {
            table.index_select(&Tensor::from_slice(idx, idx.len(), dev)?, 0)
        };
        let pick_positions_in_row: Vec<usize> = picks.iter().map(|&i| pos_of(i)).collect();
        let grid = if attention.is_varlen() {
            Grid::Varlen(Varlen::new(cu_lens, past, dev)?)
        } else {
            Grid::Padded(Padded::new(
                cu_lens,
                &pick_positions_in_row,
                past,
                &cached,
                dev,
            )?)
        };
        Ok(Self {
            dtype,
            b,
            picks: picks.to_vec(),
            pick_index: Tensor::from_vec(
                picks.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                picks.len(),
                dev,
            )?,
            cos: gather(&cos_t, &positions)?,
            sin: gather(&sin_t, &positions)?,
            pick_cos: gather(&cos_t, &pick_positions)?,
            pick_sin: gather(&sin_t, &pick_positions)?,
            attention,
            fused: false,
            vector: false,
            accumulate: false,
            grid,
            timer: Timer::default(),
        })
    }
}

impl Padded {
    /// `pick_positions`: each pick's position in its row (cached tokens counted); picks are grouped
    /// by kind, rows in order (pick k belongs to row k mod b).
    fn new(
        cu_lens: &[usize],
        pick_positions: &[usize],
        past: Option<Past>,
        cached: &[usize],
        dev: &Device,
    ) -> Result<Self> {
        let b = cu_lens.len() - 1;
        let lens: Vec<usize> = cu_lens.windows(2).map(|w| w[1] - w[0]).collect();
        let tq = lens.iter().copied().max().unwrap_or(0);
        let t = (0..b).map(|r| cached[r] + lens[r]).max().unwrap_or(0);
        let (to_padded, to_flat) = query_grid(cu_lens, tq);
        let to_padded = Tensor::from_vec(to_padded, b * tq, dev)?;
        // Without a cache the key grid is the query grid: one index, copied to the device once.
        let keys_to_padded = match past {
            Some(p) => Tensor::from_vec(key_grid(cu_lens, &p.cache.cu_lens, p.of, t), b * t, dev)?,
            None => to_padded.clone(),
        };
        let per_row = pick_positions.len() / b.max(1);
        let mut pick_limits = vec![0u32; b * per_row];
        for (k, &pos) in pick_positions.iter().enumerate() {
            let (slot, r) = (k / b, k % b);
            pick_limits[r * per_row + slot] = pos as u32;
        }
        let causal = match past {
            None => causal_mask(&[0], t, t, dev)?.reshape((1, 1, 1, t, t))?,
            Some(_) => causal_mask(cached, tq, t, dev)?.reshape((b, 1, 1, tq, t))?,
        };
        Ok(Self {
            b,
            tq,
            t,
            max_past: cached.iter().copied().max().unwrap_or(0),
            to_padded,
            keys_to_padded,
            to_flat: Tensor::from_vec(to_flat, cu_lens[b], dev)?,
            causal,
            pick_mask: mask_upto(pick_limits, (b, 1, 1, per_row), t, dev)?,
        })
    }

    /// Flat new tokens (n, heads·d) -> padded queries (b, heads, tq, d).
    pub(super) fn pad_queries(&self, x: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
        pad(x, &self.to_padded, (self.b, self.tq, heads, d))
    }

    /// Flat [cached; new] tokens (c + n, heads·d) -> padded keys or values (b, heads, t, d).
    pub(super) fn pad_keys(&self, x: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
        pad(x, &self.keys_to_padded, (self.b, self.t, heads, d))
    }

    /// Padded (b, heads, tq, d) -> flat (n, heads·d).
    pub(super) fn unpad(&self, x: &Tensor) -> Result<Tensor> {
        let (b, heads, tq, d) = x.dims4()?;
        x.transpose(1, 2)?
            .contiguous()?
            .reshape((b * tq, heads * d))?
            .index_select(&self.to_flat, 0)
    }
}

/// Flat (m, heads·d) gathered by `index` into (b, heads, t, d).
fn pad(
    x: &Tensor,
    index: &Tensor,
    (b, t, heads, d): (usize, usize, usize, usize),
) -> Result<Tensor> {
    x.index_select(index, 0)?
        .reshape((b, t, heads, d))?
        .transpose(1, 2)?
        .contiguous()
}

/// For each slot of the (b, tq) grid of new tokens, the flat token it holds (padding repeats token 0),
/// and for each flat token its slot.
fn query_grid(cu_lens: &[usize], tq: usize) -> (Vec<u32>, Vec<u32>) {
    let b = cu_lens.len() - 1;
    let mut to_padded = vec![0u32; b * tq];
    let mut to_flat = Vec::with_capacity(cu_lens[b]);
    for (r, w) in cu_lens.windows(2).enumerate() {
        for (p, i) in (w[0]..w[1]).enumerate() {
            to_padded[r * tq + p] = i as u32;
            to_flat.push((r * tq + p) as u32);
        }
    }
    (to_padded, to_flat)
}

/// For each slot of the (b, t) key grid, its token in [the cache's tokens; the batch's new tokens]:
/// row r's cached row first, then its own tokens, then padding (token 0, masked).
/// `cached_cu`: the cache's rows end to end; `of`: which cached row each row continues.
fn key_grid(cu_lens: &[usize], cached_cu: &[usize], of: &[usize], t: usize) -> Vec<u32> {
    let b = cu_lens.len() - 1;
    let new_start = cached_cu.last().copied().unwrap_or(0);
    let mut grid = vec![0u32; b * t];
    for r in 0..b {
        let c = of[r];
        let cached = cached_cu[c]..cached_cu[c + 1];
        let new = (new_start + cu_lens[r])..(new_start + cu_lens[r + 1]);
        for (slot, i) in grid[r * t..].iter_mut().zip(cached.chain(new)) {
            *slot = i as u32;
        }
    }
    grid
}

/// Additive causal masks (rows, tq, t), one per entry of `past`: query j sees the keys up to past + j.
fn causal_mask(past: &[usize], tq: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let limits = past
        .iter()
        .flat_map(|&c| (0..tq).map(move |j| (c + j) as u32))
        .collect();
    mask_upto(limits, (past.len(), tq), t, dev)
}

/// Additive masks over `t` keys, 0 up to each limit (included) and -inf after: `limits` (…) ->
/// (…, t) f32. On a GPU the mask is built by the device from the limits alone: filled on the host and
/// copied, a t × t mask is 154 MB per batch at t = 6,200. On the CPU the host fill is the fastest way
/// (a candle compare and select over the same elements took twice as long).
fn mask_upto(limits: Vec<u32>, shape: impl Into<Shape>, t: usize, dev: &Device) -> Result<Tensor> {
    let shape: Shape = shape.into();
    if dev.is_cpu() {
        let mut dims = shape.dims().to_vec();
        dims.push(t);
        return Tensor::from_vec(fill_upto(&limits, t), dims, dev);
    }
    mask_by_ops(limits, shape, t, dev)
}

/// `mask_upto` as device ops: a compare of the key positions with the limits, and a select.
fn mask_by_ops(limits: Vec<u32>, shape: Shape, t: usize, dev: &Device) -> Result<Tensor> {
    let limits = Tensor::from_vec(limits, shape.clone(), dev)?.unsqueeze(shape.rank())?; // (…, 1)
    let keys = Tensor::arange(0u32, t as u32, dev)?; // (t)
    let seen = keys.broadcast_le(&limits)?; // (…, t)
    let zero = Tensor::new(0f32, dev)?.broadcast_as(seen.shape())?;
    let never = Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as(seen.shape())?;
    seen.where_cond(&zero, &never)
}

/// `mask_upto` on the host: one row of `t` per limit.
fn fill_upto(limits: &[u32], t: usize) -> Vec<f32> {
    let mut mask = vec![f32::NEG_INFINITY; limits.len() * t];
    for (row, &limit) in mask.chunks_exact_mut(t.max(1)).zip(limits) {
        row[..(limit as usize + 1).min(t)].fill(0.0);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_maps_flat_tokens_to_the_padded_grid_and_back() {
        // Rows of 2 and 3 tokens; picks: last tokens (1, 4), then gates (0, 2).
        let lay = Layout::new(
            &[0, 2, 5],
            &[1, 4, 0, 2],
            None,
            &RopeTables::new(vec![1.0], 8, DType::F32, &Device::Cpu).unwrap(),
            (DType::F32, AttentionKind::Blocked),
            &Device::Cpu,
        )
        .unwrap();
        let Grid::Padded(grid) = &lay.grid else {
            panic!("blocked attention pads")
        };
        assert_eq!((lay.b, grid.t), (2, 3));
        assert_eq!(grid.to_padded.to_vec1::<u32>().unwrap(), [0, 1, 0, 2, 3, 4]);
        assert_eq!(grid.to_flat.to_vec1::<u32>().unwrap(), [0, 1, 3, 4, 5]);
        // Positions restart at 0 in each row: cos(pos · 1.0).
        let cos: Vec<f32> = lay.cos.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = [0., 1., 0., 1., 2.].iter().map(|p: &f32| p.cos()).collect();
        assert_eq!(cos, want);
        // Row 0's last token (position 1) sees keys 0..=1; row 1's gate (position 0) sees key 0 only.
        let m: Vec<f32> = grid.pick_mask.flatten_all().unwrap().to_vec1().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(&m[0..3], &[0., 0., inf]);
        assert_eq!(&m[9..12], &[0., inf, inf]);
    }

    #[test]
    fn cached_rows_continue_at_their_positions_and_see_their_prefix() {
        // Cached rows of 3 and 1 tokens; the batch: row 0 continues cached row 1 with 2 tokens, row 1
        // continues cached row 0 with 1 token. Keys: [cache 0..4; new 4..7].
        let grid = key_grid(&[0, 2, 3], &[0, 3, 4], &[1, 0], 4);
        assert_eq!(grid, [3, 4, 5, 0, 0, 1, 2, 6]);
        let inf = f32::NEG_INFINITY;
        // Query j of a row with c cached tokens sees keys 0..=c + j.
        let mask = causal_mask(&[1, 3], 2, 4, &Device::Cpu).unwrap();
        assert_eq!(mask.dims(), [2, 2, 4]);
        assert_eq!(
            mask.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 0., inf, inf, 0., 0., 0., inf, 0., 0., 0., 0., 0., 0., 0., 0.]
        );
    }

    /// The masks a GPU builds from candle ops (here run on the CPU) equal the host's.
    #[test]
    fn device_built_masks_equal_the_host_fill() {
        let limits: Vec<u32> = vec![0, 3, 9, 2, 5, 6];
        let dev = Device::Cpu;
        let t = 7;
        let by_ops = mask_by_ops(limits.clone(), Shape::from((2, 3)), t, &dev).unwrap();
        assert_eq!(by_ops.dims(), [2, 3, t]);
        let host = mask_upto(limits.clone(), (2, 3), t, &dev).unwrap();
        assert_eq!(host.dims(), [2, 3, t]);
        let flat = |m: &Tensor| m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&by_ops), flat(&host));
        assert_eq!(
            flat(&host)[7..14],
            [
                0.,
                0.,
                0.,
                0.,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY
            ]
        );
    }
}
