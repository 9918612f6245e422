//! Conversations and the model's Jinja chat template, rendered the way transformers renders it.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Roles the reward model was trained on; anything else is refused rather than rendered blindly.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Why a conversation cannot be scored.
pub fn check_conversation(messages: &[Message]) -> Result<(), String> {
    let Some(last) = messages.last() else {
        return Err("the conversation has no messages".to_string());
    };
    if let Some((i, m)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        return Err(format!(
            "message {i} has role {:?}; expected one of system, user, assistant",
            m.role
        ));
    }
    if let Some((i, m)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| m.role != "system" && m.content.trim().is_empty())
    {
        return Err(format!("message {i} ({}) is empty", m.role));
    }
    if last.role != "assistant" {
        return Err(format!(
            "the last message must be the assistant's response, not {:?}",
            last.role
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("tokenizer_config.json has no chat_template")]
    Missing,
    #[error("tokenizer_config.json: {0}")]
    Config(#[from] serde_json::Error),
    #[error("chat template: {0}")]
    Jinja(#[from] JinjaError),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Plain(String),
    Added { content: String },
}

impl TokenField {
    fn content(self) -> String {
        match self {
            TokenField::Plain(s) | TokenField::Added { content: s } => s,
        }
    }
}

#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<TokenField>,
    eos_token: Option<TokenField>,
}

/// The chat template of `tokenizer_config.json`, compiled once.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// sha256 of the template's source text (`armorm.template_hash`).
    source_hash: String,
}

impl ChatTemplate {
    pub fn from_tokenizer_config(json: &str) -> Result<Self, TemplateError> {
        let cfg: TokenizerConfig = serde_json::from_str(json)?;
        let source = match cfg.chat_template.ok_or(TemplateError::Missing)? {
            TemplateField::Single(s) => s,
            TemplateField::Named(list) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template)
                .ok_or(TemplateError::Missing)?,
        };
        let source_hash = crate::provenance::sha256_hex(source.as_bytes());
        let mut env = Environment::new();
        // transformers compiles chat templates with these two options.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("trim", py_strip);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source)?;
        Ok(Self {
            env,
            bos_token: cfg.bos_token.map(TokenField::content).unwrap_or_default(),
            eos_token: cfg.eos_token.map(TokenField::content).unwrap_or_default(),
            source_hash,
        })
    }

    /// Lowercase hex sha256 of the template's Jinja source, as tokenizer_config.json holds it.
    pub fn source_hash(&self) -> &str {
        &self.source_hash
    }

    /// The text of a complete conversation (no generation prompt), as `apply_chat_template` renders it.
    pub fn render(&self, messages: &[Message]) -> Result<String, TemplateError> {
        self.render_with(messages, false)
    }

    /// The conversation before its last message, followed by the generation prompt: the text the
    /// template writes before the response.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String, TemplateError> {
        self.render_with(&messages[..messages.len().saturating_sub(1)], true)
    }

    fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat")?;
        Ok(template.render(context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => add_generation_prompt,
        })?)
    }
}

/// Jinja2's `trim` is Python's `str.strip()`, which also strips the ASCII separators U+001C..U+001F
/// that Rust's `str::trim` keeps.
fn py_strip(value: String) -> String {
    value
        .trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .to_string()
}

fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"}"#;

    #[test]
    fn renders_llama3_with_bos_and_trimmed_contents() {
        let t = ChatTemplate::from_tokenizer_config(LLAMA3).unwrap();
        let text = t
            .render(&[
                Message::new("user", "  hi \u{1f}\n"),
                Message::new("assistant", "\tyo "),
            ])
            .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
        );
    }

    #[test]
    fn the_template_hash_is_that_of_the_source_in_use() {
        let single =
            ChatTemplate::from_tokenizer_config(r#"{"chat_template": "{{ 1 }}"}"#).unwrap();
        // printf '{{ 1 }}' | sha256sum
        let want = "bb0176da02383e938e8d6c25b22be61026d52766ab5459e8c2de560e75038cc8";
        assert_eq!(single.source_hash(), want);
        let named = ChatTemplate::from_tokenizer_config(
            r#"{"chat_template": [{"name": "tool_use", "template": "x"},
                                  {"name": "default", "template": "{{ 1 }}"}]}"#,
        )
        .unwrap();
        assert_eq!(named.source_hash(), want);
    }

    #[test]
    fn conversation_checks() {
        let u = Message::new("user", "q");
        let a = Message::new("assistant", "r");
        assert!(check_conversation(&[u.clone(), a.clone()]).is_ok());
        assert!(check_conversation(&[a.clone(), u.clone()])
            .unwrap_err()
            .contains("last message"));
        assert!(check_conversation(&[Message::new("robot", "x"), a.clone()])
            .unwrap_err()
            .contains("robot"));
        assert!(check_conversation(&[]).is_err());
        assert!(
            check_conversation(&[u.clone(), Message::new("assistant", "  ")])
                .unwrap_err()
                .contains("empty")
        );
    }
}
