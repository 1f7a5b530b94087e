//! The entry points of the compressed N:M layers on libtorch tensors (the operators
//! `nm_compress`, `nm_decompress` and `nm_linear`): check the tensors against the layout
//! ([`crate::nm_linear`]), hand their memory to the slice kernels, and convert the result. CPU
//! only: the layout is read by the CPU kernels.

use tch::{Device, Kind, Tensor};

use crate::error::{CastError, Result};
use crate::generic::torch_err;
use crate::ops::{guarded, slice_mut};

/// The layout of a compressed N:M weight from the operator's integer arguments.
fn nm_layout(rows: i64, cols: i64, n: i64, m: i64) -> Result<crate::nm_linear::NmLayout> {
    let size = |v: i64, name: &'static str| {
        usize::try_from(v)
            .map_err(|_| CastError::value(name, format!("expected a size >= 0, got {v}")))
    };
    crate::nm_linear::NmLayout::new(
        size(rows, "rows")?,
        size(cols, "cols")?,
        size(n, "n")?,
        size(m, "m")?,
    )
}

/// A CPU, contiguous tensor of one of `kinds` with `numel` elements, or an error naming `name`.
fn check_flat(
    t: &Tensor,
    name: &'static str,
    kinds: &[Kind],
    numel: usize,
    what: &str,
) -> Result<()> {
    if t.device() != Device::Cpu {
        return Err(CastError::value(
            name,
            format!(
                "expected a CPU tensor (compressed N:M layers run on the CPU), got {:?}",
                t.device()
            ),
        ));
    }
    if !kinds.contains(&t.kind()) {
        return Err(CastError::type_(
            name,
            format!("expected dtype {what}, got {:?}", t.kind()),
        ));
    }
    if t.numel() != numel || !t.is_contiguous() {
        return Err(CastError::value(
            name,
            format!(
                "expected a contiguous tensor of {numel} elements, got shape {:?}",
                t.size()
            ),
        ));
    }
    Ok(())
}

/// The layout of a compressed weight whose `values` and `index` tensors are checked against it.
fn compressed_args(
    values: &Tensor,
    index: &Tensor,
    rows: i64,
    cols: i64,
    n: i64,
    m: i64,
) -> Result<crate::nm_linear::NmLayout> {
    let layout = nm_layout(rows, cols, n, m)?;
    check_flat(
        values,
        "values",
        &[Kind::Float, Kind::BFloat16],
        layout.values_len(),
        "float32 or bfloat16",
    )?;
    check_flat(index, "index", &[Kind::Int], layout.index_len(), "int32")?;
    Ok(layout)
}

/// Compresses a 2-D `[rows, cols]` weight that is exactly N:M along its rows (float32 or
/// bfloat16, CPU): `(values, index)` as in [`crate::nm_linear`] (values in the weight's dtype,
/// index int32).
pub fn nm_compress(w: &Tensor, n: i64, m: i64) -> Result<(Tensor, Tensor)> {
    use crate::nm_linear::{compress, Bf16};
    let size = w.size();
    if size.len() != 2 {
        return Err(CastError::value(
            "weight",
            format!("expected a 2-D [out, in] weight, got shape {size:?}"),
        ));
    }
    let layout = nm_layout(size[0], size[1], n, m)?;
    if w.device() != Device::Cpu || !matches!(w.kind(), Kind::Float | Kind::BFloat16) {
        return Err(CastError::type_(
            "weight",
            format!(
                "expected a float32 or bfloat16 CPU tensor, got {:?} on {:?}",
                w.kind(),
                w.device()
            ),
        ));
    }
    guarded(|| {
        let e = torch_err("nm_compress");
        let w = w.f_contiguous().map_err(&e)?;
        let (kind, values_len) = (w.kind(), layout.values_len() as i64);
        let index_t =
            Tensor::f_empty([layout.index_len() as i64], (Kind::Int, Device::Cpu)).map_err(&e)?;
        let values_t = Tensor::f_empty([values_len], (kind, Device::Cpu)).map_err(&e)?;
        // SAFETY: `w` is a contiguous CPU tensor of `kind`; the outputs are fresh, contiguous
        // and of the lengths written below.
        unsafe {
            let idx_out = slice_mut::<u32>(&index_t);
            if kind == Kind::Float {
                let (v, idx) = compress(&layout, slice_mut::<f32>(&w))?;
                slice_mut::<f32>(&values_t).copy_from_slice(&v);
                idx_out.copy_from_slice(&idx);
            } else {
                let (v, idx) = compress(&layout, slice_mut::<Bf16>(&w))?;
                slice_mut::<Bf16>(&values_t).copy_from_slice(&v);
                idx_out.copy_from_slice(&idx);
            }
        }
        Ok((values_t, index_t))
    })
}

/// The dense `[rows, cols]` weight of a compressed one.
pub fn nm_decompress(
    values: &Tensor,
    index: &Tensor,
    rows: i64,
    cols: i64,
    n: i64,
    m: i64,
) -> Result<Tensor> {
    use crate::nm_linear::{decompress_into, Bf16};
    let layout = compressed_args(values, index, rows, cols, n, m)?;
    guarded(|| {
        let out = Tensor::f_empty([rows, cols], (values.kind(), Device::Cpu))
            .map_err(torch_err("nm_decompress"))?;
        // SAFETY: checked contiguous CPU tensors of these element types; `out` is fresh.
        unsafe {
            let idx = slice_mut::<u32>(index);
            if values.kind() == Kind::Float {
                decompress_into(
                    &layout,
                    slice_mut::<f32>(values),
                    idx,
                    slice_mut::<f32>(&out),
                )?;
            } else {
                decompress_into(
                    &layout,
                    slice_mut::<Bf16>(values),
                    idx,
                    slice_mut::<Bf16>(&out),
                )?;
            }
        }
        Ok(out)
    })
}

