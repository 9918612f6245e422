//! What a scored file records so that it can be trusted later: the model's identity (hub commit, a
//! hash of its config and weight headers), the chat template's hash, armorm's version, the device and
//! dtype, and per row a hash of the token ids the model saw (`input_hash`).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::loader::ModelFiles;

/// The Parquet key-value metadata keys armorm writes (besides `armorm.attributes`).
pub const MODEL: &str = "armorm.model";
pub const REVISION: &str = "armorm.revision";
pub const COMMIT: &str = "armorm.commit";
pub const MODEL_HASH: &str = "armorm.model_hash";
pub const TEMPLATE_HASH: &str = "armorm.template_hash";
pub const VERSION: &str = "armorm.version";
pub const DEVICE: &str = "armorm.device";
pub const DTYPE: &str = "armorm.dtype";
pub const MAX_LENGTH: &str = "armorm.max_length";
pub const ATTENTION: &str = "armorm.attention";

/// A safetensors header is JSON of a few hundred KB; the format itself caps it at 100 MB, so a larger
/// length means the file is not safetensors.
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ProvenanceError {
    pub path: String,
    pub message: String,
}

fn err(path: &Path, message: impl ToString) -> ProvenanceError {
    ProvenanceError {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Lowercase hex of the sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A row's `input_hash`: the first 16 hex digits (64 bits) of the sha256 of its token ids as
/// little-endian u32, the exact sequence the model scored (after any truncation).
pub fn input_hash(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    let mut text = hex(&h.finalize());
    text.truncate(16);
    text
}

/// The bytes of a safetensors file that describe its tensors: the 8-byte little-endian length and the
/// JSON header it announces (names, dtypes, shapes and offsets), not the multi-GB data after them.
pub fn safetensors_header(path: &Path) -> Result<Vec<u8>, ProvenanceError> {
    let mut file = File::open(path).map_err(|e| err(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(err(
            path,
            format!("not a safetensors file: header length {n} is over 100 MB"),
        ));
    }
    let mut bytes = len.to_vec();
    file.take(n)
        .read_to_end(&mut bytes)
        .map_err(|e| err(path, e))?;
    if bytes.len() as u64 != 8 + n {
        return Err(err(
            path,
            format!("not a safetensors file: its header of {n} bytes is cut short"),
        ));
    }
    Ok(bytes)
}

/// `armorm.model_hash`: sha256 over `config.json` and each weight file's safetensors header, each
/// preceded by its file name and a NUL, the weight files in the loader's order (sorted by name). It
/// changes with the architecture, the tensor names, dtypes and shapes, and the layout of the weights;
/// it is cheap to compute (the tensor data is not read), so it is a fingerprint, not a checksum of
/// every weight: a hub model is identified by its commit as well.
pub fn model_hash(files: &ModelFiles) -> Result<String, ProvenanceError> {
    let config = files.dir.join("config.json");
    let mut h = Sha256::new();
    h.update(b"config.json\0");
    h.update(std::fs::read(&config).map_err(|e| err(&config, e))?);
    for weights in &files.weights {
        let name = weights
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(safetensors_header(weights)?);
    }
    Ok(hex(&h.finalize()))
}

/// A model run's provenance, as written to (and read back from) a scored file's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Provenance {
    /// `--model` as given: a repo id or a directory.
    pub model: String,
    /// `--revision` as given (empty for a directory, `main` by default for a repo).
    pub revision: String,
    /// The hub commit that revision resolved to (empty for a directory).
    pub commit: String,
    pub model_hash: String,
    pub template_hash: String,
    pub version: String,
    /// `cpu`, `cuda:0`, or a list `cuda:0,cuda:1`.
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// The `--max-length` the rows were encoded under.
    pub max_length: String,
    /// How attention was computed: `blocked` or `flash` (bf16 scores differ between them by rounding).
    pub attention: String,
}

impl Provenance {
    /// As Parquet key-value pairs.
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        [
            (MODEL, &self.model),
            (REVISION, &self.revision),
            (COMMIT, &self.commit),
            (MODEL_HASH, &self.model_hash),
            (TEMPLATE_HASH, &self.template_hash),
            (VERSION, &self.version),
            (DEVICE, &self.device),
            (DTYPE, &self.dtype),
            (MAX_LENGTH, &self.max_length),
            (ATTENTION, &self.attention),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
    }

    /// From a file's key-value metadata; a key it lacks (an older armorm) reads as empty.
    pub fn from_metadata(kv: &HashMap<String, String>) -> Self {
        let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
        Self {
            model: get(MODEL),
            revision: get(REVISION),
            commit: get(COMMIT),
            model_hash: get(MODEL_HASH),
            template_hash: get(TEMPLATE_HASH),
            version: get(VERSION),
            device: get(DEVICE),
            dtype: get(DTYPE),
            max_length: get(MAX_LENGTH),
            attention: get(ATTENTION),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn input_hash_is_the_sha256_prefix_of_little_endian_ids() {
        // sha256 of the empty string, and of the bytes 01 00 00 00 02 00 00 00 (`printf` + sha256sum).
        assert_eq!(input_hash(&[]), "e3b0c44298fc1c14");
        assert_eq!(
            input_hash(&[1, 2]),
            sha256_hex(&[1, 0, 0, 0, 2, 0, 0, 0])[..16]
        );
        assert_eq!(input_hash(&[1, 2]), "34fb5c825de7ca4a");
        assert_ne!(input_hash(&[1, 2]), input_hash(&[2, 1]));
    }

    fn safetensors(path: &Path, header: &str, data: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
    }

    #[test]
    fn model_hash_covers_config_and_headers_but_not_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        safetensors(&d.join("a.safetensors"), header, &[0, 0, 128, 63]);
        let files = ModelFiles {
            dir: d.to_path_buf(),
            weights: vec![d.join("a.safetensors")],
            name: "m".into(),
            revision: None,
            commit: None,
        };
        // Built by hand from the documented layout.
        let mut want = b"config.json\0{}a.safetensors\0".to_vec();
        want.extend((header.len() as u64).to_le_bytes());
        want.extend(header.as_bytes());
        let first = model_hash(&files).unwrap();
        assert_eq!(first, sha256_hex(&want));
        // Other weights, same header: the same hash.
        safetensors(&d.join("a.safetensors"), header, &[0, 0, 0, 64]);
        assert_eq!(model_hash(&files).unwrap(), first);
        // Another shape or another config: another hash.
        let other = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        safetensors(&d.join("a.safetensors"), other, &[0; 8]);
        let second = model_hash(&files).unwrap();
        assert_ne!(second, first);
        std::fs::write(d.join("config.json"), "{ }").unwrap();
        assert_ne!(model_hash(&files).unwrap(), second);
    }

    #[test]
    fn a_file_that_is_not_safetensors_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, [255u8; 12]).unwrap();
        let e = safetensors_header(&p).unwrap_err();
        assert!(e.to_string().contains("x.safetensors"), "{e}");
        std::fs::write(&p, [10, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        assert!(safetensors_header(&p)
            .unwrap_err()
            .to_string()
            .contains("cut short"));
    }

    #[test]
    fn metadata_round_trips_and_missing_keys_read_empty() {
        let p = Provenance {
            model: "m".into(),
            dtype: "bf16".into(),
            ..Default::default()
        };
        let kv: HashMap<String, String> = p.to_metadata().into_iter().collect();
        assert_eq!(Provenance::from_metadata(&kv), p);
        assert_eq!(
            Provenance::from_metadata(&HashMap::new()),
            Provenance::default()
        );
    }
}
