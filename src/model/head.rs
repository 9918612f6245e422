//! ArmoRM's head: the regression layer, the gating network and the reward transform matrix.
//!
//! Always computed in f32 (from the checkpoint's bf16 weights), whatever the backbone's dtype: the head
//! reads two vectors per row, so precision costs nothing here.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::ArmoRMConfig;

/// `regression_layer.weight` (n_obj, hidden), no bias: one reward per objective.
#[derive(Debug, Clone)]
pub struct RegressionLayer {
    weight: Linear,
}

impl RegressionLayer {
    pub fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        Ok(Self {
            weight: candle_nn::linear_no_bias(cfg.hidden_size, cfg.num_objectives, vb)?,
        })
    }

    /// (n, hidden) -> (n, n_obj)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.weight.forward(xs)
    }
}

/// `gating.*`: `gating_n_hidden` × (Linear + ReLU), a last Linear to `num_objectives`, then
/// softmax(· / temperature) · logit_scale.
#[derive(Debug, Clone)]
pub struct GatingNetwork {
    layers: Vec<Linear>,
    logit_scale: Tensor,
    temperature: f64,
}

impl GatingNetwork {
    pub fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.gating_n_hidden + 1);
        let mut in_dim = cfg.hidden_size;
        for i in 0..=cfg.gating_n_hidden {
            let out_dim = if i < cfg.gating_n_hidden {
                cfg.gating_hidden_dim
            } else {
                cfg.num_objectives
            };
            layers.push(candle_nn::linear(
                in_dim,
                out_dim,
                vb.pp(format!("layers.{i}")),
            )?);
            in_dim = out_dim;
        }
        Ok(Self {
            layers,
            logit_scale: vb.get(1, "logit_scale")?,
            temperature: cfg.gating_temperature,
        })
    }

    /// (n, hidden) -> (n, n_obj)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if i < last {
                xs = xs.relu()?;
            }
        }
        let probs = candle_nn::ops::softmax_last_dim(&(xs / self.temperature)?)?;
        probs.broadcast_mul(&self.logit_scale)
    }
}

/// Everything the head yields for a batch of n rows.
#[derive(Debug, Clone)]
pub struct HeadOutput {
    pub rewards: Tensor,      // (n, n_obj)
    pub gating: Tensor,       // (n, n_obj)
    pub coefficients: Tensor, // (n, n_obj)
    pub score: Tensor,        // (n,)
}

/// Every output of the model for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowScore {
    pub score: f32,
    pub rewards: Vec<f32>,
    pub gating: Vec<f32>,
    pub coefficients: Vec<f32>,
    pub num_tokens: usize,
}

impl HeadOutput {
    /// The batch's rows one by one; `lens`: each row's tokens.
    pub fn rows(&self, lens: &[usize]) -> Result<Vec<RowScore>> {
        let rows = |t: &Tensor| t.to_vec2::<f32>();
        let (rewards, gating, coefficients) = (
            rows(&self.rewards)?,
            rows(&self.gating)?,
            rows(&self.coefficients)?,
        );
        let score = self.score.to_vec1::<f32>()?;
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
}

/// The three parts of the head under their published names.
#[derive(Debug, Clone)]
pub struct ArmoRMHead {
    regression_layer: RegressionLayer,
    gating: GatingNetwork,
    reward_transform_matrix: Tensor, // (n_obj, n_obj)
}

impl ArmoRMHead {
    /// `vb` at the checkpoint's root, in f32.
    pub fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        let n = cfg.num_objectives;
        Ok(Self {
            regression_layer: RegressionLayer::load(vb.pp("regression_layer"), cfg)?,
            gating: GatingNetwork::load(vb.pp("gating"), cfg)?,
            reward_transform_matrix: vb.get((n, n), "reward_transform_matrix")?,
        })
    }

    /// `last` and `gate`: normalized hidden states (n, hidden) at each row's last token and gating token.
    pub fn forward(&self, last: &Tensor, gate: &Tensor) -> Result<HeadOutput> {
        let rewards = self.regression_layer.forward(last)?; // (n, n_obj)
        let gating = self.gating.forward(gate)?; // (n, n_obj)
        let coefficients = gating.matmul(&self.reward_transform_matrix.t()?)?; // (n, n_obj)
        let score = (&rewards * &coefficients)?.sum(D::Minus1)?; // (n,)
        Ok(HeadOutput {
            rewards,
            gating,
            coefficients,
            score,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn cfg() -> ArmoRMConfig {
        serde_json::from_str(
            r#"{"hidden_size": 2, "intermediate_size": 4, "num_hidden_layers": 1,
                "num_attention_heads": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 8,
                "vocab_size": 4, "num_objectives": 2, "gating_temperature": 2.0,
                "gating_hidden_dim": 3, "gating_n_hidden": 1}"#,
        )
        .unwrap()
    }

    /// A head small enough to compute by hand.
    #[test]
    fn head_math_matches_hand_computation() {
        let dev = Device::Cpu;
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
        let mut w = HashMap::new();
        w.insert(
            "regression_layer.weight".to_string(),
            t(&[1., 0., 0., 2.], &[2, 2]),
        );
        w.insert(
            "gating.layers.0.weight".to_string(),
            t(&[1., 0., 0., 1., -1., -1.], &[3, 2]),
        );
        w.insert("gating.layers.0.bias".to_string(), t(&[0., 0., 0.], &[3]));
        w.insert(
            "gating.layers.1.weight".to_string(),
            t(&[1., 0., 0., 0., 1., 0.], &[2, 3]),
        );
        w.insert("gating.layers.1.bias".to_string(), t(&[0., 0.], &[2]));
        w.insert("gating.logit_scale".to_string(), t(&[3.], &[1]));
        w.insert(
            "reward_transform_matrix".to_string(),
            t(&[1., 1., 0., 1.], &[2, 2]),
        );
        let vb = VarBuilder::from_tensors(w, DType::F32, &dev);
        let head = ArmoRMHead::load(vb, &cfg()).unwrap();

        let last = t(&[0.5, 0.25], &[1, 2]);
        let gate = t(&[2.0, -1.0], &[1, 2]);
        let out = head.forward(&last, &gate).unwrap();
        // rewards = (0.5, 0.5); hidden = relu(2, -1, -1) = (2, 0, 0); logits = (2, 0);
        // gating = softmax((1, 0)) * 3; coefficients = gating · Tᵀ = (g0 + g1, g1).
        let e = 1f32.exp();
        let (g0, g1) = (3. * e / (e + 1.), 3. / (e + 1.));
        let approx = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(approx(
            out.rewards.flatten_all().unwrap().to_vec1().unwrap(),
            vec![0.5, 0.5]
        ));
        assert!(approx(
            out.gating.flatten_all().unwrap().to_vec1().unwrap(),
            vec![g0, g1]
        ));
        assert!(approx(
            out.coefficients.flatten_all().unwrap().to_vec1().unwrap(),
            vec![g0 + g1, g1]
        ));
        let score: Vec<f32> = out.score.to_vec1().unwrap();
        assert!((score[0] - (0.5 * (g0 + g1) + 0.5 * g1)).abs() < 1e-6);
    }
}