/// `input · Wᵀ + bias` for a compressed N:M weight `W` (`[rows, cols]`): `input` is
/// `[..., cols]` (float32 or bfloat16, any strides; products and sums in float32), the result
/// `[..., rows]` in the input's dtype. On torch's thread pool.
///
/// The compressed kernels run at every batch size: the weight is never expanded (no dense
/// copy, not even for a long prompt). Measured on a 2-core AVX-512 BF16 VM, (4096, 4096)
/// (`./run bench inference --crossover`): against torch's matmul on the dense weight, f32
/// stays ahead up to 256 rows (1.2-1.3x there); bf16 inputs to bf16 weights tie near 64 rows
/// and fall to 0.83-0.85x at 256 (torch's bf16 GEMM needs no input shuffles). Expanding the
/// weight for many bf16 rows instead was measured slower still: the expansion into a fresh
/// dense tensor per call (about 40 ms for (4096, 4096) on one thread, half of it page faults)
/// costs more than the kernel loses.
#[allow(clippy::too_many_arguments)]
pub fn nm_linear(
    input: &Tensor,
    values: &Tensor,
    index: &Tensor,
    bias: Option<&Tensor>,
    rows: i64,
    cols: i64,
    n: i64,
    m: i64,
) -> Result<Tensor> {
    use crate::nm_linear::{nm_linear_bf16_parallel, nm_linear_parallel, Bf16};
    let layout = compressed_args(values, index, rows, cols, n, m)?;
    let shape = input.size();
    if shape.last() != Some(&cols) {
        return Err(CastError::value(
            "input",
            format!("expected a last dimension of {cols} (in_features), got shape {shape:?}"),
        ));
    }
    if input.device() != Device::Cpu {
        return Err(CastError::value(
            "input",
            format!("expected a CPU tensor, got {:?}", input.device()),
        ));
    }
    if !matches!(input.kind(), Kind::Float | Kind::BFloat16) {
        return Err(CastError::type_(
            "input",
            format!("expected dtype float32 or bfloat16, got {:?}", input.kind()),
        ));
    }
    if let Some(b) = bias {
        if b.size() != [rows]
            || b.device() != Device::Cpu
            || !matches!(b.kind(), Kind::Float | Kind::BFloat16)
        {
            return Err(CastError::value(
                "bias",
                format!(
                    "expected a float32 or bfloat16 CPU tensor of shape [{rows}], got {:?} {:?}",
                    b.kind(),
                    b.size()
                ),
            ));
        }
    }
    guarded(|| {
        let e = torch_err("nm_linear");
        let batch = if cols == 0 {
            0
        } else {
            input.numel() as i64 / cols
        };
        // bf16 inputs to bf16 weights stay bf16 (`vdpbf16ps` multiplies them as they are;
        // widening would double the bytes read); anything else is computed in f32.
        let bf16_inputs = input.kind() == Kind::BFloat16 && values.kind() == Kind::BFloat16;
        let x = input
            .f_reshape([batch, cols])
            .map_err(&e)?
            .f_to_kind(if bf16_inputs {
                Kind::BFloat16
            } else {
                Kind::Float
            })
            .map_err(&e)?
            .f_contiguous()
            .map_err(&e)?;
        // `[batch, rows]` float32 back to the input's leading dimensions and dtype.
        let restore_shape = |y: Tensor| -> Result<Tensor> {
            let mut out_shape = shape.clone();
            *out_shape.last_mut().expect("input has a last dimension") = rows;
            y.f_reshape(out_shape.as_slice())
                .map_err(&e)?
                .f_to_kind(input.kind())
                .map_err(&e)
        };
        let b = match bias {
            Some(b) => Some(
                b.f_to_kind(Kind::Float)
                    .map_err(&e)?
                    .f_contiguous()
                    .map_err(&e)?,
            ),
            None => None,
        };
        let y = Tensor::f_empty([batch, rows], (Kind::Float, Device::Cpu)).map_err(&e)?;
        // SAFETY: checked contiguous CPU tensors of these element types and lengths; `x` and
        // `b` are (possibly converted) inputs only read; `y` is fresh.
        unsafe {
            let (ys, idx) = (slice_mut::<f32>(&y), slice_mut::<u32>(index));
            let bs = b.as_ref().map(|b| &*slice_mut::<f32>(b));
            if bf16_inputs {
                nm_linear_bf16_parallel(
                    &layout,
                    slice_mut::<Bf16>(values),
                    idx,
                    bs,
                    slice_mut::<Bf16>(&x),
                    batch as usize,
                    ys,
                )?;
            } else if values.kind() == Kind::Float {
                nm_linear_parallel(
                    &layout,
                    slice_mut::<f32>(values),
                    idx,
                    bs,
                    slice_mut::<f32>(&x),
                    batch as usize,
                    ys,
                )?;
            } else {
                nm_linear_parallel(
                    &layout,
                    slice_mut::<Bf16>(values),
                    idx,
                    bs,
                    slice_mut::<f32>(&x),
                    batch as usize,
                    ys,
                )?;
            }
        }
        restore_shape(y)
    })
}
