//! From a conversation to model input: chat template, tokenizer ids, and the gating position.

use std::path::Path;

use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::chat::{check_conversation, ChatTemplate, Message, TemplateError};

/// The text whose token ids mark where the prompt ends: ArmoRM's gating network reads the hidden state
/// at the first of these ids, at their last occurrence.
pub const GATING_TEXT: &str = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("{path}: {error}")]
    Template { path: String, error: TemplateError },
    #[error("the tokenizer encodes the gating text {GATING_TEXT:?} to no ids")]
    NoPattern,
}

/// A conversation ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Index in `ids` of the gating token.
    pub gate: usize,
}

pub struct Encoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    pattern: Vec<u32>,
    vocab_size: usize,
    /// The most text one token can stand for, in bytes, when every byte of the text lands in a token
    /// (see `min_tokens`); `None` when that is not known of this tokenizer and template.
    max_token_bytes: Option<usize>,
}

impl Encoder {
    /// `dir` holds tokenizer.json and tokenizer_config.json; `vocab_size` is the embedding's row count.
    pub fn from_dir(dir: &Path, vocab_size: usize) -> Result<Self, EncoderError> {
        let tok_path = dir.join("tokenizer.json");
        let cfg_path = dir.join("tokenizer_config.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| EncoderError::Tokenizer {
            path: tok_path.display().to_string(),
            message: e.to_string(),
        })?;
        let cfg = std::fs::read_to_string(&cfg_path).map_err(|error| EncoderError::Read {
            path: cfg_path.display().to_string(),
            error,
        })?;
        let template =
            ChatTemplate::from_tokenizer_config(&cfg).map_err(|error| EncoderError::Template {
                path: cfg_path.display().to_string(),
                error,
            })?;
        Self::new(tokenizer, template, vocab_size).map_err(|e| match e {
            EncoderError::Tokenizer { message, .. } => EncoderError::Tokenizer {
                path: tok_path.display().to_string(),
                message,
            },
            e => e,
        })
    }

    pub fn new(
        tokenizer: Tokenizer,
        template: ChatTemplate,
        vocab_size: usize,
    ) -> Result<Self, EncoderError> {
        let pattern =
            encode_plain(&tokenizer, GATING_TEXT).map_err(|message| EncoderError::Tokenizer {
                path: String::new(),
                message,
            })?;
        if pattern.is_empty() {
            return Err(EncoderError::NoPattern);
        }
        check_pattern(&tokenizer, &pattern, vocab_size).map_err(|reason| {
            EncoderError::Tokenizer {
                path: String::new(),
                message: format!("cannot produce the gating tokens {GATING_TEXT:?}: {reason}"),
            }
        })?;
        let max_token_bytes = max_token_bytes(&tokenizer, &template);
        Ok(Self {
            tokenizer,
            template,
            pattern,
            vocab_size,
            max_token_bytes,
        })
    }

    /// A lower bound on the tokens of the rendered conversation, from the length of its user and
    /// assistant texts alone (0 when unknown): a row far over the limit is refused before it is
    /// rendered or tokenized, whatever its size.
    pub fn min_tokens(&self, messages: &[Message]) -> usize {
        let Some(per_token) = self.max_token_bytes else {
            return 0;
        };
        // Trimmed of more than any template trims, so the bound holds for those that trim.
        let bytes: usize = messages
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| {
                m.content
                    .trim_matches(|c: char| c.is_whitespace() || c.is_control())
                    .len()
            })
            .sum();
        bytes.div_ceil(per_token)
    }

    /// sha256 of the chat template's source (`armorm.template_hash`).
    pub fn template_hash(&self) -> &str {
        self.template.source_hash()
    }

    pub fn gating_pattern(&self) -> &[u32] {
        &self.pattern
    }

    /// `--truncate prompt-left`: the row cut to `max_len` tokens by dropping the oldest prompt tokens,
    /// keeping BOS and the first message's header (everything up to the first `<|end_header_id|>` and the
    /// token after it), and everything from the gating tokens on, so the response and the gate are intact.
    /// `None` when even that does not fit.
    pub fn truncate_prompt_left(&self, enc: &Encoded, max_len: usize) -> Option<Encoded> {
        let over = enc.ids.len().checked_sub(max_len)?;
        let end_header = self.tokenizer.token_to_id("<|end_header_id|>")?;
        let keep = enc.ids.iter().position(|&t| t == end_header)? + 2;
        truncate_between(enc, keep, over)
    }

    /// Renders, tokenizes (without adding special tokens: the template writes BOS) and finds the gate.
    /// The error is a sentence about the row, for the caller to place.
    pub fn encode(&self, messages: &[Message]) -> Result<Encoded, String> {
        check_conversation(messages)?;
        let text = self.template.render(messages).map_err(|e| e.to_string())?;
        let ids = encode_plain(&self.tokenizer, &text)?;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            let token = self.tokenizer.id_to_token(id).unwrap_or_default();
            return Err(format!(
                "the text contains token {token:?} (id {id}), which has no embedding (vocab_size {})",
                self.vocab_size
            ));
        }
        // The gate is the last occurrence that the template wrote before the response: the response's
        // own text may contain the special-token strings (they are tokenized as special tokens, as
        // transformers does), but it cannot move the gate. Where the prompt's ids are not a prefix of the
        // conversation's (never seen with Llama-3), the reference rule applies to the whole row.
        let prompt = self
            .template
            .render_prompt(messages)
            .map_err(|e| e.to_string())?;
        let prompt_ids = encode_plain(&self.tokenizer, &prompt)?;
        let search = if ids.starts_with(&prompt_ids) {
            &ids[..prompt_ids.len()]
        } else {
            &ids[..]
        };
        let gate = find_last(search, &self.pattern).ok_or_else(|| {
            "no prompt before the response: the gating tokens <|eot_id|><|start_header_id|>assistant... \
             do not occur"
                .to_string()
        })?;
        Ok(Encoded { ids, gate })
    }
}

