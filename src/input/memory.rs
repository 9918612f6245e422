//! Rows held in memory: conversations a command built itself (eval's), read by the same pipeline as files.

use polars::prelude::*;

use super::{Chunk, ChunkSource, InputError, Location};
use crate::chat::Message;

/// One conversation with its own id (its `id` column in the output) and where it came from, for errors.
pub struct MemoryRow {
    pub id: u64,
    pub location: Location,
    pub messages: Vec<Message>,
}

/// Rows in memory, a chunk of `chunk_rows` at a time.
pub struct MemorySource {
    rows: std::vec::IntoIter<MemoryRow>,
    total: usize,
    read: usize,
    chunk_rows: usize,
}

impl MemorySource {
    pub fn new(rows: Vec<MemoryRow>, chunk_rows: usize) -> Self {
        Self {
            total: rows.len(),
            rows: rows.into_iter(),
            read: 0,
            chunk_rows: chunk_rows.max(1),
        }
    }
}

impl ChunkSource for MemorySource {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, InputError> {
        let rows: Vec<MemoryRow> = self.rows.by_ref().take(self.chunk_rows).collect();
        if rows.is_empty() {
            return Ok(None);
        }
        self.read += rows.len();
        let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
        let frame = DataFrame::new_infer_height(vec![Column::new("id".into(), ids)])
            .map_err(|e| InputError::new("memory", None, e))?;
        let (conversations, locations) = rows
            .into_iter()
            .map(|r| (Ok(r.messages), r.location))
            .unzip();
        Ok(Some(Chunk {
            frame,
            conversations,
            locations,
        }))
    }

    fn fraction_read(&self) -> Option<f64> {
        (self.total > 0).then(|| self.read as f64 / self.total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64) -> MemoryRow {
        MemoryRow {
            id,
            location: Location::Line {
                file: "pairs.jsonl".into(),
                line: id as usize + 1,
            },
            messages: vec![
                Message::new("user", "Hi"),
                Message::new("assistant", &id.to_string()),
            ],
        }
    }

    #[test]
    fn chunks_keep_each_row_with_its_id_and_location_in_order() {
        let mut source = MemorySource::new((0..5).map(row).collect(), 2);
        let mut sizes = Vec::new();
        let mut ids = Vec::new();
        while let Some(chunk) = source.next_chunk().unwrap() {
            sizes.push(chunk.conversations.len());
            let col = chunk.frame.column("id").unwrap().u64().unwrap().clone();
            for (i, id) in col.into_no_null_iter().enumerate() {
                ids.push(id);
                let Location::Line { line, .. } = &chunk.locations[i] else {
                    panic!("a line location")
                };
                assert_eq!(*line as u64, id + 1);
                let messages = chunk.conversations[i].as_ref().unwrap();
                assert_eq!(messages[1].content, id.to_string());
            }
        }
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(ids, [0, 1, 2, 3, 4]);
        assert_eq!(source.fraction_read(), Some(1.0));
    }

    #[test]
    fn no_rows_no_chunk() {
        let mut source = MemorySource::new(Vec::new(), 4);
        assert!(source.next_chunk().unwrap().is_none());
        assert_eq!(source.fraction_read(), None);
    }
}
