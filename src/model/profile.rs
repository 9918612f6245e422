//! Opt-in wall time per section of the forward pass, to see where the GPU's time goes (issue 10).
//!
//! GPU kernels run asynchronously, so a host clock around an op measures only its launch. When a
//! profile is on, the device is synchronized before and after each section: a section's time is then
//! its kernels' time plus their launch cost, and a profiled run is slower than a plain one (the launch
//! gaps the GPU normally hides are all counted). When it is off, a section is a plain call: no
//! synchronization, no clock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Result};

/// The parts of a forward pass, each timed on its own; none contains another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The batch's layout built on the host (positions, masks, gather indices) and copied to the device.
    Layout,
    Embedding,
    /// RMSNorms (two per layer and the final one).
    Norm,
    /// f32 <-> compute-dtype conversions around each block (the residual stream stays f32).
    Cast,
    /// The q, k and v projections.
    Qkv,
    Rope,
    /// Flat <-> padded layout copies, query-block slices, and the gathers at the picked tokens.
    Gather,
    /// Attention's two matmuls: QKᵀ and probabilities × V.
    AttnMatmul,
    /// Attention's scale, f32 casts, mask and softmax.
    Softmax,
    /// Variable-length (flash) attention over the flat rows: one kernel for all of it.
    VarlenAttention,
    OProj,
    /// gate_proj, up_proj and down_proj.
    MlpMatmul,
    /// SiLU of the gate and its product with up.
    SiluMul,
    /// Adding each block's output to the residual stream.
    Residual,
    /// The f32 head: regression layer and gating network.
    Head,
    /// The scores copied back to the host.
    Readback,
}

const SECTIONS: usize = 16;

impl Section {
    pub const ALL: [Section; SECTIONS] = [
        Section::Layout,
        Section::Embedding,
        Section::Norm,
        Section::Cast,
        Section::Qkv,
        Section::Rope,
        Section::Gather,
        Section::AttnMatmul,
        Section::Softmax,
        Section::VarlenAttention,
        Section::OProj,
        Section::MlpMatmul,
        Section::SiluMul,
        Section::Residual,
        Section::Head,
        Section::Readback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Section::Layout => "layout",
            Section::Embedding => "embedding",
            Section::Norm => "norm",
            Section::Cast => "cast",
            Section::Qkv => "qkv",
            Section::Rope => "rope",
            Section::Gather => "gather",
            Section::AttnMatmul => "attn_matmul",
            Section::Softmax => "softmax",
            Section::VarlenAttention => "varlen_attn",
            Section::OProj => "o_proj",
            Section::MlpMatmul => "mlp_matmul",
            Section::SiluMul => "silu_mul",
            Section::Residual => "residual",
            Section::Head => "head",
            Section::Readback => "readback",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Time accumulated per section over a run, from any number of threads and model copies.
#[derive(Debug, Default)]
pub struct Profile {
    nanos: [AtomicU64; SECTIONS],
    calls: [AtomicU64; SECTIONS],
    batch_nanos: AtomicU64,
    batches: AtomicU64,
}

/// One section's share of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SectionTime {
    pub section: Section,
    pub time: Duration,
    pub calls: u64,
}

/// What a profile holds at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Batches whose whole forward pass and readback were timed, and that time.
    pub batches: u64,
    pub total: Duration,
    /// Every section, in `Section::ALL` order.
    pub sections: Vec<SectionTime>,
}

impl Report {
    /// The time inside sections.
    pub fn attributed(&self) -> Duration {
        self.sections.iter().map(|s| s.time).sum()
    }

