//! The GPU kernels a run uses (flash attention, FlashAttention-3, the fused ops): chosen from
//! `--attention` and the environment, and checked on the device against their references before a run
//! trusts them.

use anyhow::{Context, Result};

use armorm::loader;
use armorm::model::{ArmoRM, ArmoRMConfig, AttentionKind};

use super::{device_name, env_flag};

/// Largest difference armorm's GPU kernels (flash attention, fused ops) may show against their
/// references on the self-checks' random bf16/f16 rows (outputs of magnitude ~1, or relative). Rounding
/// gives ~1e-2; a kernel that did not run leaves uninitialized memory, far beyond it.
const SELF_CHECK_TOLERANCE: f32 = 5e-2;

/// The model with its attention and (if asked for) the fused ops, each checked on the device first.
/// Flash attention chosen by `--attention auto` falls back to blocked attention, with a warning, where
/// its kernels fail the check (e.g. a build for another compute capability); named, it is refused.
pub(super) fn with_kernels(
    model: ArmoRM,
    attention: AttentionKind,
    auto: bool,
    device: &candle_core::Device,
    config: &ArmoRMConfig,
) -> Result<ArmoRM> {
    let fused = fused_ops_requested(device)?;
    let model = model
        .with_attention(attention)
        .with_fused_ops(fused.on)
        .with_vector_ops(fused.vector)
        .with_fused_qkv(fused.qkv)
        .context("joining the q/k/v weights for ARMORM_FUSED_OPS=qkv")?
        .with_fused_gate_up(fused.gate_up)
        .context("joining the gate/up weights for ARMORM_FUSED_OPS=gateup")?
        .with_accumulate(fused.accumulate)
        .with_compute_dtype_residual(bf16_residual_requested());
    let model = if matches!(attention, AttentionKind::Flash | AttentionKind::Flash3) {
        let failure = flash_failure(&model, device);
        match after_flash_check(attention, auto, failure)? {
            AttentionKind::Blocked => model.with_attention(AttentionKind::Blocked),
            _ => model,
        }
    } else {
        model
    };
    if model.fused_ops() {
        check_fused(&model, device, config)?;
    }
    // The weights the joined GEMMs replaced and the self-checks' tensors sit freed in the memory pool,
    // which the free-memory reading behind the token budget would count as used.
    loader::release_freed_memory(device)
        .with_context(|| format!("finishing the self-checks on {}", device_name(device)))?;
    Ok(model)
}

/// Why flash attention's kernels cannot be trusted on this device, or `None` when they compute what
/// the reference does on random rows.
fn flash_failure(model: &ArmoRM, device: &candle_core::Device) -> Option<String> {
    let what = match model.attention() {
        AttentionKind::Flash3 => "FlashAttention-3",
        _ => "flash attention",
    };
    match model.flash_self_check() {
        Err(e) => Some(format!("{what} self-check on {}: {e}", device_name(device))),
        Ok(diff) if diff > SELF_CHECK_TOLERANCE => Some(format!(
            "{what} on {} differs from the reference by {diff} on random rows (allowed \
             {SELF_CHECK_TOLERANCE}): its kernels do not run correctly on this device",
            device_name(device)
        )),
        Ok(_) => None,
    }
}

/// The attention that runs after flash attention's self-check (`failure`): the kind asked for if it
/// passed; blocked, with a warning, if `auto` chose it; else an error that says what to use instead.
fn after_flash_check(
    kind: AttentionKind,
    auto: bool,
    failure: Option<String>,
) -> Result<AttentionKind> {
    let Some(why) = failure else {
        return Ok(kind);
    };
    if auto {
        eprintln!("armorm: {why}; --attention auto runs blocked attention instead");
        return Ok(AttentionKind::Blocked);
    }
    let instead = match kind {
        AttentionKind::Flash3 => "--attention flash",
        _ => "--attention blocked",
    };
    anyhow::bail!("{why}; use {instead}")
}

/// Refuses fused ops whose kernels do not compute what candle's unfused ops do on this device.
fn check_fused(model: &ArmoRM, device: &candle_core::Device, config: &ArmoRMConfig) -> Result<()> {
    let diff = model
        .fused_self_check(config)
        .with_context(|| format!("fused ops self-check on {}", device_name(device)))?;
    if diff > SELF_CHECK_TOLERANCE {
        anyhow::bail!(
            "the fused ops' kernels on {} differ from candle's ops by {diff} (relative) on random \
             rows (allowed {SELF_CHECK_TOLERANCE}): they do not run correctly on this device; set \
             ARMORM_FUSED_OPS=0 to run without them",
            device_name(device)
        );
    }
    Ok(())
}

/// The fused elementwise ops (SiLU·mul, residual add, RMSNorm with their casts) instead of candle's
/// pairs of passes: on by default on CUDA, where the H200 check measured them 1.13-1.18x faster with the
/// same accuracy (perf-notes 15); off on the CPU, where they were not measured faster.
/// `ARMORM_FUSED_OPS=0` turns them off; a comma-separated list of `vector` (their 16-byte-access kernels),
/// `qkv` (q/k/v as one GEMM with RoPE in place, under flat attention), `gateup` (gate/up as one GEMM,
/// SiLU·mul from its halves) and `accumulate` (o_proj and
/// down_proj adding into the f32 residual stream in their GEMMs) turns them on with those experimental
/// kernels, for the GPU check; any other single value turns them on.
fn fused_ops_requested(device: &candle_core::Device) -> Result<FusedChoice> {
    fused_ops_choice(
        std::env::var_os("ARMORM_FUSED_OPS").as_deref(),
        device.is_cuda(),
    )
}

