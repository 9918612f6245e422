//! The model's `config.json`, read in both layouts transformers writes, with ArmoRM's head defaults.
//!
//! Everything that decides the math is resolved here, once: RoPE from the top-level `rope_theta` /
//! `rope_scaling` (transformers < 5) or from `rope_parameters` (transformers >= 5), and every field
//! this backbone does not compute is refused rather than ignored, so that a config it does not understand
//! never yields scores that look right.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// transformers' `RotaryEmbeddingConfigMixin.default_theta`, which `LlamaConfig` keeps: the base used when
/// neither layout gives `rope_theta`.
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// `config.json` of an ArmoRM checkpoint: a Llama config plus the gating head's four fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct ArmoRMConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in pre-GQA configs, where it equals `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Absent in most Llama configs, where it is `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
    pub num_objectives: usize,
    pub gating_temperature: f64,
    pub gating_hidden_dim: usize,
    pub gating_n_hidden: usize,
}

/// Rotary embeddings, whichever layout gave them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The `rope_type`s this backbone computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    Default,
    /// transformers' `_compute_llama3_parameters`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => write!(f, "rope_type default"),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => write!(
                f,
                "rope_type llama3, factor {factor}, low_freq_factor {low_freq_factor}, \
                 high_freq_factor {high_freq_factor}, original_max_position_embeddings \
                 {original_max_position_embeddings}"
            ),
        }
    }
}

/// What is wrong with config.json, and in which field (dotted for nested ones).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn bad(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// config.json as written, before anything is resolved.
#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    original_max_position_embeddings: Option<usize>,
    max_position_embeddings: usize,
    vocab_size: usize,
    pad_token_id: Option<u32>,
    model_type: Option<String>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    num_objectives: Option<usize>,
    gating_temperature: Option<f64>,
    gating_hidden_dim: Option<usize>,
    gating_n_hidden: Option<usize>,
    /// Everything else, searched for fields that would change the math (`MATH_FIELDS`).
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// `rope_scaling` or `rope_parameters` as written (`type` in old configs, `rope_type` in newer ones).
#[derive(Debug, Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    partial_rotary_factor: Option<f64>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// Whether a field's value leaves the network a plain Llama.
type Neutral = fn(&Value) -> bool;

/// Fields of other Llama-family configs (Mistral, Qwen, Gemma, Granite, OLMo, MiniCPM, Llama 4, MoE
/// models) that change what the backbone computes, with the values that leave it a plain Llama.
const MATH_FIELDS: &[(&str, Neutral)] = &[
    ("partial_rotary_factor", is_one),
    ("attn_logit_softcapping", is_null),
    ("final_logit_softcapping", is_null),
    ("query_pre_attn_scalar", is_null),
    ("attention_multiplier", is_one),
    ("embedding_multiplier", is_one),
    ("residual_multiplier", is_one),
    ("logits_scaling", is_one),
    ("scale_emb", is_one),
    ("scale_depth", is_one),
    ("clip_qkv", is_null),
    ("use_qk_norm", is_off),
    ("qk_norm", is_off),
    ("no_rope_layers", is_null),
    ("attention_chunk_size", is_null),
    ("num_local_experts", is_zero),
    ("num_experts", is_zero),
    ("n_routed_experts", is_zero),
];

fn is_null(v: &Value) -> bool {
    v.is_null()
}
fn is_off(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}
fn is_one(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(1.0)
}
fn is_zero(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(0.0)
}

impl ArmoRMConfig {
    /// Parses and checks config.json's text. Syntax and type errors carry serde's line and column;
    /// the rest name the field.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Self::try_from(raw).map_err(|e| e.to_string())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Refuses shapes this implementation cannot compute, rather than computing something else.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_attention_heads == 0 || self.num_kv_heads() == 0 {
            return Err(bad(
                "num_attention_heads",
                "num_attention_heads and num_key_value_heads must be positive",
            ));
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        // transformers' LlamaConfig refuses this too, even with an explicit head_dim.
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim() == 0 || self.head_dim() % 2 != 0 {
            return Err(bad(
                "head_dim",
                format!(
                    "{} must be positive and even for rotary embeddings",
                    self.head_dim()
                ),
            ));
        }
        if self.num_objectives == 0 {
            return Err(bad("num_objectives", "must be positive"));
        }
        if self.gating_temperature.is_nan() || self.gating_temperature <= 0.0 {
            return Err(bad("gating_temperature", "must be > 0"));
        }
        Ok(())
    }
}

