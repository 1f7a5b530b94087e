"""Compressed N:M layers for CPU inference (cast_rs.NMLinear, cast_rs.compress; issue 11).

The kernels themselves are checked against a dense f64 reference on every dispatch level by
`cargo test` (src/nm_linear/); here the layer is checked against the dense masked layer it
replaces, through the PyTorch operator, with a rounding bound: both sides sum in float32, in
different orders, so each output may differ from the exact sum by at most about
(terms + 1) · 2^-24 · Σ|w·x| (+ the bias)."""

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import cast_rs
from cast_rs import NMLinear


def nm_linear_layer(in_f, out_f, pattern="2:4", bias=True, dtype=torch.float32):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(cast_rs.nm_mask(lin.weight, pattern))
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def assert_matches_dense(y, x, w, b, out_rounding=0.0):
    """y ≈ x · wᵀ + b within float32 summation rounding (see the module docstring), plus
    ``out_rounding`` (the unit roundoff of the output's dtype: 2^-8 for bfloat16) of |y|."""
    x64, w64 = x.double(), w.double()
    exact = x64 @ w64.t() + (0 if b is None else b.double())
    mass = x64.abs() @ w64.abs().t() + (0 if b is None else b.double().abs())
    tol = (w.shape[1] + 2) * 2.0**-24 * mass + 1e-30
    tol = tol + out_rounding * (exact.abs() + tol)
    err = (y.double() - exact).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max())}, max tolerance {float(tol.max())}"


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:2"])
@pytest.mark.parametrize("shape", [(64, 48), (256, 100), (32, 7)])
# (5, 8) = 40 and 80 rows: several 8-row chunks per block and a remainder (float32 inputs
# take the compressed kernel at any batch).
@pytest.mark.parametrize("batch", [(1,), (4,), (16,), (2, 3), (5, 8), (80,)])
def test_nmlinear_equals_the_dense_masked_layer(pattern, shape, batch):
    in_f, out_f = shape
    _, m = cast_rs.parse_pattern(pattern)
    if in_f % m:
        pytest.skip(f"in_features {in_f} is not a multiple of M = {m} (refused: tested below)")
    lin = nm_linear_layer(in_f, out_f, pattern)
    layer = NMLinear.from_dense(lin, pattern)
    x = torch.randn(*batch, in_f)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*batch, out_f) and y.dtype == torch.float32
    assert_matches_dense(y.reshape(-1, out_f), x.reshape(-1, in_f), lin.weight.detach(), lin.bias.detach())
    assert torch.equal(layer.dense_weight(), lin.weight.detach())


def test_bf16_values_and_inputs():
    lin = nm_linear_layer(128, 96)
    layer = NMLinear.from_dense(lin, "2:4", dtype=torch.bfloat16)
    assert layer.values.dtype == torch.bfloat16
    w_bf16 = lin.weight.detach().bfloat16().float()  # what the layer stores, exactly
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert_matches_dense(layer(x), x, w_bf16, lin.bias.detach())
        # A bfloat16 input: products of bf16 are exact in float32 and the sums are float32
        # (with bf16 values, by `vdpbf16ps` where the CPU has it, in its own order); the
        # output is rounded to bf16 once.
        xb = x.bfloat16()
        yb = layer(xb)
        assert yb.dtype == torch.bfloat16
        assert_matches_dense(yb, xb.float(), w_bf16, lin.bias.detach(), out_rounding=2.0**-8)
        x_many = torch.randn(100, 128)  # float32 inputs: the kernel at any batch
        assert_matches_dense(layer(x_many), x_many, w_bf16, lin.bias.detach())
        # Many bf16 rows (a prompt): still the compressed kernel, rounded once.
        xb_many = torch.randn(100, 128).bfloat16()
        yb_many = layer(xb_many)
        assert yb_many.dtype == torch.bfloat16
        assert_matches_dense(yb_many, xb_many.float(), w_bf16, lin.bias.detach(), out_rounding=2.0**-8)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "2:8", "1:4"])  # 1:4: odd N, widened path
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 24, 70])
def test_bf16_inputs_to_bf16_values(pattern, batch):
    """bf16 × bf16 (a bf16 model decoding): the `vdpbf16ps` kernel for even N on a CPU with
    AVX-512 BF16 (2:4: byte shuffles, 4:8 and 2:8: word permutes), for 2:4 from 5 rows the
    AMX tiles on a CPU with AMX (160 inputs: five 32-column steps), else widened to float32;
    either way the float32 sum of exact products, rounded to bf16 once."""
    lin = nm_linear_layer(160, 72, pattern)
    layer = NMLinear.from_dense(lin, pattern, dtype=torch.bfloat16)
    w = lin.weight.detach().bfloat16().float()
    x = torch.randn(batch, 160).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (batch, 72)
    assert_matches_dense(y, x.float(), w, lin.bias.detach(), out_rounding=2.0**-8)


