"""int8 2:4 weights for CPU decoding: ``compress(model, dtype=torch.int8)`` and the int8
``NMLinear`` (values int8, one float32 scale per output row, activations float32 or bfloat16).

The quantization is checked exactly against a torch implementation of its rule; the kernel
against the plain-PyTorch layer on the dequantized weight, ``F.linear(x, q.float() *
scale[:, None], b)``, within a rounding bound (``assert_close_to_reference``), on the vector
kernels (this process) and the portable ones (``CAST_RS_NO_SIMD=1``, a subprocess), which must
also agree bit for bit. ``cargo test`` checks every dispatch level (portable, AVX2, AVX-512)
against an f64 reference and each other (``src/nm_linear/tests.rs``)."""

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cast_rs
from cast_rs import NMLinear

U = 2.0**-24  # float32 unit roundoff


def nm_linear_layer(in_f, out_f, pattern="2:4", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        lin.weight.mul_(cast_rs.nm_mask(lin.weight, pattern))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin


def ref_quantize(w):
    """The rule, in torch: per output row, scale = max|w| / 127 (1 where that is 0), q =
    round-half-to-even(w / scale) clamped to [-127, 127]."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def assert_close_to_reference(y, x, q, scale, b, kept, out_rounding=0.0):
    """``y`` (the kernel) against ``F.linear(x, q.float() * scale[:, None], b)`` in float32.

    The bound, with u = 2^-24 and T = Σ_c |scale·q·x| + |b| per output (in float64):
    - the kernel sums the kept products q·x (exact: q is an integer below 2^7, x a float32) in
      two FMA chains and adds them: kept + 1 roundings, each at most u·Σ|q·x|; then one FMA
      scale·S + b rounds once more: |kernel - exact| <= (kept + 2)·u·T;
    - the reference rounds each dequantized weight q·scale once (u·|w|), each product once and
      each of its at most cols additions (zeros included, any order) once, the bias addition
      too: |reference - exact| <= (cols + 2)·u·T;
    so |kernel - reference| <= (kept + cols + 4)·u·T. A bfloat16 output is the float32 result
    rounded once more: ``out_rounding`` (2^-8) of |y|.
    """
    w = q.float() * scale[:, None]
    bias = None if b is None else b.float()
    ref = F.linear(x.float(), w, bias).double()
    mass = x.double().abs() @ (q.double() * scale.double()[:, None]).abs().t()
    if b is not None:
        mass = mass + b.double().abs()
    tol = (kept + x.shape[-1] + 4) * U * mass + 1e-30
    tol = tol + out_rounding * (ref.abs() + tol)
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max())}, max tolerance {float(tol.max())}"
    return float((err / tol).max())


def kept_per_row(in_f, pattern):
    n, m = cast_rs.parse_pattern(pattern)
    return in_f // m * n


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("shape", [(64, 37), (48, 100), (128, 16), (8, 3)])
def test_quantization_equals_the_torch_rule_exactly(pattern, shape):
    in_f, out_f = shape
    lin = nm_linear_layer(in_f, out_f, pattern)
    with torch.no_grad():
        lin.weight[1].zero_()  # a zero row: scale 1, values 0
    for w in (lin.weight.detach(), lin.weight.detach().bfloat16()):
        n, m = cast_rs.parse_pattern(pattern)
        values, index, scales = torch.ops.cast_rs.nm_compress_int8(w, n, m)
        assert values.dtype == torch.int8 and index.dtype == torch.int32 and scales.dtype == torch.float32
        q, scale = ref_quantize(w)
        stored = torch.ops.cast_rs.nm_decompress(values, index, out_f, in_f, n, m)  # the integers
        assert stored.dtype == torch.int8 and torch.equal(stored, q)
        assert torch.equal(scales, scale) and scales[1] == 1
        dequantized = torch.ops.cast_rs.nm_decompress(values, index, out_f, in_f, n, m, scales)
        assert dequantized.dtype == torch.float32 and torch.equal(dequantized, q.float() * scale[:, None])
        # The same positions as the float layout.
        assert torch.equal(index, torch.ops.cast_rs.nm_compress(w.float().contiguous(), n, m)[1])
    # Each dequantized weight is within half a step of the float32 weight (plus the rounding
    # of q·scale: u·|w|).
    q, scale = ref_quantize(lin.weight.detach())
    err = (q.float() * scale[:, None] - lin.weight.detach()).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 4 * U) + U * lin.weight.detach().abs()).all())


def test_ties_round_to_even_and_the_range_is_symmetric():
    # Row max 127 -> scale 1, so w / scale is w itself: halves round to even.
    w = torch.tensor([[127.0, 0.0, 2.5, 0.0], [-3.5, 0.0, -127.0, 0.0], [0.5, 0.0, 1.5, 0.0]])
    values, index, scales = torch.ops.cast_rs.nm_compress_int8(w, 2, 4)
    q = torch.ops.cast_rs.nm_decompress(values, index, 3, 4, 2, 4)
    assert scales[:2].tolist() == [1.0, 1.0]
    assert q[0].tolist() == [127, 0, 2, 0] and q[1].tolist() == [-4, 0, -127, 0]
    assert int(q.min()) >= -127  # never -128


def amx_rows():
    """The batch rows from which bfloat16 inputs to an int8 2:4 layer run on AMX here (the
    kernel names say it), or None where they never do."""
    from cast_rs import _cast_rs

    found = re.search(
        r"amx \(tdpbf16ps, bfloat16 inputs\) from (\d+) batch rows", _cast_rs.nm_linear_kernels(2, 4)["int8 values"]
    )
    return int(found.group(1)) if found else None


def on_amx(pattern, in_f, x):
    """Whether ``x`` into an int8 layer of ``pattern`` and ``in_f`` inputs runs on AMX: bfloat16
    inputs, the 2:4 pattern, whole 32-column tile steps, enough rows."""
    rows = amx_rows()
    batch = x.numel() // x.shape[-1]
    return x.dtype == torch.bfloat16 and pattern == "2:4" and in_f % 32 == 0 and rows is not None and batch >= rows


def run_layers(xs):
    """Outputs of an int8 layer of each of ``KERNEL_SHAPES`` for each input (a list per layer)."""
    out = []
    for pattern, in_f, out_f in KERNEL_SHAPES:
        layer = NMLinear.from_dense(nm_linear_layer(in_f, out_f, pattern, seed=out_f), pattern, dtype=torch.int8)
        with torch.no_grad():
            out.append([layer(x[:, :in_f]) for x in xs])
    return out


# Rows not a multiple of 16 (37, 70) and one that is (32); M = 4 and 8; N even and odd.
KERNEL_SHAPES = [("2:4", 64, 37), ("1:4", 96, 70), ("4:8", 128, 32), ("2:4", 256, 70)]
BATCHES = [1, 3, 9, 17]


def kernel_inputs():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(b, 256, generator=g) for b in BATCHES]
    return xs + [x.bfloat16() for x in xs]


@pytest.mark.parametrize("pattern,in_f,out_f", KERNEL_SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_kernel_against_the_dequantized_reference(pattern, in_f, out_f, batch):
    lin = nm_linear_layer(in_f, out_f, pattern, seed=out_f)
    layer = NMLinear.from_dense(lin, pattern, dtype=torch.int8)
    q, scale = ref_quantize(lin.weight.detach())
    assert torch.equal(layer.scales, scale) and torch.equal(layer.dense_weight(), q.float() * scale[:, None])
    kept = kept_per_row(in_f, pattern)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (batch, out_f)
        assert_close_to_reference(y, x, q, scale, lin.bias.detach(), kept)
        # bfloat16 activations: on AMX (2:4, from a few rows, where the CPU has it) the
        # integers widened to bfloat16 exactly and multiplied with them, every product exact
        # and each addition rounded once, so the same bound holds in the tiles' order;
        # elsewhere widened to float32 (exactly), the same sums as float32 activations. Either
        # way rounded to bfloat16 once at the end.
        xb = x.bfloat16()
        yb = layer(xb)
        assert yb.dtype == torch.bfloat16
        if not on_amx(pattern, in_f, xb):
            assert torch.equal(yb, layer(xb.float()).bfloat16())
        assert_close_to_reference(yb, xb.float(), q, scale, lin.bias.detach(), kept, out_rounding=2.0**-8)
        # Leading dimensions and a strided input, as nn.Linear takes them.
        x3 = torch.randn(in_f, 2 * batch).t().reshape(2, batch, in_f)
        assert torch.equal(layer(x3), layer(x3.contiguous()))


PORTABLE = r"""
import sys
sys.path.insert(0, {tests!r})
import torch
from test_inference_int8 import kernel_inputs, run_layers
torch.save(run_layers(kernel_inputs()), {out!r})
print("portable ok")
"""


def test_portable_kernels_give_the_vector_kernels_bits(tmp_path):
    """`CAST_RS_NO_SIMD=1` (read once per process, hence a subprocess): the portable kernels
    behind the same operator give the AVX-512 / AVX2 kernels' outputs bit for bit (every kernel
    sums in one order and applies the scale in one shared FMA), so the reference checks above
    hold for them too; float32 and bfloat16 activations, batches 1, 3, 9 and 17 (bfloat16
    activations on AMX excepted: the tiles add in their own order)."""
    out = tmp_path / "portable.pt"
    code = PORTABLE.format(tests=os.path.dirname(__file__), out=str(out))
    env = dict(os.environ, CAST_RS_NO_SIMD="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "portable ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    portable = torch.load(out)
    xs = kernel_inputs()
    vector = run_layers(xs)
    compared = 0
    for (pattern, in_f, out_f), p_outs, v_outs in zip(KERNEL_SHAPES, portable, vector):
        for x, p, v in zip(xs, p_outs, v_outs):
            assert p.dtype == v.dtype, (pattern, in_f, out_f, tuple(v.shape), v.dtype)
            # AMX adds in its own order (test_kernel_against_the_dequantized_reference bounds it).
            if not on_amx(pattern, in_f, x[:, :in_f]):
                assert torch.equal(p, v), (pattern, in_f, out_f, tuple(v.shape), v.dtype)
                compared += 1
    assert compared >= len(KERNEL_SHAPES) * len(BATCHES)


def test_compress_a_finalized_model_to_int8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10))
    cast_rs.sparsify(model, "2:4", exclude=["4"]).finalize()
    dense = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    x = torch.randn(3, 64)
    report = cast_rs.compress(model, dtype=torch.int8)
    assert [layer.name for layer in report.layers] == ["0", "2"] and [n for n, _ in report.skipped] == ["4"]
    assert isinstance(model[0], NMLinear) and model[0].values.dtype == torch.int8
    # 2:4 int8: 0.5 byte of value and 0.125 of position per dense weight, plus a float32 scale
    # per output row.
    assert model[0].nbytes == report.layers[0].compressed_bytes == 128 * 64 * 0.625 + 128 * 4
    assert report.layers[1].compressed_bytes == 64 * 128 * 0.625 + 64 * 4
    assert report.bytes_per_weight == pytest.approx((2 * 128 * 64 * 0.625 + 192 * 4) / (2 * 128 * 64))
    assert "bytes per weight" in str(report) and "dtype=torch.int8" in repr(model[0])
    assert set(model.state_dict()) == {
        "0.values", "0.index", "0.scales", "0.bias", "0._extra_state",
        "2.values", "2.index", "2.scales", "2.bias", "2._extra_state", "4.weight", "4.bias",
    }  # fmt: skip
    for layer, w in zip((model[0], model[2]), dense):
        q, scale = ref_quantize(w)
        assert torch.equal(layer.dense_weight(), q.float() * scale[:, None])
    # The model computes with the dequantized weights: the same as the float model holding them.
    float_model = nn.Sequential(*(nn.Linear(1, 1) for _ in range(5)))
    float_model[1], float_model[3], float_model[4] = nn.GELU(), nn.GELU(), model[4]
    for i in (0, 2):
        lin = nn.Linear(model[i].in_features, model[i].out_features)
        with torch.no_grad():
            lin.weight.copy_(model[i].dense_weight())
            lin.bias.copy_(model[i].bias)
        float_model[i] = lin
    with torch.no_grad():
        torch.testing.assert_close(model(x), float_model(x), rtol=1e-5, atol=1e-5)


def test_refusals_name_what_is_wrong():
    never_finalized = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no layer of the model is exactly 2:4.*finalize"):
        cast_rs.compress(never_finalized, dtype=torch.int8)
    with pytest.raises(ValueError, match="layer '0' cannot be converted: not 2:4"):
        cast_rs.compress(never_finalized, include=["0"], dtype=torch.int8)
    assert isinstance(never_finalized[0], nn.Linear)
    half = nn.Sequential(nn.Linear(16, 8)).half()
    cast_rs.sparsify(half, "2:4", scaling_groups=0).finalize()
    with pytest.raises(TypeError, match=r"layer '0'.*float16"):
        cast_rs.compress(half, dtype=torch.int8)  # its activations would be float16
    finalized = nn.Sequential(nn.Linear(16, 8))
    cast_rs.sparsify(finalized, "2:4").finalize()
    with pytest.raises(TypeError, match="dtype: expected torch.float32, torch.bfloat16 or torch.int8"):
        cast_rs.compress(finalized, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype: expected torch.float32, torch.bfloat16 or torch.int8"):
        NMLinear(16, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"weight: not 2:4: row \d+, group \d+"):
        NMLinear.from_dense(nn.Linear(16, 8), dtype=torch.int8)
    bad = nm_linear_layer(16, 8)
    column = int(bad.weight[2].nonzero()[0])
    with torch.no_grad():
        bad.weight[2, column] = float("inf")  # a kept weight: still 2:4
    with pytest.raises(ValueError, match=f"weight: row 2, column {column} holds inf; int8 quantization needs finite"):
        NMLinear.from_dense(bad, dtype=torch.int8)

    layer = NMLinear.from_dense(nm_linear_layer(16, 8), dtype=torch.int8)
    f32 = NMLinear.from_dense(nm_linear_layer(16, 8))
    x = torch.randn(2, 16)
    op = torch.ops.cast_rs.nm_linear
    args = (layer.values, layer.index, None, 8, 16, 2, 4)
    with pytest.raises(ValueError, match=r"scales: int8 values need their scales: one float32 per output row \(\[8\]\)"):
        op(x, *args)
    with pytest.raises(TypeError, match="scales: expected dtype float32, got BFloat16"):
        op(x, *args, layer.scales.bfloat16())
    with pytest.raises(ValueError, match="scales: expected a contiguous tensor of 8 elements, got shape"):
        op(x, *args, torch.ones(7))
    with pytest.raises(ValueError, match="scales: only int8 values take scales"):
        op(x, f32.values, f32.index, None, 8, 16, 2, 4, torch.ones(8))
    with pytest.raises(ValueError, match="scales: only int8 values take scales"):
        torch.ops.cast_rs.nm_decompress(f32.values, f32.index, 8, 16, 2, 4, torch.ones(8))
    with pytest.raises(ValueError, match="scales: only int8 values take scales"):  # the bf16 x bf16 route too
        bf16 = NMLinear.from_dense(nm_linear_layer(16, 8), dtype=torch.bfloat16)
        op(x.bfloat16(), bf16.values, bf16.index, None, 8, 16, 2, 4, torch.ones(8))
    with torch.no_grad(), pytest.raises(TypeError, match="input: expected dtype float32 or bfloat16"):
        layer(x.half())


def test_to_dtype_changes_the_activations_and_keeps_the_int8_encoding():
    """model.to(torch.bfloat16) on an int8 model: the values, positions and scales stay as they
    are, bit for bit (they are the encoding, not weights in the model's dtype); the layer then
    takes and returns bfloat16; the bias follows the model's dtype as in the float layers
    (rounded, kept float32). float16 and float64 are refused, the layer untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 16))
    cast_rs.sparsify(model, "2:4").finalize()
    cast_rs.compress(model, dtype=torch.int8)
    layer = model[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 32)
    model.to(torch.bfloat16)
    assert model[1].weight.dtype == torch.bfloat16
    for key in ("values", "index", "scales", "_extra_state"):
        assert torch.equal(layer.state_dict()[key], before[key]), key
    assert layer.scales.dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert torch.equal(layer.bias, before["bias"].bfloat16().float())
    with torch.no_grad():
        y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16
    for convert in (lambda m: m.half(), lambda m: m.to(torch.float64)):
        with pytest.raises(TypeError, match="an int8 layer takes float32 or bfloat16"):
            convert(layer)
        assert layer.values.dtype == torch.int8 and layer.scales.dtype == torch.float32
    model.float()
    assert torch.equal(layer.values, before["values"]) and torch.equal(layer.scales, before["scales"])
    with torch.no_grad():
        assert model(x).dtype == torch.float32


