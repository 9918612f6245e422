//! `hf://datasets/OWNER/NAME[@REVISION][/PATH_OR_GLOB]`, as huggingface_hub's file system, polars and
//! DuckDB name datasets, resolved to files of the hub cache (downloaded into it when missing).
//!
//! Offline (`HF_HUB_OFFLINE=1`), or when the hub cannot be reached, the cache alone answers: the
//! revision's snapshot (`refs/REVISION`, or a commit's own folder) and the files in it. Online, the hub
//! says which commit the revision is and which files it holds (one request); each file is then taken
//! from that commit's snapshot when cached, else downloaded by hf-hub. The download itself is one call
//! into hf-hub (`ApiRepo::download`), which the tests cannot reach (no network).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiRepo;
use hf_hub::{Repo, RepoType};

use super::select::{select, Miss, Selection};
use crate::input::InputFile;

pub const PREFIX: &str = "hf://datasets/";
/// The revision that holds the hub's Parquet conversion, `CONFIG/SPLIT/NNNN.parquet`.
pub const PARQUET_REVISION: &str = "refs/convert/parquet";
/// polars' and DuckDB's short name for it.
const PARQUET_ALIAS: &str = "~parquet";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{url}: {message}")]
    Url { url: String, message: String },
    #[error("dataset {repo} (revision {revision}{commit}): {message}")]
    Dataset {
        repo: String,
        revision: String,
        /// `, commit SHA` once the revision is resolved.
        commit: String,
        message: String,
    },
}

/// A parsed `hf://datasets/...` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetUrl {
    /// `OWNER/NAME`.
    pub repo: String,
    /// After `@`, URL-decoded, with `~parquet` spelled out.
    pub revision: Option<String>,
    /// A file or a glob; `None` for the default split of the Parquet conversion.
    pub path: Option<String>,
}

impl DatasetUrl {
    /// Any `hf://` name: it is a hub name, or refused as one, never opened as a local path.
    pub fn is_hub(name: &str) -> bool {
        name.starts_with("hf://")
    }

    pub fn parse(name: &str) -> Result<Self, HubError> {
        let bad = |message: &str| HubError::Url {
            url: name.to_string(),
            message: message.to_string(),
        };
        let rest = name.strip_prefix(PREFIX).ok_or_else(|| {
            bad("armorm reads datasets from the hub: expected hf://datasets/OWNER/NAME[@REVISION][/PATH]")
        })?;
        let (owner, rest) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected OWNER/NAME after hf://datasets/"))?;
        let end = rest.find(['@', '/']).unwrap_or(rest.len());
        let (repo_name, rest) = rest.split_at(end);
        if !is_repo_part(owner) || !is_repo_part(repo_name) {
            return Err(bad(
                "expected OWNER/NAME after hf://datasets/ (letters, digits, `-`, `_` and `.`)",
            ));
        }
        let (revision, path) = match rest.strip_prefix('@') {
            Some(r) => {
                let (revision, path) = split_revision(r);
                let revision =
                    percent_decode(revision).ok_or_else(|| bad("bad %-escape in the revision"))?;
                if revision.is_empty() {
                    return Err(bad("empty revision after @"));
                }
                let revision = match revision.as_str() {
                    PARQUET_ALIAS => PARQUET_REVISION.to_string(),
                    _ => revision,
                };
                (Some(revision), path)
            }
            None => (None, rest.strip_prefix('/').unwrap_or(rest)),
        };
        let path = path.trim_end_matches('/');
        if path
            .split('/')
            .any(|c| c == "." || c == ".." || (c.is_empty() && !path.is_empty()))
        {
            return Err(bad(
                "the path must stay inside the repo (no `.`, `..` or empty parts)",
            ));
        }
        Ok(Self {
            repo: format!("{owner}/{repo_name}"),
            revision,
            path: (!path.is_empty()).then(|| path.to_string()),
        })
    }

    /// NAME: default outputs are named after it.
    pub fn name(&self) -> &str {
        self.repo.rsplit('/').next().unwrap_or(&self.repo)
    }

    /// The revision asked for, else the Parquet conversion for the default split (no path), else `main`.
    pub fn effective_revision(&self) -> &str {
        match (&self.revision, &self.path) {
            (Some(r), _) => r,
            (None, None) => PARQUET_REVISION,
            (None, Some(_)) => "main",
        }
    }
}

