//! Which files of a revision an `hf://datasets/...` name means: an exact path, a glob's matches in name
//! order, or, with no path, the default split of the hub's Parquet conversion.

use std::collections::BTreeMap;

use glob::{MatchOptions, Pattern};

/// What the path of a name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection<'a> {
    File(&'a str),
    /// `*`, `?` or `[...]` in the path, as fsspec's `has_magic`: `*` stays within a folder, `**` crosses
    /// folders.
    Glob(&'a str),
    /// No path: the Parquet conversion's layout, `CONFIG/SPLIT/NNNN.parquet`.
    DefaultSplit,
}

impl<'a> Selection<'a> {
    pub fn of(path: Option<&'a str>) -> Self {
        match path {
            None => Self::DefaultSplit,
            Some(p) if p.contains(['*', '?', '[']) => Self::Glob(p),
            Some(p) => Self::File(p),
        }
    }
}

/// Why a selection names no file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// Nothing there: not in the tree listed (which may be a partial cached snapshot).
    Missing,
    /// Something there, but not what a dataset name may mean; the message says what to name instead.
    Refused(String),
}

/// The paths of `tree` (every file of the revision, as repo paths) that `selection` names, in name
/// order. `base` is the name up to the path (`hf://datasets/OWNER/NAME@REVISION/`), for the
/// suggestions in refusals.
pub fn select(selection: Selection, tree: &[String], base: &str) -> Result<Vec<String>, Miss> {
    match selection {
        Selection::File(path) => {
            if tree.iter().any(|p| p == path) {
                return Ok(vec![path.to_string()]);
            }
            let folder = format!("{path}/");
            if tree.iter().any(|p| p.starts_with(&folder)) {
                return Err(Miss::Refused(format!(
                    "{path} is a folder: name its files with a glob, as in {base}{path}/*.parquet"
                )));
            }
            Err(Miss::Missing)
        }
        Selection::Glob(glob) => {
            let pattern = Pattern::new(glob)
                .map_err(|e| Miss::Refused(format!("{glob} is not a valid glob: {e}")))?;
            let options = MatchOptions {
                case_sensitive: true,
                require_literal_separator: true,
                require_literal_leading_dot: false,
            };
            let mut hits: Vec<String> = tree
                .iter()
                .filter(|p| pattern.matches_with(p, options))
                .cloned()
                .collect();
            hits.sort();
            match hits.is_empty() {
                true => Err(Miss::Missing),
                false => Ok(hits),
            }
        }
        Selection::DefaultSplit => default_split(tree, base),
    }
}

