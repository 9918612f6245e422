//! Helpers of the model's unit tests: seeded random tensors (the same weights on every run, so that a
//! test's tolerance holds or fails for good instead of on one draw in a hundred; candle cannot seed its
//! CPU generator) and the largest difference between two tensors.

use candle_core::{Device, Shape, Tensor};

/// Normal(mean, std) values of `shape` from `seed` (splitmix64 and Box–Muller), f32 on the CPU.
pub(crate) fn seeded_randn(mean: f32, std: f32, shape: impl Into<Shape>, seed: u64) -> Tensor {
    let shape: Shape = shape.into();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // In (0, 1]: ln never sees 0.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            mean + std * normal as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("a CPU tensor of its own shape")
}

/// The largest |a - b| over every element; NaN anywhere gives infinity, so it fails any tolerance.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    super::check::abs_diff(a, b).expect("tensors of one shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_values_repeat_and_look_normal() {
        let a = seeded_randn(1.0, 2.0, 10_000, 7).to_vec1::<f32>().unwrap();
        assert_eq!(
            a,
            seeded_randn(1.0, 2.0, 10_000, 7).to_vec1::<f32>().unwrap()
        );
        assert_ne!(
            a,
            seeded_randn(1.0, 2.0, 10_000, 8).to_vec1::<f32>().unwrap()
        );
        let n = a.len() as f32;
        let mean = a.iter().sum::<f32>() / n;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
        assert!((mean - 1.0).abs() < 0.1, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.1, "std {}", var.sqrt());
    }
}
