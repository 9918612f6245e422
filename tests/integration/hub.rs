//! Datasets named `hf://datasets/OWNER/NAME[@REVISION][/PATH_OR_GLOB]`, read from a Hugging Face cache
//! built here in huggingface_hub's layout (blobs/, snapshots/COMMIT/ links into them, refs/), offline:
//! nothing touches the network. The download path (one call into hf-hub) cannot be tested without it.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use polars::prelude::*;
use serde_json::Value;

use crate::common::*;

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2";

/// A hub cache folder as huggingface_hub writes it.
struct HubCache {
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl HubCache {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            root: dir.path().join("hub"),
            _dir: dir,
        }
    }

    /// The same cache, moved to another folder.
    fn moved(self) -> Self {
        let to = Self::new();
        std::fs::rename(&self.root, &to.root).unwrap();
        to
    }

    fn path(&self) -> &Path {
        &self.root
    }

    fn repo(&self, repo: &str) -> PathBuf {
        self.path()
            .join(format!("datasets--{}", repo.replace('/', "--")))
    }

    /// `bytes` as `path` of `commit`: a blob named by its hash, and a relative link to it in the snapshot.
    fn put(&self, repo: &str, commit: &str, path: &str, bytes: &[u8]) {
        let repo = self.repo(repo);
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let blob = format!("{:064x}", h.finish());
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs").join(&blob), bytes).unwrap();
        let link = repo.join("snapshots").join(commit).join(path);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(path.split('/').count() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{blob}"), &link).unwrap();
    }

    /// refs/REFERENCE holding `commit` (`refs/refs/convert/parquet` for the Parquet conversion).
    fn set_ref(&self, repo: &str, reference: &str, commit: &str) {
        let path = self.repo(repo).join("refs").join(reference);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
    }
}