/// The experimental kernels `ARMORM_FUSED_OPS` can name.
const KERNELS: [&str; 4] = ["vector", "qkv", "gateup", "accumulate"];

/// What `ARMORM_FUSED_OPS` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FusedChoice {
    on: bool,
    vector: bool,
    qkv: bool,
    gate_up: bool,
    accumulate: bool,
}

/// `ARMORM_FUSED_OPS`'s value (unset or empty: the device's default) -> what runs. A list naming
/// anything but the names in `KERNELS` is refused rather than half-read.
fn fused_ops_choice(value: Option<&std::ffi::OsStr>, cuda: bool) -> Result<FusedChoice> {
    let off = FusedChoice::default();
    let on = FusedChoice { on: true, ..off };
    let value = match value.map(|v| v.to_string_lossy()) {
        None => return Ok(FusedChoice { on: cuda, ..off }),
        Some(v) if v.is_empty() => return Ok(FusedChoice { on: cuda, ..off }),
        Some(v) if v == "0" => return Ok(off),
        Some(v) => v.into_owned(),
    };
    let names: Vec<&str> = value.split(',').map(str::trim).collect();
    let known = |n: &str| KERNELS.contains(&n);
    if names.len() > 1 || names.iter().any(|&n| known(n)) {
        if let Some(bad) = names.iter().find(|&&n| !known(n)) {
            anyhow::bail!(
                "ARMORM_FUSED_OPS={value}: no kernels named {bad:?} (a list of {}, or 0 to turn \
                 the fused ops off)",
                KERNELS.join(", ")
            );
        }
    }
    Ok(FusedChoice {
        vector: names.contains(&"vector"),
        qkv: names.contains(&"qkv"),
        gate_up: names.contains(&"gateup"),
        accumulate: names.contains(&"accumulate"),
        ..on
    })
}

/// `ARMORM_BF16_RESIDUAL=1`: the backbone's residual stream in the compute dtype (bf16 or f16; no
/// change in f32) instead of f32, as transformers keeps it: fewer bytes and no casts per block, at the
/// cost of rounding after every block. Experimental, for measuring speed and the Pearson figures
/// side by side on a GPU (scripts/gpu-check.sh, issue 10 step 3), as ARMORM_FUSED_OPS is.
fn bf16_residual_requested() -> bool {
    env_flag("ARMORM_BF16_RESIDUAL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_that_fails_its_check_falls_back_only_when_auto_chose_it() {
        use AttentionKind::{Blocked, Flash, Flash3};
        let failed =
            || Some("flash attention on cuda:0 differs from the reference by 1.2".to_string());
        assert_eq!(after_flash_check(Flash, true, None).unwrap(), Flash);
        assert_eq!(after_flash_check(Flash, false, None).unwrap(), Flash);
        assert_eq!(after_flash_check(Flash, true, failed()).unwrap(), Blocked);
        let named = after_flash_check(Flash, false, failed())
            .unwrap_err()
            .to_string();
        assert!(
            named.contains("differs from the reference by 1.2"),
            "{named}"
        );
        assert!(named.ends_with("use --attention blocked"), "{named}");
        let named = after_flash_check(Flash3, false, failed())
            .unwrap_err()
            .to_string();
        assert!(named.ends_with("use --attention flash"), "{named}");
    }

    #[test]
    fn fused_ops_default_to_cuda_and_follow_the_variable() {
        let v = |s: &'static str| Some(std::ffi::OsStr::new(s));
        let choice = |value, cuda| {
            let c = fused_ops_choice(value, cuda).unwrap();
            assert!(!c.accumulate || c.on);
            (c.on, c.vector, c.qkv)
        };
        assert_eq!(choice(None, true), (true, false, false));
        assert_eq!(choice(None, false), (false, false, false));
        assert_eq!(
            choice(v(""), true),
            (true, false, false),
            "empty means unset"
        );
        assert_eq!(choice(v("0"), true), (false, false, false));
        assert_eq!(choice(v("1"), false), (true, false, false));
        assert_eq!(choice(v("vector"), false), (true, true, false));
        assert_eq!(choice(v("qkv"), false), (true, false, true));
        assert_eq!(choice(v("vector,qkv"), true), (true, true, true));
        assert_eq!(choice(v("qkv, vector"), true), (true, true, true));
        let err = fused_ops_choice(v("vector,qvk"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"qvk\""), "{err}");
        assert!(fused_ops_choice(v("qkv,1"), true).is_err());
        let all = fused_ops_choice(v("vector,qkv,gateup,accumulate"), false).unwrap();
        assert!(all.on && all.vector && all.qkv && all.gate_up && all.accumulate);
        assert!(!fused_ops_choice(v("vector,qkv"), true).unwrap().accumulate);
    }
}
