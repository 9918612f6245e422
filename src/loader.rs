//! Finds a model's files (a local directory or a Hugging Face hub repo) and builds the scorer from them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hf_hub::{Repo, RepoType};

use crate::encoder::{Encoder, EncoderError};
use crate::hub;
use crate::model::{flash3_unsupported, flash_unsupported, ArmoRM, ArmoRMConfig, AttentionKind};

pub const DEFAULT_MODEL: &str = "RLHFlow/ArmoRM-Llama3-8B-v0.1";
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const SIDE_FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(
        "model {repo} (revision {revision}) is not in the Hugging Face cache at {cache} and could not be \
         downloaded: {message}.\nDownload it where there is network (`huggingface-cli download {repo}`) and \
         copy the cache here, or pass --model DIR: a directory with config.json, tokenizer.json, \
         tokenizer_config.json and the safetensors weights"
    )]
    Hub {
        repo: String,
        revision: String,
        cache: String,
        message: String,
    },
    #[error("{0}")]
    Encoder(#[from] EncoderError),
    #[error("loading weights from {dir}: {error}")]
    Weights {
        dir: String,
        error: candle_core::Error,
    },
    #[error("{0}")]
    Device(String),
}

/// Where a model's files are, and what to call it in output metadata.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub weights: Vec<PathBuf>,
    pub name: String,
    /// `--revision` as given (`main` when not given), for a hub repo.
    pub revision: Option<String>,
    /// The commit that revision resolved to: the name of its snapshot folder in the hub cache.
    pub commit: Option<String>,
}

/// `model` is a directory if one exists at that path, else a hub repo id.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<ModelFiles, LoadError> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(ModelFiles {
            dir: path.to_path_buf(),
            weights: local_weights(path)?,
            name: model.to_string(),
            revision: None,
            commit: None,
        });
    }
    let looks_like_repo =
        model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/');
    if !looks_like_repo {
        return Err(LoadError::File {
            path: model.to_string(),
            message:
                "no such model directory (nor a hub repo id like RLHFlow/ArmoRM-Llama3-8B-v0.1)"
                    .into(),
        });
    }
    from_hub(model, revision.unwrap_or("main"))
}

fn local_weights(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join(INDEX);
    if index.is_file() {
        return shard_names(&index).map(|names| names.iter().map(|n| dir.join(n)).collect());
    }
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(LoadError::File {
        path: dir.display().to_string(),
        message: format!("no {INDEX} or {SINGLE} in this directory"),
    })
}

/// The distinct shard files named by a `model.safetensors.index.json`.
fn shard_names(index: &Path) -> Result<BTreeSet<String>, LoadError> {
    let err = |message: String| LoadError::File {
        path: index.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| err(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err("no weight_map object".into()))?;
    map.values()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| err("weight_map values must be file names".into()))
        })
        .collect()
}

fn from_hub(repo_id: &str, revision: &str) -> Result<ModelFiles, LoadError> {
    let cache_dir = hub::cache_dir();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let snapshot = hub::cached_snapshot(&cache_dir.join(repo.folder_name()), revision);
    let hub_err = |message: String| LoadError::Hub {
        repo: repo_id.to_string(),
        revision: revision.to_string(),
        cache: cache_dir.display().to_string(),
        message,
    };
    let api = if hub::offline() {
        None
    } else {
        Some(
            hub::api(&cache_dir, false)
                .map_err(|e| hub_err(e.to_string()))?
                .repo(repo.clone()),
        )
    };
    // The cache first, so that files Python users already downloaded are used without network.
    let fetch = |file: &str| -> Result<PathBuf, LoadError> {
        if let Some(p) = snapshot
            .as_ref()
            .map(|s| s.join(file))
            .filter(|p| p.is_file())
        {
            return Ok(p);
        }
        match &api {
            None if snapshot.is_none() => Err(hub_err(format!(
                "revision {revision} is not cached (no refs/{revision} and no snapshots/{revision}) \
                 and HF_HUB_OFFLINE is set"
            ))),
            None => Err(hub_err(format!(
                "{file} is not cached and HF_HUB_OFFLINE is set"
            ))),
            Some(api) => api.get(file).map_err(|e| hub_err(format!("{file}: {e}"))),
        }
    };
    let mut dir = None;
    for f in SIDE_FILES {
        dir = fetch(f)?.parent().map(Path::to_path_buf);
    }
    let weights = match fetch(INDEX) {
        Ok(index) => shard_names(&index)?
            .iter()
            .map(|n| fetch(n))
            .collect::<Result<Vec<_>, _>>()?,
        Err(_) => vec![fetch(SINGLE)?],
    };
    let dir = dir.unwrap_or_default();
    Ok(ModelFiles {
        commit: snapshot_commit(&dir),
        dir,
        weights,
        name: repo_id.to_string(),
        revision: Some(revision.to_string()),
    })
}

/// The commit of a hub cache snapshot folder (`.../snapshots/COMMIT`), where the files of every
/// revision are laid out by huggingface_hub and hf-hub alike.
fn snapshot_commit(dir: &Path) -> Option<String> {
    let parent = dir.parent()?.file_name()?;
    (parent == "snapshots")
        .then(|| dir.file_name().map(|c| c.to_string_lossy().into_owned()))
        .flatten()
}

pub fn read_config(dir: &Path) -> Result<ArmoRMConfig, LoadError> {
    let path = dir.join("config.json");
    let err = |message: String| LoadError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    ArmoRMConfig::from_json(&text).map_err(err)
}

/// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`; `None` picks the first CUDA device when there is one.
pub fn device(spec: Option<&str>) -> Result<Device, LoadError> {
    let err = |e: candle_core::Error, what: &str| LoadError::Device(format!("{what}: {e}"));
    let Some(spec) = spec else {
        return Device::cuda_if_available(0).map_err(|e| err(e, "cuda:0"));
    };
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>().map_err(|_| {
                LoadError::Device(format!(
                    "bad device {spec:?}: expected cpu, cuda, cuda:N or metal"
                ))
            })?,
        ),
        None => (spec, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Device::new_cuda(ordinal).map_err(|e| err(e, spec)),
        "cuda" => Err(LoadError::Device(
            "this armorm was built without CUDA: rebuild with `--features cuda`".into(),
        )),
        "metal" => Device::new_metal(ordinal).map_err(|e| err(e, spec)),
        _ => Err(LoadError::Device(format!(
            "bad device {spec:?}: expected cpu, cuda, cuda:N or metal"
        ))),
    }
}

/// On CUDA, keeps the memory a run frees in the device's default pool instead of handing it back to the
/// driver at every synchronization (the pool's release threshold is 0 by default). candle allocates
/// every tensor with `cuMemAllocAsync` and a batch synchronizes when its scores are read back, so
/// without this each batch maps its activations (gigabytes at 64K tokens) afresh, and a profiled run,
/// which synchronizes around every section, maps them for every op. Nothing elsewhere.
pub fn keep_freed_memory(device: &Device) -> Result<(), LoadError> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let ctx = dev.cuda_stream().context().clone();
        let err = |e: result::DriverError| LoadError::Device(format!("memory pool: {e}"));
        ctx.bind_to_thread().map_err(err)?;
        let mut threshold = u64::MAX;
        // SAFETY: the device is the context's own; the attribute takes a u64 (cuda docs).
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(err)?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .map_err(err)?;
        }
    }
    let _ = device;
    Ok(())
}

/// The CUDA device's compute capability (major, minor); `None` on other devices or if it cannot be
/// read.
pub fn compute_capability(device: &Device) -> Option<(i32, i32)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        use sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
        };
        let cu = dev.cuda_stream().context().cu_device();
        // SAFETY: the device handle is the context's own; both attributes are plain ints.
        return unsafe {
            Some((
                result::device::get_attribute(cu, MAJOR).ok()?,
                result::device::get_attribute(cu, MINOR).ok()?,
            ))
        };
    }
    let _ = device;
    None
}

/// Hands the memory `keep_freed_memory` keeps back to the driver, once the device has finished its
/// work: after an out-of-memory error, so that a retry is not refused while gigabytes sit free in
/// the pool in blocks of the wrong sizes (what the driver's default did at every synchronization).
/// Nothing elsewhere. The error returned is the one the device reports on finishing (it belongs to
/// the work before); a pool that cannot be trimmed only costs speed, and is no error.
pub fn release_freed_memory(device: &Device) -> candle_core::Result<()> {
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let ctx = dev.cuda_stream().context().clone();
        // SAFETY: the device is the context's own; trimming only releases memory no allocation holds.
        unsafe {
            if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
                let _ = result::mem_pool::trim_to(pool, 0);
            }
        }
    }
    Ok(())
}

/// `auto` is bf16 on a GPU (the checkpoint's own dtype) and f32 on CPU, where bf16 is widened anyway.
pub fn dtype(spec: &str, device: &Device) -> Result<DType, LoadError> {
    match spec {
        "auto" if device.is_cpu() => Ok(DType::F32),
        "auto" => Ok(DType::BF16),
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(LoadError::Device(format!(
            "bad dtype {other:?}: expected auto, f32, bf16 or f16"
        ))),
    }
}

/// `--attention`: auto (flash where it can run, else blocked), flash or flash3 (refused where they
/// cannot run, with the reason) or blocked; `varlen-reference` (hidden) runs flash attention's flat
/// layout with matmuls anywhere, for tests.
pub fn attention(
    spec: &str,
    device: &Device,
    dtype: DType,
    head_dim: usize,
) -> Result<AttentionKind, LoadError> {
    match spec {
        "auto" => Ok(AttentionKind::auto(device, dtype, head_dim)),
        "blocked" => Ok(AttentionKind::Blocked),
        "varlen-reference" => Ok(AttentionKind::VarlenReference),
        "flash" => match flash_unsupported(device, dtype, head_dim) {
            None => Ok(AttentionKind::Flash),
            Some(why) => Err(LoadError::Device(format!(
                "--attention flash: {why}; use --attention blocked (or auto)"
            ))),
        },
        "flash3" => match flash3_unsupported(device, dtype, head_dim, compute_capability(device)) {
            None => Ok(AttentionKind::Flash3),
            Some(why) => Err(LoadError::Device(format!(
                "--attention flash3: {why}; use --attention auto"
            ))),
        },
        other => Err(LoadError::Device(format!(
            "bad attention {other:?}: expected auto, flash, flash3 or blocked"
        ))),
    }
}

/// The model, its config and its encoder, ready to score.
pub fn load(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
) -> Result<(ArmoRM, ArmoRMConfig, Encoder), LoadError> {
    let cfg = read_config(&files.dir)?;
    let encoder = Encoder::from_dir(&files.dir, cfg.vocab_size)?;
    let weights_err = |error| LoadError::Weights {
        dir: files.dir.display().to_string(),
        error,
    };
    // SAFETY: the weights are memory-mapped read-only; as in every safetensors loader, they must not
    // be modified by another process while armorm runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device) }
        .map_err(weights_err)?;
    let model = ArmoRM::load(vb, &cfg).map_err(weights_err)?;
    Ok((model, cfg, encoder))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_is_the_snapshot_folder_name() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        assert_eq!(
            snapshot_commit(&repo.join("snapshots").join(commit)).as_deref(),
            Some(commit)
        );
        assert_eq!(snapshot_commit(repo), None);
    }
}
