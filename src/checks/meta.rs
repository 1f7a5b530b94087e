//! What the checks know about a tensor ([`Meta`]: dtype, device, shape, strides, byte range),
//! described by the entry points from libtorch tensors; and whether a set of tensors is the
//! slice kernels' input.

/// A tensor's element type, as far as the checks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    F16,
    BF16,
    U8,
    I8,
    I16,
    I32,
    I64,
    Bool,
    Other,
}

impl Dtype {
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16)
    }

    /// The torch spelling, as users see it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "torch.float32",
            Dtype::F64 => "torch.float64",
            Dtype::F16 => "torch.float16",
            Dtype::BF16 => "torch.bfloat16",
            Dtype::U8 => "torch.uint8",
            Dtype::I8 => "torch.int8",
            Dtype::I16 => "torch.int16",
            Dtype::I32 => "torch.int32",
            Dtype::I64 => "torch.int64",
            Dtype::Bool => "torch.bool",
            Dtype::Other => "an unsupported dtype",
        }
    }
}

/// A tensor's device. (`Debug` prints as libtorch's Rust binding does: `Cpu`, `Cuda(0)`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    Cpu,
    Cuda(usize),
    Mps,
    Vulkan,
}

/// What the checks need to know about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub dtype: Dtype,
    pub dev: Dev,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
    /// Address of the first element, and `numel × element size` bytes from there.
    pub start: usize,
    pub nbytes: usize,
    pub contiguous: bool,
    pub sparse: bool,
}

impl Meta {
    /// The byte range `[start, start + nbytes)` used by the aliasing checks.
    pub fn range(&self) -> (usize, usize) {
        (self.start, self.start + self.nbytes)
    }

    /// True when two elements may share memory (an `expand()`ed view, a stride-0 or
    /// interleaved layout): an in-place update would then depend on evaluation order.
    /// Sufficient test: with the dims of size > 1 sorted by stride, each stride must reach
    /// past the previous dim's whole extent. (A few exotic non-overlapping layouts are
    /// refused too.)
    pub fn self_overlapping(&self) -> bool {
        let mut dims: Vec<(i64, i64)> = self
            .stride
            .iter()
            .copied()
            .zip(self.size.iter().copied())
            .filter(|&(_, size)| size > 1)
            .collect();
        dims.sort_unstable();
        let mut extent = 1i64;
        for (stride, size) in dims {
            if stride < extent {
                return true;
            }
            extent = stride.saturating_mul(size);
        }
        false
    }
}

/// True when every tensor is a contiguous CPU tensor of `dtype`: the slice kernels' input.
pub fn fast_eligible(ts: &[&Meta], dtype: Dtype) -> bool {
    ts.iter()
        .all(|t| t.dev == Dev::Cpu && t.dtype == dtype && t.contiguous)
}