def test_no_bias_and_a_strided_input():
    lin = nm_linear_layer(64, 40, bias=False)
    layer = NMLinear.from_dense(lin)
    x = torch.randn(64, 6).t()  # non-contiguous
    with torch.no_grad():
        assert_matches_dense(layer(x), x, lin.weight.detach(), None)


def test_large_buffers_start_on_a_huge_page_and_behave_as_tensors(tmp_path, monkeypatch):
    """NMLinear's values and index of 2 MiB or more sit in their own mapping, advised for
    transparent huge pages, from a 2 MiB boundary (where Linux offers THP); the layer fills,
    computes, copies, converts, saves and loads as any other; CAST_RS_NO_HUGEPAGES=1 and small
    buffers get ordinary tensors."""
    from cast_rs import _memory

    huge = _memory.HUGE_PAGE
    lin = nm_linear_layer(2048, 1024)  # float32 values: 1024 · 1024 · 4 bytes = 4 MiB
    layer = NMLinear.from_dense(lin)
    if _memory.huge_pages_available():
        assert layer.values.data_ptr() % huge == 0
    else:
        print("no transparent huge pages here (not Linux, THP 'never', or CAST_RS_NO_HUGEPAGES): ordinary buffers")
    x = torch.randn(3, 2048)
    with torch.no_grad():
        assert_matches_dense(layer(x), x, lin.weight, lin.bias)
        assert torch.equal(copy.deepcopy(layer)(x), layer(x))
        path = tmp_path / "layer.pt"
        torch.save(layer.state_dict(), path)
        again = NMLinear(2048, 1024)
        again.load_state_dict(torch.load(path))
        assert torch.equal(again(x), layer(x))
        if _memory.huge_pages_available():
            assert again.values.data_ptr() % huge == 0  # loading copies into the layer's buffers
        # A dtype change re-lays the values out into a new buffer (2 MiB of bfloat16).
        as_bf16 = again.to(torch.bfloat16)
        # (model.to(bfloat16) rounds the bias to bfloat16 as well, then keeps it in float32.)
        xb, wb = x.bfloat16(), lin.weight.detach().bfloat16().float()
        assert_matches_dense(as_bf16(xb), xb.float(), wb, as_bf16.bias.detach(), out_rounding=2.0**-8)
        if _memory.huge_pages_available():
            assert as_bf16.values.data_ptr() % huge == 0
    small = _memory.zeros(1000, torch.float32)
    assert small.shape == (1000,) and not small.any()
    monkeypatch.setenv("CAST_RS_NO_HUGEPAGES", "1")
    _memory.huge_pages_available.cache_clear()
    try:
        assert not _memory.huge_pages_available()
        plain = _memory.zeros(huge, torch.float32)
        assert plain.shape == (huge,) and not plain.any()
    finally:
        monkeypatch.delenv("CAST_RS_NO_HUGEPAGES")
        _memory.huge_pages_available.cache_clear()