/// armorm in `cwd`, offline, with `HF_HUB_CACHE` at `cache` (or `HF_HOME` above it when `home`).
fn run_in(cache: &Path, cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_armorm"));
    cmd.args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache)
        .stdin(Stdio::null());
    for var in [
        "HF_HOME",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
        "HF_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `armorm score NAME --model tiny -o -` from `cache`: the rows scored.
fn score_hub(cache: &Path, cwd: &Path, name: &str) -> Vec<Scored> {
    let model = model_dir(TINY);
    let out = run_in(
        cache,
        cwd,
        &[
            "score",
            name,
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "-o",
            "-",
            "-q",
        ],
    );
    parse_jsonl(&ok(&out))
}

fn ids(rows: &[Scored]) -> Vec<&str> {
    rows.iter().map(|r| r.id.as_str()).collect()
}

/// The lines of the fixture conversations.
fn conversation_lines() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("conversations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| format!("{l}\n"))
        .collect()
}

fn parquet_bytes(mut frame: DataFrame) -> Vec<u8> {
    let mut bytes = Vec::new();
    ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
    bytes
}

/// The `id` column of string ids.
fn string_ids(frame: &DataFrame) -> Vec<String> {
    let ids = frame.column("id").unwrap().str().unwrap().clone();
    (0..ids.len())
        .map(|i| ids.get(i).unwrap().to_string())
        .collect()
}

#[test]
fn a_glob_reads_two_shards_in_name_order_as_one_dataset() {
    let cache = HubCache::new();
    let lines = conversation_lines();
    let (first, second) = lines.split_at(15);
    // Written second shard first: the order is the names', not the folder's.
    cache.put(
        "fx/convs",
        A,
        "data/train-00001-of-00002.jsonl",
        second.concat().as_bytes(),
    );
    cache.put(
        "fx/convs",
        A,
        "data/train-00000-of-00002.jsonl",
        first.concat().as_bytes(),
    );
    cache.put(
        "fx/convs",
        A,
        "data/test-00000-of-00001.jsonl",
        first[0].as_bytes(),
    );
    cache.set_ref("fx/convs", "main", A);
    let cwd = tempfile::tempdir().unwrap();

    let got = score_hub(
        cache.path(),
        cwd.path(),
        "hf://datasets/fx/convs/data/train-*.jsonl",
    );
    let want = score_jsonl(&fixtures().join("conversations.jsonl"), TINY, &["-q"]);
    assert_eq!(ids(&got), ids(&want));
    for (g, w) in got.iter().zip(&want) {
        assert_close(g, w, 1e-5);
    }
    // And against transformers' numbers, not only armorm's own.
    let golden = goldens(TINY);
    for g in &got {
        assert_close(g, &golden_as_scored(&g.id, &golden[&g.id]), 1e-4);
    }
}

#[test]
fn a_revision_is_a_branch_a_tag_or_a_commit() {
    let cache = HubCache::new();
    let lines = conversation_lines();
    cache.put(
        "fx/versions",
        A,
        "data.jsonl",
        lines[..3].concat().as_bytes(),
    );
    cache.put(
        "fx/versions",
        B,
        "data.jsonl",
        lines[3..5].concat().as_bytes(),
    );
    cache.set_ref("fx/versions", "main", B);
    cache.set_ref("fx/versions", "v1", A);
    let cwd = tempfile::tempdir().unwrap();
    let at = |name: &str| -> Vec<String> {
        score_hub(cache.path(), cwd.path(), name)
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    let (old, new) = (["plain", "short", "math"], ["whitespace", "unicode"]);
    assert_eq!(at("hf://datasets/fx/versions/data.jsonl"), new);
    assert_eq!(at("hf://datasets/fx/versions@main/data.jsonl"), new);
    assert_eq!(at("hf://datasets/fx/versions@v1/data.jsonl"), old);
    assert_eq!(
        at(&format!("hf://datasets/fx/versions@{A}/data.jsonl")),
        old
    );

    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set, as in huggingface_hub.
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(cache.path(), home.path().join("hub")).unwrap();
    let model = model_dir(TINY);
    let out = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args([
            "score",
            "hf://datasets/fx/versions@v1/data.jsonl",
            "-o",
            "-",
            "-q",
        ])
        .args(["--model", model.to_str().unwrap(), "--device", "cpu"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(ids(&parse_jsonl(&ok(&out))), old);
}

#[test]
fn offline_and_missing_is_an_error_naming_the_dataset_the_revision_and_the_file() {
    let cache = HubCache::new();
    cache.put(
        "fx/convs",
        A,
        "data/train.jsonl",
        conversation_lines()[0].as_bytes(),
    );
    cache.set_ref("fx/convs", "main", A);
    let cwd = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let fail = |name: &str| -> String {
        let out = run_in(
            cache.path(),
            cwd.path(),
            &["score", name, "--model", model.to_str().unwrap()],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    // A dataset that is not cached at all.
    let err = fail("hf://datasets/fx/absent/data/train.jsonl");
    assert!(
        err.contains("dataset fx/absent (revision main)")
            && err.contains("data/train.jsonl is not in the Hugging Face cache")
            && err.contains("HF_HUB_OFFLINE is set")
            && err.contains(cache.path().to_str().unwrap())
            && err.contains(
                "huggingface-cli download --repo-type dataset fx/absent data/train.jsonl"
            ),
        "{err}"
    );
    // A revision, a file and a glob that the cached dataset does not hold.
    let err = fail("hf://datasets/fx/convs@v9/data/train.jsonl");
    assert!(
        err.contains("dataset fx/convs (revision v9)") && err.contains("--revision v9"),
        "{err}"
    );
    let err = fail("hf://datasets/fx/convs/data/valid.jsonl");
    assert!(
        err.contains(&format!("dataset fx/convs (revision main, commit {A})"))
            && err.contains("data/valid.jsonl is not in the cached snapshot"),
        "{err}"
    );
    let err = fail("hf://datasets/fx/convs/data/*.parquet");
    assert!(
        err.contains("files matching data/*.parquet are not in the cached snapshot")
            && err.contains("--include 'data/*.parquet'"),
        "{err}"
    );
    // No path and no Parquet conversion cached.
    let err = fail("hf://datasets/fx/convs");
    assert!(
        err.contains("revision refs/convert/parquet") && err.contains("CONFIG/SPLIT/NNNN.parquet"),
        "{err}"
    );
    // Not a dataset name at all.
    let err = fail("hf://fx/convs/data/train.jsonl");
    assert!(err.contains("hf://datasets/OWNER/NAME"), "{err}");
    // Nothing was written: no default output, no parts.
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
}

/// The conversations as Parquet, split in `at` rows and the rest.
fn conversation_parquets(at: usize) -> (Vec<u8>, Vec<u8>) {
    let all = read_parquet(&fixtures().join("conversations.parquet"));
    let rest = all.height() - at;
    (
        parquet_bytes(all.slice(0, at)),
        parquet_bytes(all.slice(at as i64, rest)),
    )
}

#[test]
fn no_path_reads_the_default_split_of_the_parquet_conversion() {
    let cache = HubCache::new();
    let repo = "fx/conv";
    let (head, tail) = conversation_parquets(8);
    cache.put(repo, B, "default/train/0001.parquet", &tail);
    cache.put(repo, B, "default/train/0000.parquet", &head);
    cache.put(repo, B, "default/test/0000.parquet", &head);
    cache.set_ref(repo, "refs/convert/parquet", B);
    let cwd = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let out = run_in(
        cache.path(),
        cwd.path(),
        &[
            "score",
            "hf://datasets/fx/conv",
            "--model",
            model.to_str().unwrap(),
            "-q",
        ],
    );
    ok(&out);
    // Named after the dataset, in the current directory.
    let scored = read_parquet(&cwd.path().join("conv.scores.parquet"));
    let want = score_jsonl(&fixtures().join("conversations.parquet"), TINY, &["-q"]);
    let got = string_ids(&scored);
    assert_eq!(got, ids(&want));

    // A split by name, through the alias that polars and DuckDB use.
    let test = score_hub(
        cache.path(),
        cwd.path(),
        "hf://datasets/fx/conv@~parquet/default/test/*.parquet",
    );
    assert_eq!(ids(&test), ids(&want)[..8]);
}

/// RewardBench's own columns: the pairs of fixtures/pairs.jsonl given as strings, with an integer id.
fn rewardbench_frame() -> (DataFrame, Vec<String>) {
    let text = std::fs::read_to_string(fixtures().join("pairs.jsonl")).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["chosen"].is_string())
        .collect();
    let col = |k: &str| -> Vec<String> {
        rows.iter()
            .map(|v| v[k].as_str().unwrap().to_string())
            .collect()
    };
    let names = col("id");
    let ids: Vec<i64> = names.iter().map(|n| n[1..].parse().unwrap()).collect();
    let n = rows.len();
    let frame = df!(
        "prompt" => col("prompt"),
        "chosen" => col("chosen"),
        "chosen_model" => vec!["gpt-4"; n],
        "rejected" => col("rejected"),
        "rejected_model" => vec!["llama"; n],
        "subset" => col("subset"),
        "id" => ids,
    )
    .unwrap();
    (frame, names)
}

#[test]
fn eval_without_input_scores_rewardbench_filtered_split_as_it_is() {
    let cache = HubCache::new();
    let repo = "allenai/reward-bench";
    let (frame, names) = rewardbench_frame();
    cache.put(
        repo,
        A,
        "default/filtered/0000.parquet",
        &parquet_bytes(frame.clone()),
    );
    cache.put(
        repo,
        A,
        "default/raw/0000.parquet",
        &parquet_bytes(frame.slice(0, 2)),
    );
    cache.set_ref(repo, "refs/convert/parquet", A);
    let cwd = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let out = run_in(
        cache.path(),
        cwd.path(),
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--summary",
            "s.json",
            "-q",
        ],
    );
    let table = ok(&out);
    assert!(table.contains("accuracy"), "{table}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(cwd.path().join("s.json")).unwrap()).unwrap();
    assert_eq!(summary["overall"]["pairs"], names.len());

    // The per-pair rows, named after the dataset, keep RewardBench's columns (id and subset).
    let rows = read_parquet(&cwd.path().join("reward-bench.eval.parquet"));
    assert_eq!(rows.column("id").unwrap().dtype(), &DataType::Int64);
    let want_ids: Vec<i64> = frame
        .column("id")
        .unwrap()
        .i64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    let got_ids: Vec<i64> = rows
        .column("id")
        .unwrap()
        .i64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(got_ids, want_ids);
    assert!(rows
        .column("subset")
        .unwrap()
        .equals(frame.column("subset").unwrap()));
    assert!(rows.column("chosen_model").is_ok());
    // The scores are transformers' (goldens of fixtures/pairs.jsonl).
    let goldens = pair_goldens();
    let f32s = |c: &str| -> Vec<f32> {
        rows.column(c)
            .unwrap()
            .f32()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    let (chosen, rejected) = (f32s("score_chosen"), f32s("score_rejected"));
    let mut correct = 0;
    for (i, name) in names.iter().enumerate() {
        let (c, r) = goldens[name];
        assert!((chosen[i] - c).abs() < 1e-4, "{name}: {} vs {c}", chosen[i]);
        assert!(
            (rejected[i] - r).abs() < 1e-4,
            "{name}: {} vs {r}",
            rejected[i]
        );
        correct += (c > r) as usize;
    }
    assert_eq!(summary["overall"]["correct"], correct);
}

fn pair_goldens() -> std::collections::HashMap<String, (f32, f32)> {
    let text = std::fs::read_to_string(fixtures().join("goldens").join("tiny-armorm-pairs.jsonl"))
        .unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap() as f32;
            (
                v["id"].as_str().unwrap().to_string(),
                (f("score_chosen"), f("score_rejected")),
            )
        })
        .collect()
}

#[test]
fn shards_of_a_hub_dataset_default_to_a_folder_named_after_it() {
    let cache = HubCache::new();
    let lines = conversation_lines();
    cache.put(
        "fx/convs",
        A,
        "data/a.jsonl",
        lines[..15].concat().as_bytes(),
    );
    cache.put(
        "fx/convs",
        A,
        "data/b.jsonl",
        lines[15..].concat().as_bytes(),
    );
    cache.set_ref("fx/convs", "main", A);
    let cwd = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let all = conversation_ids();
    for k in 0..2 {
        let shard = format!("{k}/2");
        let out = run_in(
            cache.path(),
            cwd.path(),
            &[
                "score",
                "hf://datasets/fx/convs/data/*.jsonl",
                "--model",
                model.to_str().unwrap(),
                "--shard",
                &shard,
                "-q",
            ],
        );
        ok(&out);
        let part = read_parquet(
            &cwd.path()
                .join("convs.scores")
                .join(format!("part-{k}-of-2.parquet")),
        );
        let got = string_ids(&part);
        // Rows i with i mod 2 = k, counted over both files.
        let want: Vec<&str> = all.iter().skip(k).step_by(2).map(String::as_str).collect();
        assert_eq!(got, want);
    }
}

/// A run stopped by a bad row in the second file resumes once the row reads well (here the cache's
/// blob is repaired in place: the commit, which the checkpoint names, is unchanged), even with the
/// cache moved; once the branch names another commit, resuming is refused.
#[test]
fn resume_continues_the_same_commit_and_refuses_another() {
    let cache = HubCache::new();
    let lines = conversation_lines();
    // The same keys in every line (files must have the same columns), and the same size once repaired.
    let bad = "{\"id\": \"late\", \"prompt\": \"Hi\", \"response\": null}\n";
    let second = format!("{}{bad}", lines[15..].concat());
    cache.put(
        "fx/resume",
        A,
        "data/0.jsonl",
        lines[..15].concat().as_bytes(),
    );
    cache.put("fx/resume", A, "data/1.jsonl", second.as_bytes());
    cache.set_ref("fx/resume", "main", A);
    let cwd = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "score",
            "hf://datasets/fx/resume/data/*.jsonl",
            "--model",
            model.to_str().unwrap(),
            "--window-rows",
            "4",
            "-o",
            "out.parquet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |cache_dir: &Path, extra: &[&'static str]| {
        let a = args(extra);
        run_in(
            cache_dir,
            cwd.path(),
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let out = run(cache.path(), &["-q"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "hf://datasets/fx/resume@main/data/1.jsonl (commit {A}): line 8: field `response`"
        )) && err.contains("--resume"),
        "{err}"
    );
    assert!(!cwd.path().join("out.parquet").exists());

    // The blob behind data/1.jsonl, repaired to the same size; then the whole cache moved elsewhere.
    let blob = |cache: &HubCache| {
        let link = cache
            .repo("fx/resume")
            .join("snapshots")
            .join(A)
            .join("data/1.jsonl");
        link.canonicalize().unwrap()
    };
    let repaired = second.replace("null", "\"ok\"");
    assert_eq!(repaired.len(), second.len());
    std::fs::write(blob(&cache), &repaired).unwrap();
    let cache = cache.moved();

    let out = run(cache.path(), &["--resume"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("resuming after"), "{err}");
    let scored = read_parquet(&cwd.path().join("out.parquet"));
    let mut want = conversation_ids();
    want.push("late".into());
    let got = string_ids(&scored);
    assert_eq!(got, want);

    // Stopped again; then main moves to a new commit with the repaired data: the parts are the old one's.
    std::fs::write(blob(&cache), &second).unwrap();
    std::fs::remove_file(cwd.path().join("out.parquet")).unwrap();
    assert_eq!(run(cache.path(), &["-q"]).status.code(), Some(1));
    cache.put(
        "fx/resume",
        B,
        "data/0.jsonl",
        lines[..15].concat().as_bytes(),
    );
    cache.put("fx/resume", B, "data/1.jsonl", repaired.as_bytes());
    cache.set_ref("fx/resume", "main", B);
    let out = run(cache.path(), &["--resume"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot resume") && err.contains("`inputs` differs"),
        "{err}"
    );
}

fn conversation_ids() -> Vec<String> {
    conversation_lines()
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn filter_reads_scored_files_from_the_hub() {
    let cache = HubCache::new();
    let local = tempfile::tempdir().unwrap();
    let scored = local.path().join("scored.parquet");
    let model = model_dir(TINY);
    ok(&armorm(&[
        "score",
        fixtures().join("conversations.jsonl").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        scored.to_str().unwrap(),
        "-q",
    ]));
    cache.put(
        "fx/scores",
        A,
        "scored.parquet",
        &std::fs::read(&scored).unwrap(),
    );
    cache.set_ref("fx/scores", "main", A);
    let cwd = tempfile::tempdir().unwrap();
    let filter = |input: &str| -> String {
        ok(&run_in(
            cache.path(),
            cwd.path(),
            &["filter", input, "--top-fraction", "0.5", "-o", "-"],
        ))
    };
    let from_hub = filter("hf://datasets/fx/scores/scored.parquet");
    assert_eq!(from_hub.lines().count(), 11);
    assert_eq!(from_hub, filter(scored.to_str().unwrap()));
}

/// The commands after scoring that read whole scored files take hub names too: `rescore` (as the local
/// file gives) and `verify` (one file; a glob over several is refused).
#[test]
fn rescore_and_verify_read_scored_files_from_the_hub() {
    let cache = HubCache::new();
    let local = tempfile::tempdir().unwrap();
    let scored = local.path().join("scored.parquet");
    let model = model_dir(TINY);
    ok(&armorm(&[
        "score",
        fixtures().join("conversations.parquet").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        scored.to_str().unwrap(),
        "-q",
    ]));
    let bytes = std::fs::read(&scored).unwrap();
    cache.put("fx/scores", A, "scored.parquet", &bytes);
    cache.put("fx/scores", A, "copy.parquet", &bytes);
    cache.set_ref("fx/scores", "main", A);
    let cwd = tempfile::tempdir().unwrap();
    let rescore = |input: &str| -> String {
        let args = [
            "rescore",
            input,
            "--objectives",
            "helpsteer-correctness",
            "-o",
            "-",
        ];
        ok(&run_in(cache.path(), cwd.path(), &args))
    };
    let from_hub = rescore("hf://datasets/fx/scores/scored.parquet");
    assert_eq!(from_hub.lines().count(), 18);
    assert_eq!(from_hub, rescore(scored.to_str().unwrap()));

    let verify = |input: &str| run_in(cache.path(), cwd.path(), &["verify", input, "-q"]);
    let out = verify("hf://datasets/fx/scores/scored.parquet");
    let text = ok(&out);
    assert!(text.contains("hf://datasets/fx/scores"), "{text}");
    let out = verify("hf://datasets/fx/scores/*.parquet");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("names 2 files"), "{}", stderr(&out));
}