/// A file of the conversion: `NNNN.parquet`.
fn is_conversion_file(name: &str) -> bool {
    name.strip_suffix(".parquet")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The files of config `default` (else the only config), split `train` (else the only split). Several
/// candidates and no such name are refused, listing them: choosing one silently would score the
/// wrong data. A split the hub converted only in part (`partial-SPLIT`) is refused too.
fn default_split(tree: &[String], base: &str) -> Result<Vec<String>, Miss> {
    let mut layout: BTreeMap<&str, BTreeMap<&str, Vec<String>>> = BTreeMap::new();
    for path in tree {
        let parts: Vec<&str> = path.split('/').collect();
        if let [config, split, file] = parts[..] {
            if is_conversion_file(file) {
                let files = layout.entry(config).or_default().entry(split).or_default();
                files.push(path.clone());
            }
        }
    }
    if layout.is_empty() {
        return Err(Miss::Missing);
    }
    let names = |m: Vec<&&str>| {
        m.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config = match layout.keys().copied().find(|c| *c == "default") {
        Some(c) => c,
        None if layout.len() == 1 => layout.keys().copied().next().unwrap_or_default(),
        None => {
            return Err(Miss::Refused(format!(
                "no path given, and the Parquet conversion has several configs ({}) and none is \
                 `default`: name one, as in {base}CONFIG/SPLIT/*.parquet",
                names(layout.keys().collect())
            )))
        }
    };
    let splits = &layout[config];
    let split = match splits.keys().copied().find(|s| *s == "train") {
        Some(s) => s,
        None if splits.len() == 1 => splits.keys().copied().next().unwrap_or_default(),
        None => {
            return Err(Miss::Refused(format!(
                "no path given, and config {config} has several splits ({}) and none is `train`: \
                 name one, as in {base}{config}/SPLIT/*.parquet",
                names(splits.keys().collect())
            )))
        }
    };
    if let Some(whole) = split.strip_prefix("partial-") {
        return Err(Miss::Refused(format!(
            "the hub converted only part of split {whole} ({config}/{split}): name it to score that \
             part ({base}{config}/{split}/*.parquet), or name the repo's own files"
        )));
    }
    let mut files = splits[split].clone();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    const BASE: &str = "hf://datasets/o/n@~parquet/";

    #[test]
    fn a_glob_matches_in_name_order_and_star_stays_in_its_folder() {
        let t = tree(&[
            "data/train-00001-of-00002.parquet",
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "data/sub/train-x.parquet",
        ]);
        let got = select(Selection::of(Some("data/train-*.parquet")), &t, BASE).unwrap();
        assert_eq!(
            got,
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        let all = select(Selection::of(Some("**/*.parquet")), &t, BASE).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0], "data/sub/train-x.parquet");
        assert_eq!(
            select(Selection::of(Some("data/*.csv")), &t, BASE),
            Err(Miss::Missing)
        );
    }

    #[test]
    fn a_file_is_itself_and_a_folder_is_refused() {
        let t = tree(&["data/a.jsonl", "data/b.jsonl"]);
        assert_eq!(
            select(Selection::of(Some("data/b.jsonl")), &t, BASE).unwrap(),
            ["data/b.jsonl"]
        );
        assert_eq!(
            select(Selection::of(Some("data/c.jsonl")), &t, BASE),
            Err(Miss::Missing)
        );
        match select(Selection::of(Some("data")), &t, BASE) {
            Err(Miss::Refused(m)) => assert!(m.contains("data/*.parquet"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_path_takes_default_then_train_else_the_only_one() {
        let t = tree(&[
            "default/test/0000.parquet",
            "default/train/0001.parquet",
            "default/train/0000.parquet",
            "other/train/0000.parquet",
            "default/train/notes.txt",
        ]);
        assert_eq!(
            select(Selection::DefaultSplit, &t, BASE).unwrap(),
            ["default/train/0000.parquet", "default/train/0001.parquet"]
        );
        let only = tree(&["plain_text/unsupervised/0000.parquet"]);
        assert_eq!(
            select(Selection::DefaultSplit, &only, BASE).unwrap(),
            ["plain_text/unsupervised/0000.parquet"]
        );
        // The repo's own files are not the conversion's layout.
        let own = tree(&["data/train-00000-of-00001.parquet", "a/b/c/0000.parquet"]);
        assert_eq!(
            select(Selection::DefaultSplit, &own, BASE),
            Err(Miss::Missing)
        );
    }

    #[test]
    fn no_path_refuses_to_guess_between_splits_or_configs_and_partial_splits() {
        let rb = tree(&["default/filtered/0000.parquet", "default/raw/0000.parquet"]);
        match select(Selection::DefaultSplit, &rb, BASE) {
            Err(Miss::Refused(m)) => assert!(
                m.contains("filtered, raw")
                    && m.contains("hf://datasets/o/n@~parquet/default/SPLIT/*.parquet"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        let configs = tree(&["a/train/0000.parquet", "b/train/0000.parquet"]);
        assert!(matches!(
            select(Selection::DefaultSplit, &configs, BASE),
            Err(Miss::Refused(m)) if m.contains("(a, b)")
        ));
        let partial = tree(&["default/partial-train/0000.parquet"]);
        assert!(matches!(
            select(Selection::DefaultSplit, &partial, BASE),
            Err(Miss::Refused(m)) if m.contains("only part of split train")
        ));
    }
}
