//! The encode stage: conversations to token ids and gate positions under --max-length, with the
//! status of each row that cannot be scored as it is.

use rayon::prelude::*;

use super::{PipelineError, Policy};
use crate::chat::Message;
use crate::encoder::{Encoded, Encoder};
use crate::input::Chunk;
use crate::output::{RowStatus, Status};

/// The encode stage: a conversation to token ids, a gate position and a status, under --max-length.
pub struct EncodeStage {
    pub encoder: Encoder,
    pub max_length: usize,
}

impl EncodeStage {
    /// One row: its encoding and status, or the status saying why it has none.
    fn row(&self, messages: &[Message], truncate: bool) -> Result<(Encoded, RowStatus), RowStatus> {
        let error = |status, e: String| RowStatus {
            status,
            error: Some(e),
        };
        if let Some(e) = self.certainly_too_long(messages, truncate) {
            return Err(error(Status::TooLong, e));
        }
        let enc = self
            .encoder
            .encode(messages)
            .map_err(|e| error(Status::Error, e))?;
        let max = self.max_length;
        if enc.ids.len() <= max {
            return Ok((enc, RowStatus::ok()));
        }
        let truncated = truncate
            .then(|| self.encoder.truncate_prompt_left(&enc, max))
            .flatten();
        match truncated {
            Some(t) => Ok((
                t,
                RowStatus {
                    status: Status::Truncated,
                    error: None,
                },
            )),
            None => {
                let tokens = format!("{} tokens", enc.ids.len());
                Err(error(
                    Status::TooLong,
                    self.too_long("the conversation", &tokens),
                ))
            }
        }
    }

    /// A row over --max-length by its length alone, refused before rendering and tokenizing it (which
    /// take time and memory in proportion to the text). Under truncation only the response must fit.
    fn certainly_too_long(&self, messages: &[Message], truncate: bool) -> Option<String> {
        let (counted, what) = if truncate {
            (
                &messages[messages.len().saturating_sub(1)..],
                "the response alone",
            )
        } else {
            (messages, "the conversation")
        };
        let at_least = self.encoder.min_tokens(counted);
        (at_least > self.max_length)
            .then(|| self.too_long(what, &format!("at least {at_least} tokens by its length")))
    }

    fn too_long(&self, what: &str, tokens: &str) -> String {
        format!(
            "{what} is {tokens}, over --max-length {}; armorm never truncates silently (see \
             --truncate prompt-left)",
            self.max_length
        )
    }
}

/// Tokenizes a window on all worker threads; under `skip_bad` a row that cannot be scored gets a status,
/// otherwise the first one stops the run.
pub(super) fn encode_chunk(
    chunk: &Chunk,
    encode: &EncodeStage,
    policy: Policy,
) -> Result<(Vec<Option<Encoded>>, Vec<RowStatus>), PipelineError> {
    let rows: Vec<Result<(Encoded, RowStatus), RowStatus>> = chunk
        .conversations
        .par_iter()
        .map(|row| match row {
            Ok(messages) => encode.row(messages, policy.truncate),
            // A row the reader could not take has null input columns: the error says where it was.
            Err(e) => Err(RowStatus {
                status: Status::Error,
                error: Some(e.to_string()),
            }),
        })
        .collect();
    let mut encoded = Vec::with_capacity(rows.len());
    let mut statuses = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
        match row {
            Ok((e, st)) => {
                encoded.push(Some(e));
                statuses.push(st);
            }
            Err(st) if policy.skip_bad => {
                encoded.push(None);
                statuses.push(st);
            }
            Err(st) => {
                return Err(match &chunk.conversations[i] {
                    Err(e) => PipelineError::Input(e.clone()),
                    Ok(_) => PipelineError::Row {
                        location: chunk.locations[i].clone(),
                        message: st.error.unwrap_or_default(),
                    },
                })
            }
        }
    }
    Ok((encoded, statuses))
}