impl TryFrom<RawConfig> for ArmoRMConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        check_math_fields(&raw)?;
        let rope = resolve_rope(&raw)?;
        let cfg = Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads,
            head_dim: raw.head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope,
            max_position_embeddings: raw.max_position_embeddings,
            vocab_size: raw.vocab_size,
            pad_token_id: raw.pad_token_id,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            num_objectives: raw.num_objectives.unwrap_or(19),
            gating_temperature: raw.gating_temperature.unwrap_or(10.0),
            gating_hidden_dim: raw.gating_hidden_dim.unwrap_or(1024),
            gating_n_hidden: raw.gating_n_hidden.unwrap_or(3),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The fields that would make this a different network than the Llama backbone computed here.
fn check_math_fields(raw: &RawConfig) -> Result<(), ConfigError> {
    if let Some(t) = raw.model_type.as_deref().filter(|t| *t != "llama") {
        return Err(bad(
            "model_type",
            format!("{t:?} is not supported (only \"llama\")"),
        ));
    }
    if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(bad(
            "hidden_act",
            format!("{act:?} is not supported (only \"silu\")"),
        ));
    }
    for (field, set) in [
        ("attention_bias", raw.attention_bias),
        ("mlp_bias", raw.mlp_bias),
    ] {
        if set == Some(true) {
            return Err(bad(field, "true is not supported (no bias terms here)"));
        }
    }
    check_sliding_window(&raw.other)?;
    if let Some(types) = raw.other.get("layer_types").filter(|v| !v.is_null()) {
        let all_full = types
            .as_array()
            .is_some_and(|a| a.iter().all(|t| t == "full_attention"));
        if !all_full {
            return Err(bad(
                "layer_types",
                format!("{types} is not supported (only full_attention layers)"),
            ));
        }
    }
    for (field, neutral) in MATH_FIELDS {
        if let Some(v) = raw.other.get(*field).filter(|v| !neutral(v)) {
            return Err(bad(
                field,
                format!(
                    "{v} is not supported: it changes the model's math, which armorm does not \
                     compute"
                ),
            ));
        }
    }
    Ok(())
}

/// Mistral writes `sliding_window` alone; Qwen2 gates it with `use_sliding_window`.
fn check_sliding_window(other: &BTreeMap<String, Value>) -> Result<(), ConfigError> {
    let window = other.get("sliding_window").filter(|v| !v.is_null());
    match other.get("use_sliding_window") {
        Some(Value::Bool(true)) => Err(bad(
            "use_sliding_window",
            "true is not supported (full causal attention only)",
        )),
        Some(Value::Bool(false)) => Ok(()),
        _ => match window {
            Some(w) => Err(bad(
                "sliding_window",
                format!("{w} is not supported (full causal attention only)"),
            )),
            None => Ok(()),
        },
    }
}