/// A part of a repo id.
fn is_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The revision and the path after `@`: special refs that hold `/` (`refs/convert/NAME`, `refs/pr/N`)
/// are taken whole, as huggingface_hub's file system does; any other revision ends at the first `/`
/// (write `%2F` for a `/` inside it).
fn split_revision(r: &str) -> (&str, &str) {
    let special = |prefix: &str, ok: fn(u8) -> bool| -> Option<usize> {
        let tail = r.strip_prefix(prefix)?;
        let n = tail.bytes().take_while(|b| ok(*b)).count();
        let next = tail.as_bytes().get(n);
        (n > 0 && next.is_none_or(|b| *b == b'/')).then_some(prefix.len() + n)
    };
    let end = special("refs/convert/", |b| {
        b.is_ascii_alphanumeric() || b"_.-".contains(&b)
    })
    .or_else(|| special("refs/pr/", |b| b.is_ascii_digit()))
    .unwrap_or_else(|| r.find('/').unwrap_or(r.len()));
    let (revision, path) = r.split_at(end);
    (revision, path.strip_prefix('/').unwrap_or(path))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One file of a resolved dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    /// Its path in the repo.
    pub path: String,
    /// Where it is in the cache (a snapshot's link into `blobs/`).
    pub local: PathBuf,
}

/// A name resolved to a commit and the files it means there, in order.
#[derive(Debug, Clone)]
pub struct HubDataset {
    pub url: DatasetUrl,
    pub revision: String,
    pub commit: String,
    pub files: Vec<HubFile>,
    /// For stderr: the hub could not be reached and the cache answered instead.
    pub notice: Option<String>,
}

impl HubDataset {
    /// How errors name a file: its name at the revision asked for, and the commit it resolved to.
    pub fn label(&self, file: &HubFile) -> String {
        let name = format!("{PREFIX}{}@{}/{}", self.url.repo, self.revision, file.path);
        match self.revision == self.commit {
            true => name,
            false => format!("{name} (commit {})", self.commit),
        }
    }

    /// Its name at the resolved commit: what a resumed run must match, wherever the cache is.
    pub fn pinned(&self, file: &HubFile) -> String {
        format!("{PREFIX}{}@{}/{}", self.url.repo, self.commit, file.path)
    }

    /// The files as the readers take them.
    pub fn input_files(&self) -> Vec<InputFile> {
        self.files
            .iter()
            .map(|f| InputFile {
                path: f.local.display().to_string(),
                label: self.label(f),
                pinned: Some(self.pinned(f)),
            })
            .collect()
    }
}

/// Where a resolution looks, and how its errors read.
struct Lookup<'a> {
    url: &'a DatasetUrl,
    revision: String,
    cache: PathBuf,
    repo_dir: PathBuf,
}

