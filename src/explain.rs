//! Which objectives drive a score: the top-K attributes by |coefficient|, and HelpSteer's 0–4 scale.

/// HelpSteer's objectives are the first five; the model card maps their rewards to 0–4 this way.
pub const HELPSTEER_OBJECTIVES: usize = 5;

/// Indices of the `k` largest |coefficients|, largest first; equal magnitudes keep model order.
pub fn top_k(coefficients: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..coefficients.len()).collect();
    idx.sort_by(|&a, &b| {
        coefficients[b]
            .abs()
            .total_cmp(&coefficients[a].abs())
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// A reward as the model card shows it: HelpSteer objectives on their 0–4 scale (reward × 5 − 0.5).
pub fn display_reward(index: usize, reward: f32, helpsteer_scale: bool) -> f32 {
    if helpsteer_scale && index < HELPSTEER_OBJECTIVES {
        reward * 5.0 - 0.5
    } else {
        reward
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_by_magnitude() {
        assert_eq!(top_k(&[0.1, -0.5, 0.3, 0.5], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[0.1], 3), vec![0]);
        assert!(top_k(&[0.1, 0.2], 0).is_empty());
    }

    #[test]
    fn helpsteer_scale_only_for_helpsteer() {
        assert_eq!(display_reward(0, 0.5, true), 2.0);
        assert_eq!(display_reward(5, 0.5, true), 0.5);
        assert_eq!(display_reward(0, 0.5, false), 0.5);
    }
}
