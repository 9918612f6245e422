//! What the device self-checks measure: the largest difference between a kernel's output and its
//! reference, read on the host so that a NaN cannot hide.

use candle_core::{DType, Result, Tensor};

/// The largest |x| over a tensor, folded on the host; NaN anywhere gives infinity. candle's `max` on
/// CUDA folds with `fmaxf`, which skips NaN (and gives -inf when every value is NaN), so a kernel that
/// wrote NaN would pass a check built on it. Self-check tensors are a few MB, so the copy is cheap.
pub fn largest_abs(t: &Tensor) -> Result<f32> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().fold(0f32, |worst, &x| {
        if x.is_nan() {
            f32::INFINITY
        } else {
            worst.max(x.abs())
        }
    }))
}

/// max |a - b|, NaN in either as infinity.
pub fn abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    largest_abs(&(a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?)
}

/// max |a - b| / max(1, max |b|), NaN in either (or an infinite reference) as infinity.
pub fn relative_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = largest_abs(b)?;
    if !scale.is_finite() {
        return Ok(f32::INFINITY);
    }
    Ok(abs_diff(a, b)? / scale.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn differences_are_the_largest_absolute_ones() {
        let (a, b) = (t(&[1.0, -2.0, 3.0]), t(&[1.5, -2.0, 0.0]));
        assert_eq!(abs_diff(&a, &b).unwrap(), 3.0);
        assert_eq!(relative_diff(&a, &b).unwrap(), 1.5); // 3 / max(1, 2)
        let small = t(&[0.1, 0.2]);
        assert_eq!(relative_diff(&small, &small).unwrap(), 0.0);
    }

    #[test]
    fn a_nan_anywhere_fails_the_check() {
        let good = t(&[1.0, 2.0, 3.0]);
        for bad in [t(&[1.0, f32::NAN, 3.0]), t(&[f32::NAN; 3])] {
            assert_eq!(abs_diff(&bad, &good).unwrap(), f32::INFINITY);
            assert_eq!(relative_diff(&bad, &good).unwrap(), f32::INFINITY);
            // A reference that went NaN must not scale the difference away either.
            assert_eq!(relative_diff(&good, &bad).unwrap(), f32::INFINITY);
        }
        let inf = t(&[1.0, f32::INFINITY]);
        assert_eq!(
            relative_diff(&good.narrow(0, 0, 2).unwrap(), &inf).unwrap(),
            f32::INFINITY
        );
    }
}
