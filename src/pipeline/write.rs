//! The writer stage: scored windows put back in input order and written to the sink, the output
//! finished only after the end marker.

use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use std::sync::OnceLock;
use std::time::Instant;

use polars::prelude::{DataFrame, Schema};

use super::{Observer, PipelineError, Scored, Stats};
use crate::output::{self, Sink, TopK};

/// Writes windows in order until the end marker, then finishes the sink; returns `None` (leaving the
/// output unfinished: nothing appears at the target) when the stages before it stopped without one.
pub(super) fn write(
    writer: &mut WindowWriter,
    rx: Receiver<Option<Scored>>,
    mut sink: Box<dyn Sink + Send>,
    first_seq: usize,
    start: Instant,
    observer: &(dyn Observer + Sync),
) -> Result<Option<Stats>, PipelineError> {
    // Several models finish windows out of order: each waits here until its turn.
    let mut pending: BTreeMap<usize, Scored> = BTreeMap::new();
    let mut next = first_seq;
    for w in rx {
        let Some(w) = w else {
            if !pending.is_empty() {
                return Ok(None);
            }
            // Not a row anywhere (a shard of a short input): the output still gets every column.
            if first_seq == 1 && writer.schema.is_none() {
                writer.write_empty(sink.as_mut())?;
            }
            sink.finish()?;
            writer.stats.seconds = start.elapsed().as_secs_f64();
            return Ok(Some(writer.stats));
        };
        pending.insert(w.seq, w);
        while let Some(w) = pending.remove(&next) {
            next += 1;
            writer.write(w, sink.as_mut())?;
            writer.stats.seconds = start.elapsed().as_secs_f64();
            observer.written(&writer.stats, writer.stats.fraction);
        }
    }
    Ok(None)
}

pub(super) struct WindowWriter<'a> {
    pub(super) schema: Option<Schema>,
    pub(super) input_schema: &'a OnceLock<Schema>,
    pub(super) stats: Stats,
    pub(super) top: Option<TopK>,
    pub(super) status_columns: bool,
}

impl WindowWriter<'_> {
    /// No rows, with the columns that rows would have had.
    fn write_empty(&mut self, sink: &mut (dyn Sink + Send)) -> Result<(), PipelineError> {
        let Some(schema) = self.input_schema.get() else {
            return Ok(());
        };
        let frame = DataFrame::empty_with_schema(schema);
        let statuses = self.status_columns.then_some(&[][..]);
        let mut scored = output::with_scores(&frame, &[], &[], statuses, self.top.as_ref())?;
        sink.write(&mut scored)?;
        Ok(())
    }

    fn write(&mut self, w: Scored, sink: &mut (dyn Sink + Send)) -> Result<(), PipelineError> {
        let frame = match &self.schema {
            None => {
                self.schema = Some(w.frame.schema().as_ref().clone());
                w.frame
            }
            Some(s) => output::conform(w.frame, s).map_err(|message| PipelineError::Schema {
                input: w.input.clone(),
                message,
            })?,
        };
        let statuses = self.status_columns.then_some(w.statuses.as_slice());
        let mut scored =
            output::with_scores(&frame, &w.scores, &w.hashes, statuses, self.top.as_ref())?;
        sink.write(&mut scored)?;
        self.stats.skipped += w.statuses.iter().filter(|s| s.skipped()).count();
        self.stats.rows += w.scores.len();
        self.stats.tokens += w.tokens;
        self.stats.padded_tokens += w.padded;
        if let Some(saved) = w.saved {
            self.stats.shared_tokens = Some(self.stats.shared_tokens.unwrap_or(0) + saved);
        }
        self.stats.fraction = w.fraction;
        Ok(())
    }
}