/// The special tokens of the gating text, the first of which is the gate.
const GATING_SPECIALS: [&str; 3] = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"];

/// Each special token of the gating text must be one token of the vocabulary, as in Llama-3's, and the
/// gate one with an embedding. Otherwise the text is cut into ordinary pieces: the gate would fall on a
/// piece of `<|eot_id|>` in some rows and in no place at all in others, which is the tokenizer's fault,
/// not the rows'.
fn check_pattern(tokenizer: &Tokenizer, pattern: &[u32], vocab_size: usize) -> Result<(), String> {
    for special in GATING_SPECIALS {
        let id = tokenizer
            .token_to_id(special)
            .ok_or_else(|| format!("{special} is not a token of its vocabulary"))?;
        if encode_plain(tokenizer, special)? != [id] {
            return Err(format!(
                "{special} is not encoded as its own token (id {id}): is it missing from added_tokens?"
            ));
        }
    }
    let eot = tokenizer.token_to_id(GATING_SPECIALS[0]);
    if pattern.first().copied() != eot {
        return Err(format!(
            "they encode to {pattern:?}, which does not start with <|eot_id|>"
        ));
    }
    match pattern.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(format!(
            "their id {id} has no embedding (vocab_size {vocab_size})"
        )),
        None => Ok(()),
    }
}

/// The longest vocabulary string in bytes, where it bounds the text a token covers: without a
/// normalizer, behind a byte-level pre-tokenizer that drops nothing (Llama-3's), and with no added
/// token that swallows the whitespace beside it, each byte of the text is in exactly one token, whose
/// string is at least as long as the bytes it stands for. The template must also write each user and
/// assistant text (checked on a probe), so that their bytes are part of the rendered text.
fn max_token_bytes(tokenizer: &Tokenizer, template: &ChatTemplate) -> Option<usize> {
    fn lossless(p: &PreTokenizerWrapper, byte_level: &mut bool) -> bool {
        match p {
            PreTokenizerWrapper::ByteLevel(_) => {
                *byte_level = true;
                true
            }
            PreTokenizerWrapper::Split(s) => s.behavior != SplitDelimiterBehavior::Removed,
            PreTokenizerWrapper::Sequence(seq) => {
                seq.as_ref().iter().all(|p| lossless(p, byte_level))
            }
            _ => false,
        }
    }
    let mut byte_level = false;
    let keeps_bytes = tokenizer.get_normalizer().is_none()
        && tokenizer
            .get_pre_tokenizer()
            .is_some_and(|p| lossless(p, &mut byte_level))
        && byte_level
        && tokenizer
            .get_added_tokens_decoder()
            .values()
            .all(|t| !t.lstrip && !t.rstrip);
    let probe = [
        Message::new("user", "armorm probe question"),
        Message::new("assistant", "armorm probe answer"),
    ];
    let writes_texts = template
        .render(&probe)
        .is_ok_and(|text| probe.iter().all(|m| text.contains(&m.content)));
    if !(keeps_bytes && writes_texts) {
        return None;
    }
    tokenizer
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .filter(|&n| n > 0)
}

fn encode_plain(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| format!("tokenizer: {e}"))
}

/// Drops `over` tokens right after the first `keep`, if they all lie before the gate.
fn truncate_between(enc: &Encoded, keep: usize, over: usize) -> Option<Encoded> {
    if keep + over > enc.gate {
        return None;
    }
    let mut ids = enc.ids[..keep].to_vec();
    ids.extend_from_slice(&enc.ids[keep + over..]);
    Some(Encoded {
        ids,
        gate: enc.gate - over,
    })
}

/// Start of the last occurrence of `pattern` in `ids`.
pub fn find_last(ids: &[u32], pattern: &[u32]) -> Option<usize> {
    if pattern.is_empty() || ids.len() < pattern.len() {
        return None;
    }
    (0..=ids.len() - pattern.len())
        .rev()
        .find(|&j| &ids[j..j + pattern.len()] == pattern)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_drops_the_oldest_prompt_tokens_only() {
        // [bos, hdr, user, end, nl, p1, p2, p3, gate.., r]
        let enc = Encoded {
            ids: vec![0, 1, 2, 3, 4, 10, 11, 12, 20, 21, 30],
            gate: 8,
        };
        let t = truncate_between(&enc, 5, 2).unwrap();
        assert_eq!(t.ids, vec![0, 1, 2, 3, 4, 12, 20, 21, 30]);
        assert_eq!(t.gate, 6);
        assert_eq!(t.ids[t.gate], enc.ids[enc.gate]);
        assert!(truncate_between(&enc, 5, 3).is_some());
        assert!(
            truncate_between(&enc, 5, 4).is_none(),
            "the gate would be cut"
        );
    }

    #[test]
    fn finds_start_of_last_occurrence() {
        let p = [7, 8];
        assert_eq!(find_last(&[7, 8, 1, 7, 8, 2], &p), Some(3));
        assert_eq!(find_last(&[7, 8], &p), Some(0));
        assert_eq!(find_last(&[8, 7], &p), None);
        assert_eq!(find_last(&[7], &p), None);
        assert_eq!(find_last(&[1, 2], &[]), None);
    }
}
