//! The Parquet reader: a slice of rows at a time, by the file's metadata row count.

use std::fs::File;

use polars::prelude::*;

use super::{conversations_from_frame, Chunk, ChunkSource, ColumnNames, InputError, Location};

/// Parquet, a slice of rows at a time.
pub struct ParquetSource {
    pub(super) skip_bad: bool,
    file: File,
    path: String,
    names: ColumnNames,
    chunk_rows: usize,
    offset: usize,
    total: usize,
}

impl ParquetSource {
    pub(super) fn new(
        file: File,
        path: &str,
        names: &ColumnNames,
        chunk_rows: usize,
    ) -> Result<Self, InputError> {
        let total = ParquetReader::new(
            file.try_clone()
                .map_err(|e| InputError::new(path, None, e))?,
        )
        .num_rows()
        .map_err(|e| InputError::new(path, None, format!("not a readable Parquet file: {e}")))?;
        Ok(Self {
            skip_bad: false,
            file,
            path: path.to_string(),
            names: names.clone(),
            chunk_rows: chunk_rows.max(1),
            offset: 0,
            total,
        })
    }
}

impl ChunkSource for ParquetSource {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, InputError> {
        if self.offset >= self.total {
            return Ok(None);
        }
        let len = self.chunk_rows.min(self.total - self.offset);
        let file = self
            .file
            .try_clone()
            .map_err(|e| InputError::new(&self.path, None, e))?;
        let frame = ParquetReader::new(file)
            .with_slice(Some((self.offset, len)))
            .finish()
            .map_err(|e| {
                InputError::new(&self.path, None, format!("cannot read Parquet rows: {e}"))
            })?;
        let locations: Vec<Location> = (0..frame.height())
            .map(|i| Location::Row {
                file: self.path.clone(),
                row: self.offset + i + 1,
            })
            .collect();
        let conversations = conversations_from_frame(&frame, &self.names, &self.path, &locations)?;
        if !self.skip_bad {
            if let Some(Err(e)) = conversations.iter().find(|c| c.is_err()) {
                return Err(e.clone());
            }
        }
        self.offset += len;
        Ok(Some(Chunk {
            frame,
            conversations,
            locations,
        }))
    }

    fn fraction_read(&self) -> Option<f64> {
        (self.total > 0).then(|| self.offset as f64 / self.total as f64)
    }
}

impl ParquetSource {
    /// Rows in the file, from its metadata.
    pub fn rows(&self) -> usize {
        self.total
    }
}
