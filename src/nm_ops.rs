//! The entry points of the compressed N:M layers on libtorch tensors (the operators
//! `nm_compress`, `nm_compress_int8`, `nm_decompress` and `nm_linear`): check the tensors against the layout
//! ([`crate::nm_linear`]), hand their memory to the slice kernels, and convert the result. CPU
//! only: the layout is read by the CPU kernels.

use tch::{Device, Kind, Tensor};

use crate::error::{CastError, Result};
use crate::generic::torch_err;
use crate::nm_linear::{
    check_scales, compress, compress_int8, decompress_into, dequantize_into,
    nm_linear_bf16_parallel, nm_linear_int8_bf16_parallel, nm_linear_parallel, Bf16, NmLayout,
};
use crate::ops::{guarded, slice_mut};

/// The layout of a compressed N:M weight from the operator's integer arguments.
fn nm_layout(rows: i64, cols: i64, n: i64, m: i64) -> Result<NmLayout> {
    let size = |v: i64, name: &'static str| {
        usize::try_from(v)
            .map_err(|_| CastError::value(name, format!("expected a size >= 0, got {v}")))
    };
    NmLayout::new(
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

/// The layout of a compressed weight whose `values`, `index` and `scales` tensors are checked
/// against it (as tensors: device, dtype, length; whether the values take scales is
/// [`check_scales`]'s rule, applied by [`scales_rule`]).
fn compressed_args(
    values: &Tensor,
    index: &Tensor,
    scales: Option<&Tensor>,
    rows: i64,
    cols: i64,
    n: i64,
    m: i64,
) -> Result<NmLayout> {
    let layout = nm_layout(rows, cols, n, m)?;
    check_flat(
        values,
        "values",
        &[Kind::Float, Kind::BFloat16, Kind::Int8],
        layout.values_len(),
        "float32, bfloat16 or int8",
    )?;
    check_flat(index, "index", &[Kind::Int], layout.index_len(), "int32")?;
    if let Some(s) = scales {
        check_flat(s, "scales", &[Kind::Float], layout.rows, "float32")?;
    }
    Ok(layout)
}

/// [`check_scales`] for values of dtype `kind` (a checked values dtype).
fn scales_rule(
    kind: Kind,
    layout: &NmLayout,
    scales: Option<&Tensor>,
    required: bool,
) -> Result<()> {
    // Only presence and length matter to the rule, so an empty stand-in of the right length.
    let stand_in = scales.map(|_| vec![0f32; layout.rows]);
    let s = stand_in.as_deref();
    match kind {
        Kind::Int8 => check_scales::<i8>(layout, s, required),
        Kind::BFloat16 => check_scales::<Bf16>(layout, s, required),
        _ => check_scales::<f32>(layout, s, required),
    }
}

/// The weight argument of the compress operators: a 2-D float32 or bfloat16 CPU tensor.
fn weight_layout(w: &Tensor, n: i64, m: i64) -> Result<NmLayout> {
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
    Ok(layout)
}

/// Compresses a 2-D `[rows, cols]` weight that is exactly N:M along its rows (float32 or
/// bfloat16, CPU): `(values, index)` as in [`crate::nm_linear`] (values in the weight's dtype,
/// index int32).
pub fn nm_compress(w: &Tensor, n: i64, m: i64) -> Result<(Tensor, Tensor)> {
    let layout = weight_layout(w, n, m)?;
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

/// Compresses a 2-D `[rows, cols]` weight that is exactly N:M along its rows (float32 or
/// bfloat16, CPU; bfloat16 is widened exactly) into int8 values with one float32 scale per row
/// (`nm_linear::compress_int8`: symmetric per-row quantization): `(values int8, index int32,
/// scales float32 [rows])`.
pub fn nm_compress_int8(w: &Tensor, n: i64, m: i64) -> Result<(Tensor, Tensor, Tensor)> {
    let layout = weight_layout(w, n, m)?;
    guarded(|| {
        let e = torch_err("nm_compress_int8");
        let w = w
            .f_to_kind(Kind::Float)
            .map_err(&e)?
            .f_contiguous()
            .map_err(&e)?;
        let cpu = |len: usize, kind: Kind| Tensor::f_empty([len as i64], (kind, Device::Cpu));
        let values_t = cpu(layout.values_len(), Kind::Int8).map_err(&e)?;
        let index_t = cpu(layout.index_len(), Kind::Int).map_err(&e)?;
        let scales_t = cpu(layout.rows, Kind::Float).map_err(&e)?;
        // SAFETY: `w` is a contiguous f32 CPU tensor; the outputs are fresh, contiguous and of
        // the lengths written below.
        unsafe {
            let (v, idx, s) = compress_int8(&layout, slice_mut::<f32>(&w))?;
            slice_mut::<i8>(&values_t).copy_from_slice(&v);
            slice_mut::<u32>(&index_t).copy_from_slice(&idx);
            slice_mut::<f32>(&scales_t).copy_from_slice(&s);
        }
        Ok((values_t, index_t, scales_t))
    })
}

/// The dense `[rows, cols]` weight of a compressed one, in the values' dtype; for int8 values
/// with their `scales`, the dequantized float32 weight `q · scale` (without them, the stored
/// integers as an int8 tensor).
#[allow(clippy::too_many_arguments)]
pub fn nm_decompress(
    values: &Tensor,
    index: &Tensor,
    rows: i64,
    cols: i64,
    n: i64,
    m: i64,
    scales: Option<&Tensor>,
) -> Result<Tensor> {
    let layout = compressed_args(values, index, scales, rows, cols, n, m)?;
    scales_rule(values.kind(), &layout, scales, false)?;
    guarded(|| {
        let kind = match scales {
            Some(_) => Kind::Float,
            None => values.kind(),
        };
        let out = Tensor::f_empty([rows, cols], (kind, Device::Cpu))
            .map_err(torch_err("nm_decompress"))?;
        // SAFETY: checked contiguous CPU tensors of these element types; `out` is fresh.
        unsafe {
            let idx = slice_mut::<u32>(index);
            match (values.kind(), scales) {
                (Kind::Float, _) => decompress_into(
                    &layout,
                    slice_mut::<f32>(values),
                    idx,
                    slice_mut::<f32>(&out),
                )?,
                (Kind::BFloat16, _) => decompress_into(
                    &layout,
                    slice_mut::<Bf16>(values),
                    idx,
                    slice_mut::<Bf16>(&out),
                )?,
                (_, Some(s)) => dequantize_into(
                    &layout,
                    slice_mut::<i8>(values),
                    idx,
                    slice_mut::<f32>(s),
                    slice_mut::<f32>(&out),
                )?,
                (_, None) => {
                    decompress_into(&layout, slice_mut::<i8>(values), idx, slice_mut::<i8>(&out))?
                }
            }
        }
        Ok(out)
    })
}

/// `input · Wᵀ + bias` for a compressed N:M weight `W` (`[rows, cols]`): `input` is
/// `[..., cols]` (float32 or bfloat16, any strides; products and sums in float32), the result
/// `[..., rows]` in the input's dtype. On torch's thread pool. int8 values take their
/// `scales` (float32, one per row: `W = q · scale`), float values none.
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
    scales: Option<&Tensor>,
) -> Result<Tensor> {
    let layout = compressed_args(values, index, scales, rows, cols, n, m)?;
    scales_rule(values.kind(), &layout, scales, true)?;
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
        // widening would double the bytes read), and so do bf16 inputs to int8 weights (AMX
        // multiplies them with the int8 values widened to bf16 from a few rows on; below,
        // `nm_linear_int8_bf16_parallel` widens them to f32); anything else is computed in
        // f32. Never quantized activations.
        let bf16_inputs =
            input.kind() == Kind::BFloat16 && matches!(values.kind(), Kind::BFloat16 | Kind::Int8);
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
            let ss = scales.map(|s| &*slice_mut::<f32>(s));
            let batch = batch as usize;
            if bf16_inputs {
                let xs = slice_mut::<Bf16>(&x);
                match (values.kind(), ss) {
                    // (`scales_rule`: int8 values come with their scales, float ones without.)
                    (Kind::Int8, Some(ss)) => nm_linear_int8_bf16_parallel(
                        &layout,
                        slice_mut(values),
                        idx,
                        ss,
                        bs,
                        xs,
                        batch,
                        ys,
                    )?,
                    _ => {
                        nm_linear_bf16_parallel(&layout, slice_mut(values), idx, bs, xs, batch, ys)?
                    }
                }
            } else {
                let xs = slice_mut::<f32>(&x);
                match values.kind() {
                    Kind::Float => nm_linear_parallel::<f32>(
                        &layout,
                        slice_mut(values),
                        idx,
                        ss,
                        bs,
                        xs,
                        batch,
                        ys,
                    )?,
                    Kind::BFloat16 => nm_linear_parallel::<Bf16>(
                        &layout,
                        slice_mut(values),
                        idx,
                        ss,
                        bs,
                        xs,
                        batch,
                        ys,
                    )?,
                    _ => nm_linear_parallel::<i8>(
                        &layout,
                        slice_mut(values),
                        idx,
                        ss,
                        bs,
                        xs,
                        batch,
                        ys,
                    )?,
                }
            }
        }
        restore_shape(y)
    })
}