def test_state_dict_round_trip_and_load_checks(tmp_path):
    torch.manual_seed(0)
    lin = nm_linear_layer(64, 40)
    layer = NMLinear.from_dense(lin, dtype=torch.int8)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = layer(x)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = NMLinear(64, 40, dtype=torch.int8)
    assert torch.equal(fresh.scales, torch.ones(40))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "layer.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    again = NMLinear(64, 40, dtype=torch.int8)
    again.load_state_dict(safetensors_torch.load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(again(x), want)
    # Never reinterpreted: float values into an int8 layer (and the reverse) are refused, and
    # so are scales of another dtype or length.
    with pytest.raises(TypeError, match="values are torch.float32, this layer stores torch.int8"):
        NMLinear(64, 40, dtype=torch.int8).load_state_dict(NMLinear.from_dense(lin).state_dict(), strict=False)
    with pytest.raises(TypeError, match="values are torch.int8, this layer stores torch.float32"):
        NMLinear(64, 40).load_state_dict(layer.state_dict(), strict=False)
    state = layer.state_dict()
    state["scales"] = state["scales"].bfloat16()
    target = NMLinear(64, 40, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"scales are torch.bfloat16 \(40,\), expected torch.float32 \(40,\)"):
        target.load_state_dict(state)
    assert torch.all(target.values == 0) and torch.equal(target.scales, torch.ones(40))
    del state["scales"]
    with pytest.raises(RuntimeError, match="Missing key.*scales"):
        NMLinear(64, 40, dtype=torch.int8).load_state_dict(state)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_save_compressed_and_load_compressed_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyLM().eval()
    cast_rs.sparsify(model, "2:4").finalize()
    cast_rs.compress(model, dtype=torch.int8)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want = model(ids)
    cast_rs.save_compressed(model, tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert record["values_dtype"] == "int8" and record["modules"] == ["body.0", "body.2"]
    with torch.device("meta"):
        skeleton = TinyLM()
    loaded = cast_rs.load_compressed(tmp_path, skeleton)
    layer = loaded.body[0]
    assert isinstance(layer, NMLinear) and layer.values.dtype == torch.int8 and layer.scales.dtype == torch.float32
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)


def test_hf_model_round_trips_through_save_and_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    from _tiny_hf import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    cast_rs.sparsify(model, "2:4").finalize()
    report = cast_rs.compress(model, dtype=torch.int8)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert record["values_dtype"] == "int8" and record["modules"] == [layer.name for layer in report.layers]
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, NMLinear) and layer.values.dtype == torch.int8 and layer.scales.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    # Loaded in bfloat16: bfloat16 activations, the int8 encoding as stored (scales float32).
    lowp = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layer_bf16 = lowp.model.layers[0].self_attn.q_proj
    assert lowp.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(layer_bf16.values, layer.values) and torch.equal(layer_bf16.scales, layer.scales)
    with torch.no_grad():
        assert lowp(ids).logits.dtype == torch.bfloat16
    again = cast_rs.load_compressed(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_torch_compile_and_export():
    torch.manual_seed(0)
    model = nn.Sequential(NMLinear.from_dense(nm_linear_layer(64, 32), dtype=torch.int8), nn.ReLU())
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), want)
        exported = torch.export.export(model, (x,))
        assert torch.equal(exported.module()(x), want)
    nodes = [node for node in exported.graph.nodes if "nm_linear" in str(node.target)]
    assert len(nodes) == 1 and len(nodes[0].args) == 9  # the scales are an argument of the node


def test_compressed_tensors_export_refuses_int8_layers(tmp_path):
    model = nn.Sequential(NMLinear.from_dense(nm_linear_layer(32, 16), dtype=torch.int8))
    with pytest.raises(cast_rs.CastError, match="layer '0': int8 values; sparse-24-bitmask"):
        cast_rs.export_compressed_tensors(model, tmp_path)