def test_compress_a_finalized_model_and_reload_it_without_dense_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10))
    sparse = cast_rs.sparsify(model, "2:4", exclude=["4"])
    sparse.finalize()
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    report = cast_rs.compress(model)
    assert [layer.name for layer in report.layers] == ["0", "2"]
    assert [name for name, _ in report.skipped] == ["4"] and "not 2:4" in report.skipped[0][1]
    assert isinstance(model[0], NMLinear) and isinstance(model[4], nn.Linear)
    # 2:4 float32: 2.125 bytes per dense weight for row counts that fill the 16-row blocks.
    assert report.layers[0].compressed_bytes == 128 * 64 * 2.125 and report.layers[0].dense_bytes == 128 * 64 * 4
    assert "2 layers converted" in str(report) and "bytes per weight" in str(report)
    assert report.bytes_per_weight == pytest.approx((128 * 64 * 2.125 + 64 * 128 * 2.125) / (2 * 128 * 64))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    state = model.state_dict()
    assert set(state) == {
        "0.values", "0.index", "0.bias", "0._extra_state", "2.values", "2.index", "2.bias", "2._extra_state",
        "4.weight", "4.bias",
    }  # fmt: skip
    # torch.save / load into a model rebuilt with empty NMLinear layers (no dense weight).
    buf = io.BytesIO()
    torch.save(state, buf)
    fresh = nn.Sequential(NMLinear(64, 128), nn.GELU(), NMLinear(128, 64), nn.GELU(), nn.Linear(64, 10))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # safetensors, the format Hugging Face checkpoints use.
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    again = nn.Sequential(NMLinear(64, 128), nn.GELU(), NMLinear(128, 64), nn.GELU(), nn.Linear(64, 10))
    again.load_state_dict(safetensors_torch.load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_hf_conv1d_layers():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    conv = transformers.pytorch_utils.Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs: weight [64, 48]
    with torch.no_grad():
        conv.weight.mul_(cast_rs.nm_mask(conv.weight, "2:4", dim=0))
        conv.bias.normal_()
    layer = NMLinear.from_dense(conv)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert_matches_dense(layer(x).reshape(-1, 48), x.reshape(-1, 64), conv.weight.detach().t(), conv.bias.detach())
    model = nn.Sequential(conv)
    assert [layer.name for layer in cast_rs.compress(model).layers] == ["0"]


def test_torch_compile_and_export():
    lin = nm_linear_layer(64, 32)
    model = nn.Sequential(NMLinear.from_dense(lin), nn.ReLU())
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True)
        assert torch.equal(compiled(x), want)
        exported = torch.export.export(model, (x,))
        assert torch.equal(exported.module()(x), want)
    assert any("nm_linear" in str(node.target) for node in exported.graph.nodes)


def test_refusals_name_what_is_wrong():
    dense = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"weight: not 2:4: row \d+, group \d+"):
        NMLinear.from_dense(dense)
    with pytest.raises(ValueError, match="include: no module named 'nope'"):
        cast_rs.compress(nn.Sequential(dense), include=["nope"])
    with pytest.raises(ValueError, match="layer '0' cannot be converted: not 2:4"):
        cast_rs.compress(nn.Sequential(dense), include=["0"])
    with pytest.raises(cast_rs.CastError, match="in_features: 10 is not a multiple of M = 4"):
        NMLinear(10, 8)
    with pytest.raises(TypeError, match="dtype: expected torch.float32, torch.bfloat16 or torch.int8"):
        NMLinear(16, 8, dtype=torch.float16)
    layer = NMLinear.from_dense(nm_linear_layer(16, 8))
    with torch.no_grad(), pytest.raises(ValueError, match=r"input: expected a last dimension of 16"):
        layer(torch.randn(2, 12))
    with torch.no_grad(), pytest.raises(TypeError, match="input: expected dtype float32 or bfloat16"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"no layer of the model is exactly 2:4.*finalize.*not a multiple of M = 4"):
        cast_rs.compress(nn.Sequential(nn.Linear(10, 4)))


