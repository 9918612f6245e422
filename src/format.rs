//! The one place that knows file formats: a path's extension (or `-`) decides how it is read or written.

use std::path::Path;

/// How a dataset or a result file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Parquet,
    Jsonl,
}

impl Format {
    /// `-` (stdin or stdout) is JSONL; otherwise the extension decides, in any case: `.parquet`/`.pq`
    /// or `.jsonl`/`.ndjson`/`.json`. `None` for any other extension, which each caller refuses in
    /// its own words.
    pub fn of(path: &str) -> Option<Self> {
        if path == "-" {
            return Some(Self::Jsonl);
        }
        let ext = Path::new(path)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "pq" => Some(Self::Parquet),
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_or_dash_decides() {
        assert_eq!(Format::of("-"), Some(Format::Jsonl));
        assert_eq!(Format::of("a/b.PQ"), Some(Format::Parquet));
        assert_eq!(Format::of("b.ndjson"), Some(Format::Jsonl));
        assert_eq!(Format::of("b.json"), Some(Format::Jsonl));
        assert_eq!(Format::of("b.csv"), None);
        assert_eq!(Format::of("parquet"), None);
    }
}