impl Lookup<'_> {
    fn err(&self, commit: Option<&str>, message: String) -> HubError {
        HubError::Dataset {
            repo: self.url.repo.clone(),
            revision: self.revision.clone(),
            commit: commit.map(|c| format!(", commit {c}")).unwrap_or_default(),
            message,
        }
    }

    /// `hf://datasets/OWNER/NAME@REVISION/`, for suggestions.
    fn base(&self) -> String {
        format!("{PREFIX}{}@{}/", self.url.repo, self.revision)
    }

    /// What is missing, as the subject of "... not in ...".
    fn missing(&self) -> String {
        match Selection::of(self.url.path.as_deref()) {
            Selection::File(p) => format!("{p} is"),
            Selection::Glob(g) => format!("files matching {g} are"),
            Selection::DefaultSplit => {
                "the Parquet conversion's files (CONFIG/SPLIT/NNNN.parquet) are".to_string()
            }
        }
    }

    /// The command that puts what is missing into a cache.
    fn download_hint(&self) -> String {
        let mut cmd = format!(
            "huggingface-cli download --repo-type dataset {}",
            self.url.repo
        );
        match Selection::of(self.url.path.as_deref()) {
            Selection::File(p) => cmd.push_str(&format!(" {p}")),
            Selection::Glob(g) => cmd.push_str(&format!(" --include '{g}'")),
            Selection::DefaultSplit => {}
        }
        if self.revision != "main" {
            cmd.push_str(&format!(" --revision {}", self.revision));
        }
        let own = match Selection::of(self.url.path.as_deref()) {
            Selection::DefaultSplit => format!(
                ", or name the repo's own files (as in {PREFIX}{}/data/*.parquet)",
                self.url.repo
            ),
            _ => String::new(),
        };
        format!(
            "download it where there is network (`{cmd}`) and copy the cache here, or set \
             HF_HUB_CACHE to a cache that holds it{own}"
        )
    }

    /// The files from the cache alone; `why` says why the hub was not asked.
    fn in_cache(&self, why: &str, notice: Option<String>) -> Result<HubDataset, HubError> {
        let folder = self.repo_dir.display();
        let Some((commit, snapshot)) = super::cached_commit(&self.repo_dir, &self.revision) else {
            return Err(self.err(
                None,
                format!(
                    "{} not in the Hugging Face cache at {}: no snapshot of this revision under \
                     {folder} ({why}); {}",
                    self.missing(),
                    self.cache.display(),
                    self.download_hint()
                ),
            ));
        };
        let tree = list_tree(&snapshot);
        let selection = Selection::of(self.url.path.as_deref());
        let paths = select(selection, &tree, &self.base()).map_err(|miss| match miss {
            Miss::Refused(m) => self.err(Some(&commit), m),
            Miss::Missing => self.err(
                Some(&commit),
                format!(
                    "{} not in the cached snapshot {} ({why}); {}",
                    self.missing(),
                    snapshot.display(),
                    self.download_hint()
                ),
            ),
        })?;
        self.dataset(commit, paths, |p| Ok(snapshot.join(p)), notice)
    }

    /// The hub's listing of the revision, and each file from the cache or downloaded.
    fn on_hub(&self, api: &ApiRepo) -> Result<HubDataset, HubError> {
        let info = match api.info() {
            Ok(info) => info,
            // huggingface_hub also falls back to the cache when the hub cannot answer.
            Err(e) => {
                let why = format!("the hub could not be asked: {e}");
                return self.in_cache(&why, Some(format!("{why}; using the cached snapshot")));
            }
        };
        let tree: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let selection = Selection::of(self.url.path.as_deref());
        let paths = select(selection, &tree, &self.base()).map_err(|miss| match miss {
            Miss::Refused(m) => self.err(Some(&info.sha), m),
            Miss::Missing => self.err(
                Some(&info.sha),
                format!("{} not in this revision on the hub", self.missing()),
            ),
        })?;
        let snapshot = self.repo_dir.join("snapshots").join(&info.sha);
        let fetch = |path: &str| -> Result<PathBuf, HubError> {
            let cached = snapshot.join(path);
            if cached.is_file() {
                return Ok(cached);
            }
            let got = api
                .download(path)
                .map_err(|e| self.err(Some(&info.sha), format!("downloading {path}: {e}")))?;
            // A branch that moved between the listing and the download gave another commit's file.
            match got.starts_with(&snapshot) {
                true => Ok(got),
                false => Err(self.err(
                    Some(&info.sha),
                    format!("the revision moved to another commit while {path} was downloaded; run again, or name a commit"),
                )),
            }
        };
        self.dataset(info.sha.clone(), paths, fetch, None)
    }

    fn dataset(
        &self,
        commit: String,
        paths: Vec<String>,
        fetch: impl Fn(&str) -> Result<PathBuf, HubError>,
        notice: Option<String>,
    ) -> Result<HubDataset, HubError> {
        let files = paths
            .into_iter()
            .map(|path| {
                let local = fetch(&path)?;
                Ok(HubFile { path, local })
            })
            .collect::<Result<Vec<_>, HubError>>()?;
        Ok(HubDataset {
            url: self.url.clone(),
            revision: self.revision.clone(),
            commit,
            files,
            notice,
        })
    }
}

