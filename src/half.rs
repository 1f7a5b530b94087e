//! bfloat16 and IEEE float16 ⇄ f32 conversions, bit-exact with PyTorch's CPU conversions,
//! for the fused bf16/fp16 AdamS path (load in f32, compute in f32, round once per stored
//! value).
//!
//! Both directions are branch-free integer/float arithmetic that LLVM vectorises inside the
//! kernels' `simd::dispatch` (AVX-512 / AVX2 builds of the same code). Rounding is to nearest,
//! ties to even, as torch's `c10::BFloat16` and `c10::Half` (FP16 library) do:
//!
//! * `f32 → bf16`: add `0x7FFF + lsb` to the bits and keep the top half; NaN becomes `0x7FC0`
//!   (torch's canonical bf16 NaN; the sign and payload are dropped).
//! * `f32 → f16`: Maratyszcza's FP16 `fp16_ieee_from_fp32_value` (what `c10::Half` uses):
//!   the float hardware rounds the mantissa by adding a power of two chosen from the exponent,
//!   subnormals and overflow to ±inf included; NaN becomes `0x7E00` with the input's sign.
//! * `bf16 → f32` is a shift; `f16 → f32` is FP16's `fp16_ieee_to_fp32_value` (exact).

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 → bf16 bits, round to nearest even; NaN → `0x7FC0`.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7FC0
    } else {
        rounded
    }
}

/// IEEE binary16 bits → f32 (exact).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let w = (h as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);
    // Normal numbers (and inf/NaN): re-bias the exponent by scaling with 2^-112.
    let exp_offset: u32 = 0xE0 << 23;
    let normalized = f32::from_bits((two_w >> 4) + exp_offset) * f32::from_bits(0x0780_0000); // 2^-112
                                                                                              // Subnormals: the mantissa as the fraction of 0.5 · 2^1, minus 0.5.
    let magic_mask: u32 = 126 << 23;
    let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - 0.5;
    let cutoff: u32 = 1 << 27;
    let bits = if two_w < cutoff {
        denormalized.to_bits()
    } else {
        normalized.to_bits()
    };
    f32::from_bits(sign | bits)
}

/// f32 → IEEE binary16 bits, round to nearest even (subnormals, overflow to ±inf);
/// NaN → `0x7E00` with the input's sign.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (x.abs() * scale_to_inf) * scale_to_zero;
    let w = x.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16)
        | if shl1_w > 0xFF00_0000 {
            0x7E00
        } else {
            nonsign
        }) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of binary16 bits, decoded field by field in f64 (the reference).
    fn f16_value(h: u16) -> f64 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = ((h >> 10) & 0x1F) as i32;
        let man = (h & 0x3FF) as f64;
        match exp {
            0 => sign * man * 2f64.powi(-24),
            31 if man == 0.0 => sign * f64::INFINITY,
            31 => f64::NAN,
            e => sign * (1.0 + man / 1024.0) * 2f64.powi(e - 15),
        }
    }

    /// Round-to-nearest-even of `x` to binary16 by search over the 65536 encodings: the
    /// nearest finite value, ties to the even mantissa; beyond the largest finite value plus
    /// half an ulp (65520), infinity.
    fn f16_reference(x: f32, table: &[(f64, u16)]) -> u16 {
        let v = x as f64;
        if x.is_nan() {
            return if x.is_sign_negative() { 0xFE00 } else { 0x7E00 };
        }
        if v.abs() >= 65520.0 {
            return if v < 0.0 { 0xFC00 } else { 0x7C00 };
        }
        // `table` holds the non-negative finite encodings sorted by value.
        let a = v.abs();
        let i = table.partition_point(|&(t, _)| t < a);
        let pick = if i == 0 {
            table[0].1
        } else if i == table.len() {
            table[i - 1].1
        } else {
            let (lo, hi) = (table[i - 1], table[i]);
            let (dl, dh) = (a - lo.0, hi.0 - a);
            if dl < dh || (dl == dh && lo.1 & 1 == 0) {
                lo.1
            } else {
                hi.1
            }
        };
        pick | if x.is_sign_negative() { 0x8000 } else { 0 }
    }

    #[test]
    fn f16_to_f32_is_exact_for_every_encoding() {
        for h in 0..=u16::MAX {
            let got = f16_to_f32(h) as f64;
            let want = f16_value(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got, want, "{h:#06x}");
                assert_eq!(
                    f16_to_f32(h).is_sign_negative(),
                    h & 0x8000 != 0,
                    "{h:#06x}"
                );
            }
        }
    }

    #[test]
    fn f32_to_f16_rounds_to_nearest_even() {
        let mut table: Vec<(f64, u16)> = (0..0x7C00u16).map(|h| (f16_value(h), h)).collect();
        table.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        // Every f16 value, the midpoints between neighbours (ties), their f32 neighbours, and
        // a stride through all f32 bit patterns.
        let mut xs: Vec<f32> = Vec::new();
        for w in table.windows(2) {
            let mid = ((w[0].0 + w[1].0) / 2.0) as f32; // exact: f16 values have few bits
            xs.extend([
                w[0].0 as f32,
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ]);
        }
        xs.extend([
            65504.0,
            65519.99,
            65520.0,
            1e10,
            f32::INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            1e-45,
        ]);
        xs.extend((0..u32::MAX / 9973).map(|i| f32::from_bits(i * 9973)));
        for &x in &xs {
            for x in [x, -x] {
                assert_eq!(
                    f32_to_f16(x),
                    f16_reference(x, &table),
                    "{x:e} ({:#010x})",
                    x.to_bits()
                );
            }
        }
    }

    #[test]
    fn bf16_round_trip_and_rounding() {
        for h in 0..=u16::MAX {
            let x = bf16_to_f32(h);
            if x.is_nan() {
                assert_eq!(f32_to_bf16(x), 0x7FC0);
            } else {
                assert_eq!(f32_to_bf16(x), h, "{h:#06x}");
            }
        }
        // Ties go to the even mantissa; just above a tie goes up; overflow rounds to inf.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80); // 1 + 2^-8: tie, even below
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82); // tie, even above
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        // Against f64 rounding on a stride through every f32 pattern.
        for i in 0..u32::MAX / 7919 {
            let x = f32::from_bits(i * 7919);
            if x.is_nan() || x.is_infinite() {
                continue;
            }
            let h = f32_to_bf16(x);
            // Sign-magnitude: the encodings next to h are the values next to it in magnitude.
            let (lo, hi) = (h.wrapping_sub(1), h.wrapping_add(1));
            let d = (bf16_to_f32(h) as f64 - x as f64).abs();
            for n in [lo, hi] {
                let y = bf16_to_f32(n) as f64;
                if y.is_finite() && bf16_to_f32(h).is_finite() {
                    assert!(d <= (y - x as f64).abs(), "{x:e}: {h:#06x} not nearest");
                }
            }
        }
    }
}
