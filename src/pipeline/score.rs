//! The model stage: windows taken from the reader's queue (one thread per model), scored in batches,
//! passed to the writer; a row the model could not score stops the run or gets its status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Mutex;

use super::{EncodedWindow, PipelineError, Scored};
use crate::model::RowScore;
use crate::output::{RowStatus, Status};
use crate::scorer::{RowFailure, Scorer};
use crate::signal;

pub(super) fn score_windows(
    rx: &Mutex<Receiver<Result<EncodedWindow, PipelineError>>>,
    scorer: &Scorer,
    model: usize,
    tx: SyncSender<Option<Scored>>,
    stop: &AtomicBool,
    skip_bad: bool,
) -> Result<(), PipelineError> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Between windows: the one just scored is on its way to the writer, which commits it.
        if let Err(e) = signal::check() {
            stop.store(true, Ordering::Relaxed);
            return Err(PipelineError::Interrupted(e));
        }
        // The lock is held only while taking the next window, not while scoring it.
        let next = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return Ok(()),
        };
        let Ok(item) = next else {
            return Ok(());
        };
        let result = score_window(item, scorer, model, skip_bad);
        match result {
            Ok(scored) => {
                if tx.send(Some(scored)).is_err() {
                    // The writer stopped on an error, which it returns.
                    return Ok(());
                }
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
}

/// Scores one window; a row the model could not score (out of memory alone, not finite) stops the run,
/// or under `skip_bad` gets its status.
fn score_window(
    item: Result<EncodedWindow, PipelineError>,
    scorer: &Scorer,
    model: usize,
    skip_bad: bool,
) -> Result<Scored, PipelineError> {
    let EncodedWindow {
        seq,
        chunk,
        input,
        encoded,
        hashes,
        statuses,
        fraction,
    } = item?;
    let mut statuses = statuses;
    let scored = scorer
        .score_window(model, &encoded)
        .map_err(PipelineError::Model)?;
    let (results, padded, saved) = (scored.rows, scored.padded, scored.saved);
    let mut scores: Vec<Option<RowScore>> = vec![None; encoded.len()];
    for (i, result) in results.into_iter().enumerate() {
        match result {
            None => {}
            Some(Ok(s)) => scores[i] = Some(s),
            Some(Err(failure)) if skip_bad => {
                statuses[i] = RowStatus {
                    status: match failure {
                        RowFailure::OutOfMemory { .. } => Status::Oom,
                        RowFailure::NonFinite { .. } => Status::NonFinite,
                    },
                    error: Some(failure.to_string()),
                }
            }
            Some(Err(failure)) => {
                return Err(PipelineError::Row {
                    location: chunk.locations[i].clone(),
                    message: failure.to_string(),
                })
            }
        }
    }
    let tokens = encoded.iter().flatten().map(|e| e.ids.len()).sum();
    Ok(Scored {
        seq,
        frame: chunk.frame,
        input,
        scores,
        hashes,
        statuses,
        tokens,
        padded,
        saved,
        fraction,
    })
}
