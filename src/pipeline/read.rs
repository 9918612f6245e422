//! The reader stage: inputs opened in turn, read in windows, this shard's rows kept, windows an
//! interrupted run completed skipped, and each window tokenized on its way to the model.

use std::sync::mpsc::SyncSender;
use std::sync::OnceLock;

use polars::prelude::Schema;
use rayon::prelude::*;

use super::encode::{encode_chunk, EncodeStage};
use super::{EncodedWindow, InputSource, PipelineError, Policy};
use crate::input::{self, Chunk, InputError};
use crate::provenance;
use crate::shard::Shard;
use crate::signal;

pub(super) fn read_and_encode(
    inputs: Vec<InputSource>,
    encode: &EncodeStage,
    select: Selection,
    policy: Policy,
    reserved: Reserved,
    input_schema: &OnceLock<Schema>,
    tx: SyncSender<Result<EncodedWindow, PipelineError>>,
) -> Result<(), PipelineError> {
    let mut window = 0usize;
    let mut done_share = 0.0;
    // Rows counted from 0 across all inputs: the key of the shard assignment.
    let mut next_row = 0usize;
    for InputSource { name, share, open } in inputs {
        let mut source = match open() {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.into()));
                return Ok(());
            }
        };
        loop {
            if let Err(e) = signal::check() {
                let _ = tx.send(Err(PipelineError::Interrupted(e)));
                return Ok(());
            }
            // Checked as each window is read, so a clash stops the run before that window is scored.
            let chunk = match source.next_chunk().and_then(|c| reserved.check(c, &name)) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return Ok(());
                }
            };
            let fraction = source.fraction_read().map(|f| done_share + f * share);
            let first = next_row;
            next_row += chunk.conversations.len();
            let chunk = match select.shard {
                Some(s) => match chunk.retain(|i| s.keeps(first + i)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return Ok(());
                    }
                },
                None => chunk,
            };
            if input_schema.get().is_none() {
                let _ = input_schema.set(chunk.frame.schema().as_ref().clone());
            }
            if chunk.conversations.is_empty() {
                continue;
            }
            window += 1;
            if window <= select.skip_windows {
                continue;
            }
            let item = encode_chunk(&chunk, encode, policy).map(|(encoded, statuses)| {
                let hashes = encoded
                    .par_iter()
                    .map(|e| e.as_ref().map(|e| provenance::input_hash(&e.ids)))
                    .collect();
                EncodedWindow {
                    seq: window,
                    chunk,
                    input: name.clone(),
                    encoded,
                    hashes,
                    statuses,
                    fraction,
                }
            });
            let failed = item.is_err();
            // A closed channel means the model stage stopped: its error is reported there.
            if tx.send(item).is_err() || failed {
                return Ok(());
            }
        }
        done_share += share;
    }
    Ok(())
}

/// Which rows the reader passes on: this shard's, after the windows an interrupted run completed.
pub(super) struct Selection {
    pub(super) shard: Option<Shard>,
    pub(super) skip_windows: usize,
}

/// The columns armorm adds, which an input column must not be named like.
pub(super) struct Reserved {
    pub(super) names: Vec<&'static str>,
    pub(super) rename: bool,
}

impl Reserved {
    fn check(&self, chunk: Option<Chunk>, input: &str) -> Result<Option<Chunk>, InputError> {
        let Some(mut chunk) = chunk else {
            return Ok(None);
        };
        input::reserve_columns(&mut chunk.frame, &self.names, self.rename, input)?;
        Ok(Some(chunk))
    }
}
