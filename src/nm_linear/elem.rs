//! The element types a compressed weight is stored in: f32, bf16 as its bits ([`Bf16`]) and
//! int8 (with one f32 scale per output row, `quant`), with what the packing and the kernels
//! need of them.

/// A stored weight element: f32, bf16 as its bits, or int8.
pub trait NmElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    /// Stored as interleaved pairs of slots ([`NmLayout::value_offset`]): the 2-byte types.
    const PAIRED: bool;
    /// The stored values are integers that need their row's scale (`y = scale · Σ q·x`).
    const QUANTIZED: bool = false;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    fn is_zero(self) -> bool;
}

impl NmElem for f32 {
    const ZERO: Self = 0.0;
    const PAIRED: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn is_zero(self) -> bool {
        self == 0.0
    }
}

/// bf16 bits (what torch stores for `torch.bfloat16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl NmElem for Bf16 {
    const ZERO: Self = Bf16(0);
    const PAIRED: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    fn from_f32(x: f32) -> Self {
        Bf16(crate::half::f32_to_bf16(x))
    }
    fn is_zero(self) -> bool {
        self.0 & 0x7fff == 0
    }
}

/// int8: a quantized value `q` in [-127, 127] (the weight is `q · scale` of its row). Stored in
/// the f32 slot order (not paired): the kernels widen 8 or 16 of them at once, exactly.
impl NmElem for i8 {
    const ZERO: Self = 0;
    const PAIRED: bool = false;
    const QUANTIZED: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    /// Rounds half to even and saturates at ±127 (the symmetric range: -128 has no positive
    /// counterpart); NaN becomes 0, but quantization refuses non-finite weights first.
    fn from_f32(x: f32) -> Self {
        x.round_ties_even().clamp(-127.0, 127.0) as i8
    }
    fn is_zero(self) -> bool {
        self == 0
    }
}
