//! Scores conversations: encode, bucket by length, run the model, and return rows in input order.

use candle_core::Tensor;

use crate::batch;
use crate::chat::Message;
use crate::encoder::{Encoded, Encoder};
use crate::model::{ArmoRM, FlatBatch, HeadOutput};

/// Every output of the model for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowScore {
    pub score: f32,
    pub rewards: Vec<f32>,
    pub gating: Vec<f32>,
    pub coefficients: Vec<f32>,
    pub num_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// A row that cannot be scored; `row` indexes the slice given to `score`.
    #[error("{message}")]
    Row { row: usize, message: String },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

pub struct Scorer {
    /// One copy of the model per device; windows are shared among them.
    models: Vec<ArmoRM>,
    encoder: Encoder,
    max_batch_tokens: usize,
    max_length: usize,
}

impl Scorer {
    /// `models`: one or more copies of the model (one per device); at least one.
    pub fn new(
        models: Vec<ArmoRM>,
        encoder: Encoder,
        max_batch_tokens: usize,
        max_length: usize,
    ) -> Self {
        Self {
            models,
            encoder,
            max_batch_tokens: max_batch_tokens.max(1),
            max_length,
        }
    }

    /// How many model copies (devices) score in parallel.
    pub fn models(&self) -> usize {
        self.models.len()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn encode(&self, messages: &[Message]) -> Result<Encoded, String> {
        let enc = self.encoder.encode(messages)?;
        if enc.ids.len() > self.max_length {
            return Err(format!(
                "the conversation is {} tokens, over --max-length {}; armorm never truncates silently",
                enc.ids.len(),
                self.max_length
            ));
        }
        Ok(enc)
    }

    /// Scores `conversations`, returned in the same order.
    pub fn score(&self, conversations: &[Vec<Message>]) -> Result<Vec<RowScore>, ScoreError> {
        let encoded = conversations
            .iter()
            .enumerate()
            .map(|(row, m)| {
                self.encode(m)
                    .map_err(|message| ScoreError::Row { row, message })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.score_encoded(&encoded)?.0)
    }

    /// Scores a window of encoded rows in length-sorted batches; returns the scores in the window's
    /// order and the padded tokens computed.
    pub fn score_encoded(&self, encoded: &[Encoded]) -> Result<(Vec<RowScore>, usize), ScoreError> {
        self.score_encoded_on(0, encoded)
    }

    /// The same on model copy `model`.
    pub fn score_encoded_on(
        &self,
        model: usize,
        encoded: &[Encoded],
    ) -> Result<(Vec<RowScore>, usize), ScoreError> {
        let model = &self.models[model.min(self.models.len() - 1)];
        let lens: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
        let mut out: Vec<Option<RowScore>> = vec![None; encoded.len()];
        let mut padded = 0;
        for rows in batch::plan(&lens, self.max_batch_tokens) {
            let mut flat = FlatBatch::new();
            for &i in &rows {
                flat.push(&encoded[i].ids, encoded[i].gate);
            }
            padded += flat.padded_tokens();
            let scored = unpack(&model.forward(&flat)?, &flat.lens())?;
            // Back to window order: the reorder step after length sorting.
            for (i, s) in rows.into_iter().zip(scored) {
                out[i] = Some(s);
            }
        }
        Ok((out.into_iter().flatten().collect(), padded))
    }
}

fn unpack(out: &HeadOutput, lens: &[usize]) -> candle_core::Result<Vec<RowScore>> {
    let rows = |t: &Tensor| t.to_vec2::<f32>();
    let (rewards, gating, coefficients) = (
        rows(&out.rewards)?,
        rows(&out.gating)?,
        rows(&out.coefficients)?,
    );
    let score = out.score.to_vec1::<f32>()?;
    Ok(score
        .into_iter()
        .zip(rewards)
        .zip(gating)
        .zip(coefficients)
        .zip(lens)
        .map(
            |((((score, rewards), gating), coefficients), &num_tokens)| RowScore {
                score,
                rewards,
                gating,
                coefficients,
                num_tokens,
            },
        )
        .collect())
}