/// RoPE from either layout; where both give a value they must agree.
fn resolve_rope(raw: &RawConfig) -> Result<Rope, ConfigError> {
    let legacy = raw
        .rope_scaling
        .as_ref()
        .map(|r| parse_rope(r, "rope_scaling", raw))
        .transpose()?;
    let nested = raw
        .rope_parameters
        .as_ref()
        .map(|r| parse_rope(r, "rope_parameters", raw))
        .transpose()?;
    let thetas = [
        ("rope_theta", raw.rope_theta),
        ("rope_scaling.rope_theta", legacy.and_then(|r| r.0)),
        ("rope_parameters.rope_theta", nested.and_then(|r| r.0)),
    ];
    let mut theta: Option<(&str, f64)> = None;
    for (field, value) in thetas {
        let Some(value) = value else { continue };
        match theta {
            Some((first, t)) if t != value => {
                return Err(bad(
                    field,
                    format!("{value} disagrees with `{first}` ({t}); give RoPE once"),
                ))
            }
            Some(_) => {}
            None => theta = Some((field, value)),
        }
    }
    let (field, theta) = theta.unwrap_or(("rope_theta", DEFAULT_ROPE_THETA));
    if !(theta.is_finite() && theta > 0.0) {
        return Err(bad(field, format!("{theta} must be positive")));
    }
    let scaling = match (legacy, nested) {
        (Some((_, a)), Some((_, b))) if a != b => {
            return Err(bad(
                "rope_parameters",
                format!("{b} disagrees with `rope_scaling` ({a}); give RoPE once"),
            ))
        }
        (_, Some((_, s))) | (Some((_, s)), None) => s,
        (None, None) => RopeScaling::Default,
    };
    Ok(Rope { theta, scaling })
}

/// One RoPE object (`at` is its field name): its `rope_theta`, if it gives one, and its scaling.
fn parse_rope(
    r: &RawRope,
    at: &str,
    raw: &RawConfig,
) -> Result<(Option<f64>, RopeScaling), ConfigError> {
    let field = |name: &str| format!("{at}.{name}");
    if let Some(key) = r.other.keys().next() {
        return Err(bad(
            &field(key),
            "not understood (known: rope_type, rope_theta, factor, low_freq_factor, \
             high_freq_factor, original_max_position_embeddings)",
        ));
    }
    if let Some(p) = r.partial_rotary_factor.filter(|p| *p != 1.0) {
        return Err(bad(
            &field("partial_rotary_factor"),
            format!("{p} is not supported (rotary embeddings on the whole head only)"),
        ));
    }
    let rope_type = match (&r.rope_type, &r.legacy_type) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(
                &field("type"),
                format!("{b:?} disagrees with rope_type {a:?}"),
            ))
        }
        (Some(t), _) | (None, Some(t)) => t.as_str(),
        (None, None) => "default",
    };
    let scaling = match rope_type {
        "default" => {
            let llama3_only = [
                ("factor", r.factor.is_some()),
                ("low_freq_factor", r.low_freq_factor.is_some()),
                ("high_freq_factor", r.high_freq_factor.is_some()),
                (
                    "original_max_position_embeddings",
                    r.original_max_position_embeddings.is_some(),
                ),
            ];
            if let Some((name, _)) = llama3_only.iter().find(|(_, given)| *given) {
                return Err(bad(
                    &field(name),
                    "is not understood with rope_type \"default\"",
                ));
            }
            RopeScaling::Default
        }
        "llama3" => llama3(r, at, raw)?,
        other => {
            return Err(bad(
                &field("rope_type"),
                format!("{at} type {other:?} is not supported (supported: default, llama3)"),
            ))
        }
    };
    Ok((r.rope_theta, scaling))
}