def test_a_corrupt_index_is_refused_at_load():
    """With M = 6 a 4-bit position can point past the group; loading such an index fails
    instead of computing with the wrong inputs."""
    lin = nn.Linear(12, 16)
    with torch.no_grad():
        lin.weight.mul_(cast_rs.nm_mask(lin.weight, "2:6"))
    layer = NMLinear.from_dense(lin, "2:6")
    state = layer.state_dict()
    fresh = NMLinear(12, 16, pattern="2:6")
    fresh.load_state_dict(state)  # a valid index loads
    state["index"] = state["index"].clone()
    state["index"][0] = -1  # every position 15
    with pytest.raises(ValueError, match="NMLinear: index positions must be below M = 6"):
        NMLinear(12, 16, pattern="2:6").load_state_dict(state)


PORTABLE_CHECK = r"""
import sys
sys.path.insert(0, {tests!r})
import torch
from torch import nn
import cast_rs
from cast_rs import NMLinear
from test_inference import assert_matches_dense, nm_linear_layer

torch.manual_seed(0)
for pattern in ("2:4", "4:8", "1:4"):
    lin = nm_linear_layer(96, 40, pattern)
    w = lin.weight.detach()
    for dtype in (torch.float32, torch.bfloat16):
        layer = NMLinear.from_dense(lin, pattern, dtype=dtype)
        wq = w.to(dtype).float()
        for batch in (1, 5, 19):
            x = torch.randn(batch, 96)
            with torch.no_grad():
                assert_matches_dense(layer(x), x, wq, lin.bias.detach())
                xb = x.bfloat16()
                assert_matches_dense(layer(xb), xb.float(), wq, lin.bias.detach(), out_rounding=2.0**-8)
        assert torch.equal(layer.dense_weight().float(), wq)
print("portable ok")
"""


def test_the_portable_kernels_through_the_operator():
    """`CAST_RS_NO_SIMD=1` (read once per process, hence a subprocess): the portable kernels
    (what a CPU without AVX2 runs) behind the same operator, f32 and bf16 values, f32 and bf16
    inputs, against the dense reference. The vector kernels are the in-process tests above."""
    code = PORTABLE_CHECK.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, CAST_RS_NO_SIMD="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "portable ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ---------------------------------------------------------------- a saved model comes back right or not at all


def test_load_refuses_a_checkpoint_of_another_shape_with_the_same_byte_count():
    # 64 -> 32 and 128 -> 16 hold the same number of values and index words: only the recorded
    # layout tells them apart.
    saved = NMLinear.from_dense(nm_linear_layer(64, 32, bias=False))
    other = NMLinear(128, 16, bias=False)
    assert saved.values.shape == other.values.shape and saved.index.shape == other.index.shape
    before = [t.clone() for t in other.state_dict().values()]
    with pytest.raises(ValueError, match=r"holds a 32x64 \(out x in\) 2:4 weight, this layer is 16x128 2:4"):
        other.load_state_dict(saved.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, other.state_dict().values()))


def test_load_refuses_values_of_another_dtype_instead_of_misreading_them():
    f32 = NMLinear.from_dense(nm_linear_layer(32, 16))
    bf16 = NMLinear.from_dense(nm_linear_layer(32, 16), dtype=torch.bfloat16)
    into_bf16 = NMLinear(32, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"values are torch.float32, this layer stores torch.bfloat16.*dtype=torch.float32"):
        into_bf16.load_state_dict(f32.state_dict())
    assert torch.all(into_bf16.values == 0)
    into_f32 = NMLinear(32, 16)  # dtype left out: float32
    with pytest.raises(TypeError, match="values are torch.bfloat16, this layer stores torch.float32"):
        into_f32.load_state_dict(bf16.state_dict())
    into_bf16.load_state_dict(bf16.state_dict())  # the matching dtype loads
    assert torch.equal(into_bf16.values, bf16.values)


