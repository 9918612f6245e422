//! The Hugging Face hub cache as huggingface_hub lays it out, shared by the model loader and hub datasets.
//!
//! Here: where the cache is (`HF_HUB_CACHE`, `HF_HOME`), the token, `HF_HUB_OFFLINE`, a revision's
//! snapshot under `refs/` and `snapshots/`, and the hf-hub client that downloads into the cache.
//! Beside it: `dataset.rs` (`hf://datasets/...` names resolved to files) and `select.rs` (which files of
//! a snapshot such a name means).

mod dataset;
mod select;

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::Cache;

pub use dataset::{resolve_dataset, DatasetUrl, HubDataset, HubError, HubFile, PARQUET_REVISION};
pub use select::{select, Miss, Selection};

/// Set and non-empty.
fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `HF_HOME` as huggingface_hub finds it: the variable, else `$XDG_CACHE_HOME/huggingface`, else
/// `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    env_path("HF_HOME").unwrap_or_else(|| {
        env_path("XDG_CACHE_HOME")
            .or_else(|| env_path("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("huggingface")
    })
}

/// The hub cache as huggingface_hub finds it: `HF_HUB_CACHE`, else the legacy `HUGGINGFACE_HUB_CACHE`,
/// else `$HF_HOME/hub`.
pub fn cache_dir() -> PathBuf {
    env_path("HF_HUB_CACHE")
        .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// `HF_TOKEN`, else the file `huggingface-cli login` writes (`HF_TOKEN_PATH`, default `$HF_HOME/token`).
fn token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        return Some(t);
    }
    let path = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home().join("token"));
    let token = std::fs::read_to_string(path).ok()?;
    Some(token.trim().to_string()).filter(|t| !t.is_empty())
}

/// `HF_HUB_OFFLINE=1` (or `true`): nothing but the cache is read.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A full commit sha, which names its snapshot directly.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit that `revision` names in a repo's cache folder (`models--OWNER--NAME`,
/// `datasets--OWNER--NAME`), and its snapshot folder, when that snapshot is cached: a branch or tag is
/// resolved through `refs/REVISION` (`refs/refs/convert/parquet` for the Parquet conversion, as
/// huggingface_hub writes it), a commit names its snapshot directly.
pub fn cached_commit(repo_dir: &Path, revision: &str) -> Option<(String, PathBuf)> {
    // A revision is a path below refs/ or snapshots/; it must not climb out of them.
    if revision.is_empty()
        || revision.starts_with('/')
        || revision
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty())
    {
        return None;
    }
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    if commit.contains('/') || commit.contains("..") || commit.is_empty() {
        return None;
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    snapshot.is_dir().then_some((commit, snapshot))
}

/// The snapshot folder of `revision`, when cached (see `cached_commit`).
pub fn cached_snapshot(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    cached_commit(repo_dir, revision).map(|(_, snapshot)| snapshot)
}

/// The hf-hub client over the cache at `cache`, with the user's token; `progress` draws a bar per
/// download.
pub fn api(cache: &Path, progress: bool) -> Result<Api, ApiError> {
    ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(progress)
        .with_token(token())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_found_by_ref_or_by_commit_and_never_outside() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(repo.join("refs").join("refs").join("convert")).unwrap();
        // huggingface_hub writes the commit without a newline; an editor may add one.
        std::fs::write(repo.join("refs").join("main"), format!("{commit}\n")).unwrap();
        std::fs::write(
            repo.join("refs")
                .join("refs")
                .join("convert")
                .join("parquet"),
            commit,
        )
        .unwrap();
        let want = Some(repo.join("snapshots").join(commit));
        assert_eq!(cached_snapshot(repo, "main"), want);
        assert_eq!(cached_snapshot(repo, PARQUET_REVISION), want);
        assert_eq!(cached_snapshot(repo, commit), want);
        assert_eq!(
            cached_commit(repo, "main").map(|c| c.0),
            Some(commit.to_string())
        );
        assert_eq!(cached_snapshot(repo, "v2"), None);
        assert_eq!(cached_snapshot(repo, "../snapshots"), None);
        assert_eq!(cached_snapshot(repo, "refs//x"), None);
        assert_eq!(cached_snapshot(repo, ""), None);
        // A ref whose content would climb out of snapshots/ names nothing.
        std::fs::write(repo.join("refs").join("bad"), "../../x").unwrap();
        assert_eq!(cached_snapshot(repo, "bad"), None);
    }

    #[test]
    fn a_commit_is_forty_hex_digits() {
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("main"));
        assert!(!is_commit("0123456789abcdef0123456789abcdef0123456"));
    }
}