/// transformers 5 takes `original_max_position_embeddings` from the top level first, then from the RoPE
/// object, then falls back to `max_position_embeddings`.
fn llama3(r: &RawRope, at: &str, raw: &RawConfig) -> Result<RopeScaling, ConfigError> {
    let need = |name: &str, v: Option<f64>| {
        v.ok_or_else(|| {
            bad(
                &format!("{at}.{name}"),
                "missing (needed by llama3 scaling)",
            )
        })
    };
    let factor = need("factor", r.factor)?;
    let low_freq_factor = need("low_freq_factor", r.low_freq_factor)?;
    let high_freq_factor = need("high_freq_factor", r.high_freq_factor)?;
    if !(factor >= 1.0 && high_freq_factor > low_freq_factor && low_freq_factor > 0.0) {
        return Err(bad(
            at,
            format!(
                "llama3 scaling needs factor >= 1 and high_freq_factor > low_freq_factor > 0 \
                 (got {factor}, {high_freq_factor}, {low_freq_factor})"
            ),
        ));
    }
    let original = match (
        raw.original_max_position_embeddings,
        r.original_max_position_embeddings,
    ) {
        (Some(top), Some(inner)) if top != inner => {
            return Err(bad(
                &format!("{at}.original_max_position_embeddings"),
                format!(
                    "{inner} disagrees with the top-level original_max_position_embeddings ({top})"
                ),
            ))
        }
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => raw.max_position_embeddings,
    };
    if original == 0 {
        return Err(bad(
            &format!("{at}.original_max_position_embeddings"),
            "must be positive",
        ));
    }
    Ok(RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: original,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 32, "vocab_size": 10"#;

    fn parse(extra: &str) -> Result<ArmoRMConfig, String> {
        let sep = if extra.is_empty() { "" } else { "," };
        ArmoRMConfig::from_json(&format!("{{{BASE}{sep}{extra}}}"))
    }

    fn refused(extra: &str, field: &str) -> String {
        let err = parse(extra).expect_err(extra);
        assert!(err.contains(&format!("field `{field}`")), "{extra}: {err}");
        err
    }

    const LLAMA3: &str = r#""factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192"#;

    fn llama3_scaling() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    #[test]
    fn head_fields_default_to_armorm_values() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.num_objectives, 19);
        assert_eq!(cfg.gating_temperature, 10.0);
        assert_eq!(cfg.gating_hidden_dim, 1024);
        assert_eq!(cfg.gating_n_hidden, 3);
        assert_eq!(cfg.num_kv_heads(), 2);
        assert_eq!(cfg.head_dim(), 4);
        // Neither layout gives rope_theta: transformers' LlamaConfig default.
        assert_eq!(
            cfg.rope,
            Rope {
                theta: 10_000.0,
                scaling: RopeScaling::Default
            }
        );
    }

    #[test]
    fn both_rope_layouts_read_the_same() {
        let old = parse(&format!(
            r#""rope_theta": 500000.0, "rope_scaling": {{"type": "llama3", {LLAMA3}}}"#
        ))
        .unwrap();
        let new = parse(&format!(
            r#""rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, {LLAMA3}}}"#
        ))
        .unwrap();
        let both = parse(&format!(
            r#""rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3", {LLAMA3}}},
               "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, {LLAMA3}}}"#
        ))
        .unwrap();
        let want = Rope {
            theta: 500_000.0,
            scaling: llama3_scaling(),
        };
        assert_eq!((old.rope, new.rope, both.rope), (want, want, want));

        let plain_new =
            parse(r#""rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}"#)
                .unwrap();
        let plain_old = parse(r#""rope_theta": 500000.0, "rope_scaling": null"#).unwrap();
        assert_eq!(plain_new.rope, plain_old.rope);
        assert_eq!(plain_new.rope.theta, 500_000.0);
    }

    #[test]
    fn llama3_original_context_falls_back_as_transformers_does() {
        let scaling = |extra: &str| {
            parse(&format!(
                r#""rope_parameters": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0}}{extra}"#
            ))
            .map(|c| c.rope.scaling)
        };
        let original = |s: RopeScaling| match s {
            RopeScaling::Llama3 {
                original_max_position_embeddings,
                ..
            } => original_max_position_embeddings,
            RopeScaling::Default => 0,
        };
        assert_eq!(original(scaling("").unwrap()), 32);
        assert_eq!(
            original(scaling(r#", "original_max_position_embeddings": 16"#).unwrap()),
            16
        );
    }

    #[test]
    fn conflicting_layouts_are_refused() {
        let err = refused(
            r#""rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}"#,
            "rope_parameters.rope_theta",
        );
        assert!(err.contains("10000") && err.contains("500000"), "{err}");
        refused(
            &format!(
                r#""rope_scaling": {{"rope_type": "llama3", {LLAMA3}}},
                   "rope_parameters": {{"rope_type": "default", "rope_theta": 500000.0}}"#
            ),
            "rope_parameters",
        );
        refused(
            r#""rope_scaling": {"rope_type": "llama3", "type": "linear", "factor": 2.0}"#,
            "rope_scaling.type",
        );
        refused(
            &format!(
                r#""original_max_position_embeddings": 4096,
                   "rope_parameters": {{"rope_type": "llama3", {LLAMA3}}}"#
            ),
            "rope_parameters.original_max_position_embeddings",
        );
    }

    #[test]
    fn unknown_rope_types_and_fields_are_refused() {
        let err = refused(
            r#""rope_parameters": {"rope_type": "yarn", "factor": 4.0}"#,
            "rope_parameters.rope_type",
        );
        assert!(err.contains("\"yarn\" is not supported"), "{err}");
        let err = refused(
            r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
            "rope_scaling.rope_type",
        );
        assert!(err.contains("rope_scaling type \"linear\""), "{err}");
        refused(
            r#""rope_parameters": {"rope_type": "llama3", "factor": 8.0}"#,
            "rope_parameters.low_freq_factor",
        );
        refused(
            r#""rope_parameters": {"rope_type": "default", "factor": 8.0}"#,
            "rope_parameters.factor",
        );
        refused(
            r#""rope_parameters": {"rope_type": "default", "mrope_section": [1, 2]}"#,
            "rope_parameters.mrope_section",
        );
        refused(
            r#""rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}"#,
            "rope_parameters.partial_rotary_factor",
        );
        refused(
            r#""rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 4.0}"#,
            "rope_parameters",
        );
    }

    #[test]
    fn fields_that_change_the_math_are_refused() {
        for (extra, field) in [
            (r#""hidden_act": "gelu""#, "hidden_act"),
            (r#""attention_bias": true"#, "attention_bias"),
            (r#""mlp_bias": true"#, "mlp_bias"),
            (r#""model_type": "mistral""#, "model_type"),
            (r#""sliding_window": 4096"#, "sliding_window"),
            (
                r#""use_sliding_window": true, "sliding_window": 4096"#,
                "use_sliding_window",
            ),
            (r#""partial_rotary_factor": 0.5"#, "partial_rotary_factor"),
            (
                r#""layer_types": ["full_attention", "sliding_attention"]"#,
                "layer_types",
            ),
            (
                r#""attn_logit_softcapping": 50.0"#,
                "attn_logit_softcapping",
            ),
            (
                r#""final_logit_softcapping": 30.0"#,
                "final_logit_softcapping",
            ),
            (r#""query_pre_attn_scalar": 256"#, "query_pre_attn_scalar"),
            (
                r#""attention_multiplier": 0.015625"#,
                "attention_multiplier",
            ),
            (r#""use_qk_norm": true"#, "use_qk_norm"),
            (r#""num_local_experts": 8"#, "num_local_experts"),
            (r#""head_dim": 3"#, "head_dim"),
            (r#""num_attention_heads": 3"#, "num_attention_heads"),
        ] {
            refused(extra, field);
        }
    }

    #[test]
    fn neutral_values_of_those_fields_are_accepted() {
        let cfg = parse(
            r#""hidden_act": "silu", "attention_bias": false, "mlp_bias": false, "model_type": "llama",
               "sliding_window": 4096, "use_sliding_window": false, "partial_rotary_factor": 1.0,
               "layer_types": ["full_attention"], "attn_logit_softcapping": null, "head_dim": 8,
               "num_local_experts": 0, "pretraining_tp": 1, "architectures": ["X"]"#,
        )
        .unwrap();
        // An explicit head_dim other than hidden_size / heads is honoured by the backbone.
        assert_eq!(cfg.head_dim(), 8);
    }

    #[test]
    fn errors_name_the_field_without_serde_positions() {
        let err = parse(r#""rope_parameters": {"rope_type": "dynamic"}"#).unwrap_err();
        assert_eq!(
            err,
            "field `rope_parameters.rope_type`: rope_parameters type \"dynamic\" is not supported \
             (supported: default, llama3)"
        );
        // Missing and mistyped fields keep serde's own message.
        let err = ArmoRMConfig::from_json(r#"{"hidden_size": 8}"#).unwrap_err();
        assert!(err.contains("missing field `intermediate_size`"), "{err}");
    }
}