    /// The batches' time outside every section: host work between ops, and ops no section covers.
    pub fn unattributed(&self) -> Duration {
        self.total.saturating_sub(self.attributed())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Profile {
    pub fn add(&self, section: Section, time: Duration) {
        self.nanos[section.index()].fetch_add(nanos(time), Ordering::Relaxed);
        self.calls[section.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// One batch's forward pass and readback, end to end.
    pub fn add_batch(&self, time: Duration) {
        self.batch_nanos.fetch_add(nanos(time), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    pub fn report(&self) -> Report {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Report {
            batches: load(&self.batches),
            total: Duration::from_nanos(load(&self.batch_nanos)),
            sections: Section::ALL
                .iter()
                .map(|&section| SectionTime {
                    section,
                    time: Duration::from_nanos(load(&self.nanos[section.index()])),
                    calls: load(&self.calls[section.index()]),
                })
                .collect(),
        }
    }
}

/// Times sections into a profile on one device, or does nothing at all (the default).
#[derive(Debug, Clone, Default)]
pub struct Timer(Option<(Arc<Profile>, Device)>);

impl Timer {
    pub fn new(profile: Arc<Profile>, device: Device) -> Self {
        Self(Some((profile, device)))
    }

    /// Runs `f`; when on, adds its time, with the device's queue drained before and after, to `section`.
    #[inline]
    pub fn time<T>(&self, section: Section, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some((profile, device)) = &self.0 else {
            return f();
        };
        device.synchronize()?;
        let start = Instant::now();
        let out = f()?;
        device.synchronize()?;
        profile.add(section, start.elapsed());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader;
    use crate::model::FlatBatch;
    use candle_core::DType;

    /// The committed tiny fixture model (hidden 64, 2 layers, GQA) on the CPU.
    fn tiny_model() -> crate::model::ArmoRM {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-armorm");
        let files = loader::resolve(dir.to_str().unwrap(), None).unwrap();
        loader::load(&files, &Device::Cpu, DType::F32).unwrap().0
    }

    /// Four rows of 100-700 tokens: long enough that a pass takes milliseconds, and that attention
    /// runs in more than one query block.
    fn batch() -> FlatBatch {
        let mut flat = FlatBatch::new();
        for (r, len) in [700usize, 300, 100, 450].into_iter().enumerate() {
            let ids: Vec<u32> = (0..len)
                .map(|i| ((i * 7919 + r * 104_729) % 128_000) as u32)
                .collect();
            flat.push(&ids, len / 2);
        }
        flat
    }

    /// The sections one profiled pass timed, after checking that they add up to nearly all of its
    /// wall time and that profiling left the scores alone.
    fn sections_timed(attention: crate::model::AttentionKind) -> Vec<Section> {
        let flat = batch();
        let plain = tiny_model()
            .with_attention(attention)
            .forward(&flat)
            .unwrap();
        let profile = Arc::new(Profile::default());
        let model = tiny_model()
            .with_attention(attention)
            .with_profile(profile.clone());
        // Warm-up outside the measurement: first-touch allocations are not what is measured.
        model.forward(&flat).unwrap();
        let before = profile.report();
        let start = Instant::now();
        let profiled = model.forward(&flat).unwrap();
        let wall = start.elapsed();
        let after = profile.report();

        let got = |o: &crate::model::HeadOutput| o.score.to_vec1::<f32>().unwrap();
        assert_eq!(got(&profiled), got(&plain), "profiling changed the scores");
        let mut sum = Duration::ZERO;
        let mut timed = Vec::new();
        for (a, b) in after.sections.iter().zip(&before.sections) {
            if a.calls > b.calls {
                timed.push(a.section);
            }
            sum += a.time - b.time;
        }
        assert!(sum <= wall, "sections {sum:?} exceed the pass {wall:?}");
        assert!(
            sum.as_secs_f64() >= 0.8 * wall.as_secs_f64(),
            "sections {sum:?} cover too little of the pass {wall:?}"
        );
        timed
    }

    #[test]
    fn profiled_forward_records_every_section_and_they_sum_to_its_time() {
        use crate::model::AttentionKind;
        let blocked = sections_timed(AttentionKind::Blocked);
        let flat = sections_timed(AttentionKind::VarlenReference);
        for section in Section::ALL {
            let want_blocked = section != Section::VarlenAttention;
            let want_flat = !matches!(section, Section::AttnMatmul | Section::Softmax);
            // The scorer, not the model, copies the scores back.
            if section == Section::Readback {
                continue;
            }
            let name = section.name();
            assert_eq!(blocked.contains(&section), want_blocked, "blocked: {name}");
            assert_eq!(flat.contains(&section), want_flat, "flat: {name}");
        }
    }

    #[test]
    fn report_splits_batch_time_into_sections_and_the_rest() {
        let profile = Profile::default();
        profile.add(Section::MlpMatmul, Duration::from_millis(6));
        profile.add(Section::MlpMatmul, Duration::from_millis(2));
        profile.add(Section::Rope, Duration::from_millis(1));
        profile.add_batch(Duration::from_millis(10));
        let report = profile.report();
        assert_eq!(report.batches, 1);
        let mlp = report.sections[Section::MlpMatmul.index()];
        assert_eq!((mlp.time, mlp.calls), (Duration::from_millis(8), 2));
        assert_eq!(report.attributed(), Duration::from_millis(9));
        assert_eq!(report.unattributed(), Duration::from_millis(1));
    }
}