def test_a_failed_load_leaves_the_whole_compressed_model_unchanged():
    torch.manual_seed(0)

    def model():
        m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        cast_rs.sparsify(m, "2:4").finalize()
        cast_rs.compress(m)
        return m

    saved, target = model(), model()
    state = saved.state_dict()
    state["2.values"] = state["2.values"].to(torch.bfloat16)  # the second layer's entry is wrong
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(TypeError, match="NMLinear '2'"):
        target.load_state_dict(state)
    # The first layer, loaded before the second in module order, was not touched either.
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_compress_refuses_float16_and_models_that_were_never_finalized():
    half = nn.Sequential(nn.Linear(16, 8)).half()
    cast_rs.sparsify(half, "2:4", scaling_groups=0).finalize()
    with pytest.raises(TypeError, match=r"layer '0'.*float16.*model.to\(torch.bfloat16\)"):
        cast_rs.compress(half)
    assert isinstance(half[0], nn.Linear)
    with pytest.raises(ValueError, match="no layer of the model is exactly 2:4.*finalize"):
        cast_rs.compress(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))


def test_nm_linear_kernels_names_the_kernel_of_each_call():
    """What the inference benchmark prints beside its figures: the dispatched kernel per call,
    from the CPU's flags (CAST_RS_NO_SIMD, which the generic-path tests set, forces portable)."""
    import os

    from cast_rs import _cast_rs

    paths = _cast_rs.nm_linear_kernels()
    assert set(paths) == {
        "float32",
        "bfloat16 values, float32 inputs",
        "bfloat16 values, bfloat16 inputs",
        "int8 values",
    }
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read().splitlines()
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    if os.environ.get("CAST_RS_NO_SIMD"):
        want = "portable"
    elif {"avx512f", "avx512bw", "avx512vl"} <= flags:
        want = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        want = "avx2"
    else:
        want = "portable"
    narrow = paths["bfloat16 values, float32 inputs"]
    assert paths["float32"].split()[0] == narrow.split()[0] == want
    # int8 values: the narrow-value kernel, and AMX for bfloat16 inputs where bf16 has it.
    assert paths["int8 values"].startswith(narrow)
    assert ("amx" in paths["int8 values"]) == ("amx" in paths["bfloat16 values, bfloat16 inputs"])
    # The AVX-512 kernel prefetches f32 values into L2 on Intel CPUs only.
    assert ("into L2" in paths["float32"]) == (want == "avx512" and vendor == "GenuineIntel")
    dot = want == "avx512" and "avx512_bf16" in flags
    assert paths["bfloat16 values, bfloat16 inputs"].startswith("avx512_bf16") == dot
    # AMX tiles only on a CPU with AMX (and only for 2:4: its expansion is the 2:4 one).
    if "amx" in paths["bfloat16 values, bfloat16 inputs"]:
        assert dot and {"amx_bf16", "amx_tile"} <= flags
    assert "amx" not in _cast_rs.nm_linear_kernels(2, 6)["bfloat16 values, bfloat16 inputs"]
    # An odd N pairs no slots, so never the vdpbf16ps kernel.
    odd = _cast_rs.nm_linear_kernels(3, 4)
    assert odd["bfloat16 values, bfloat16 inputs"] == odd["bfloat16 values, float32 inputs"]
    # AVX2: 2:4 has its own kernel (in-lane input selection, two row blocks at batch 1).
    assert ("two row blocks" in paths["float32"]) == (want == "avx2")
    if want == "avx2":
        assert odd["float32"] == "avx2 (vpermps + FMA)"
    with pytest.raises(ValueError, match="pattern"):
        _cast_rs.nm_linear_kernels(4, 4)