/// Every file under `snapshot` (links followed), as repo paths in name order; a link whose blob is gone
/// is not a file.
fn list_tree(snapshot: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let rel = format!("{prefix}{name}");
            if path.is_dir() {
                walk(&path, &format!("{rel}/"), out);
            } else if path.is_file() {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(snapshot, "", &mut out);
    out.sort();
    out
}

/// The files `url` names, from the hub cache, downloaded into it when missing (unless offline);
/// `progress` draws a bar per download.
pub fn resolve_dataset(url: &DatasetUrl, progress: bool) -> Result<HubDataset, HubError> {
    let revision = url.effective_revision().to_string();
    let repo = Repo::with_revision(url.repo.clone(), RepoType::Dataset, revision.clone());
    let cache = super::cache_dir();
    let lookup = Lookup {
        url,
        repo_dir: cache.join(repo.folder_name()),
        revision,
        cache,
    };
    if super::offline() {
        return lookup.in_cache("HF_HUB_OFFLINE is set", None);
    }
    let api = super::api(&lookup.cache, progress)
        .map_err(|e| lookup.err(None, format!("starting the hub client: {e}")))?;
    lookup.on_hub(&api.repo(repo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> DatasetUrl {
        DatasetUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn url(repo: &str, revision: Option<&str>, path: Option<&str>) -> DatasetUrl {
        DatasetUrl {
            repo: repo.into(),
            revision: revision.map(Into::into),
            path: path.map(Into::into),
        }
    }

    #[test]
    fn names_parse_as_huggingface_hub_reads_them() {
        assert_eq!(
            parse("hf://datasets/allenai/reward-bench"),
            url("allenai/reward-bench", None, None)
        );
        assert_eq!(
            parse("hf://datasets/o/n/data/train-*.parquet"),
            url("o/n", None, Some("data/train-*.parquet"))
        );
        assert_eq!(
            parse("hf://datasets/o/n@v1.0/a.jsonl"),
            url("o/n", Some("v1.0"), Some("a.jsonl"))
        );
        assert_eq!(
            parse("hf://datasets/o/n@dev/"),
            url("o/n", Some("dev"), None)
        );
        // Special refs hold `/`; `~parquet` and `%2F` spell them too.
        let conv = url(
            "o/n",
            Some(PARQUET_REVISION),
            Some("default/train/0000.parquet"),
        );
        assert_eq!(
            parse("hf://datasets/o/n@refs/convert/parquet/default/train/0000.parquet"),
            conv
        );
        assert_eq!(
            parse("hf://datasets/o/n@~parquet/default/train/0000.parquet"),
            conv
        );
        assert_eq!(
            parse("hf://datasets/o/n@refs%2Fconvert%2Fparquet/default/train/0000.parquet"),
            conv
        );
        assert_eq!(
            parse("hf://datasets/o/n@refs/pr/12"),
            url("o/n", Some("refs/pr/12"), None)
        );
        // Any other ref ends at the first `/`.
        assert_eq!(
            parse("hf://datasets/o/n@refs/heads/x"),
            url("o/n", Some("refs"), Some("heads/x"))
        );
    }

    #[test]
    fn bad_names_are_refused_before_any_lookup() {
        for bad in [
            "hf://RLHFlow/ArmoRM-Llama3-8B-v0.1",
            "hf://models/o/n",
            "hf://datasets/squad",
            "hf://datasets//n",
            "hf://datasets/o/n@",
            "hf://datasets/o/n@%zz",
            "hf://datasets/o/n/../x",
            "hf://datasets/o/n/a//b",
            "hf://datasets/o w/n",
        ] {
            assert!(DatasetUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_revision_depends_on_the_path() {
        assert_eq!(
            parse("hf://datasets/o/n").effective_revision(),
            PARQUET_REVISION
        );
        assert_eq!(
            parse("hf://datasets/o/n/x.jsonl").effective_revision(),
            "main"
        );
        assert_eq!(parse("hf://datasets/o/n@v2").effective_revision(), "v2");
        assert_eq!(parse("hf://datasets/o/n").name(), "n");
    }

    #[test]
    fn labels_name_the_revision_and_the_commit() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let mut d = HubDataset {
            url: parse("hf://datasets/o/n/data/*.jsonl"),
            revision: "main".into(),
            commit: commit.into(),
            files: vec![],
            notice: None,
        };
        let f = HubFile {
            path: "data/a.jsonl".into(),
            local: PathBuf::from("/c/a"),
        };
        assert_eq!(
            d.label(&f),
            format!("hf://datasets/o/n@main/data/a.jsonl (commit {commit})")
        );
        assert_eq!(
            d.pinned(&f),
            format!("hf://datasets/o/n@{commit}/data/a.jsonl")
        );
        d.revision = commit.into();
        assert_eq!(d.label(&f), d.pinned(&f));
    }
}
