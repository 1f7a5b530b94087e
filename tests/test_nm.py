"""The N:M mask kernel against the plain-PyTorch reference, on both kernel paths."""

import numpy as np
import pytest
import torch

import cast_rs
from reference import brute_nm_mask, ref_nm_mask

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (3, 6), (8, 16), (5, 32)]


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dim", [-1, 0])
def test_matches_reference_and_keeps_exactly_n(kernel_path, n, m, dim):
    shape = (5, 3 * m) if dim == -1 else (3 * m, 7)
    x = torch.randn(shape)
    got = cast_rs.nm_mask(x, f"{n}:{m}", dim=dim)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, ref_nm_mask(x, n, m, dim))
    per_group = got.reshape(-1, m).sum(-1) if dim == -1 else got.reshape(-1, m, 7).sum(1)
    assert bool((per_group == n).all())


def test_large_tensor_and_packed_form(kernel_path):
    x = torch.randn(256, 1024)
    keep = cast_rs.nm_mask(x, "2:4")
    assert torch.equal(keep, ref_nm_mask(x, 2, 4))
    bits = cast_rs.nm_mask_packed(x, "2:4")
    assert bits.dtype == torch.uint8 and bits.numel() == x.numel() // 8
    assert torch.equal(cast_rs.unpack_mask(bits, x.shape), keep)


@pytest.mark.parametrize("numel", [1, 7, 8, 13, 64, 1000, 4099])
def test_unpack_mask_matches_reference_on_both_paths(numel):
    # A contiguous CPU byte tensor takes the table-lookup path, a strided view the generic
    # tensor ops; both must give the reference's bits (LSB first), tail byte included. (One
    # byte is contiguous whatever its stride: those sizes check the fast path only.)
    g = torch.Generator().manual_seed(numel)
    nbytes = (numel + 7) // 8
    raw = torch.randint(0, 256, (2 * nbytes,), dtype=torch.uint8, generator=g)
    bits_strided = raw[::2]
    bits = bits_strided.contiguous()
    shifts = torch.arange(8, dtype=torch.uint8)
    want = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:numel].bool()
    assert bits_strided.is_contiguous() == (nbytes == 1)
    for b in (bits, bits_strided):
        got = cast_rs.unpack_mask(b, (numel,))
        assert got.dtype == torch.bool and got.shape == (numel,)
        assert torch.equal(got, want)
    assert torch.equal(cast_rs.unpack_mask(bits, (1, numel)), want.reshape(1, numel))


def test_packed_bit_order_is_row_major_lsb_first(kernel_path):
    x = torch.tensor([[0.0, 3.0, 0.0, 2.0, 9.0, 0.0, 1.0, 0.0, 5.0, 6.0, 0.0, 0.0]])
    bits = cast_rs.nm_mask_packed(x, "2:4")
    # keep = [0,1,0,1, 1,0,1,0, 1,1,0,0]
    assert bits.tolist() == [0b01011010, 0b0011]


@pytest.mark.parametrize(
    "values",
    [
        [1.0, 1.0, 1.0, 1.0],  # all equal: lowest indices
        [0.0, -0.0, 0.0, -0.0],  # signed zeros tie
        [-2.0, 2.0, 2.0, -2.0],  # magnitude ties across signs
        [float("nan"), 5.0, float("inf"), -2.0],  # NaN above inf
        [3.0, float("nan"), 1.0, float("nan")],  # two NaNs both kept
        [float("-inf"), 1.0, float("inf"), 1.0],  # both infinities kept
        [1e-45, -1e-45, 0.0, 3e-45],  # subnormals order by magnitude
        [float("nan")] * 4,
    ],
)
def test_ties_zeros_nan(kernel_path, values):
    x = torch.tensor(values * 3, dtype=torch.float32).reshape(3, 4)
    expected = torch.tensor(brute_nm_mask(values * 3, 2, 4)).reshape(3, 4)
    assert torch.equal(cast_rs.nm_mask(x, "2:4"), expected)
    assert torch.equal(ref_nm_mask(x, 2, 4), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_take_generic_path_and_agree(dtype):
    x = torch.randn(16, 64).to(dtype)
    assert torch.equal(cast_rs.nm_mask(x, "2:4"), ref_nm_mask(x, 2, 4))


def test_non_contiguous_input(kernel_path):
    base = torch.randn(64, 32)
    x = base.t()  # [32, 64] view, non-contiguous
    assert not x.is_contiguous()
    assert torch.equal(cast_rs.nm_mask(x, "2:4"), ref_nm_mask(x.contiguous(), 2, 4))
    assert torch.equal(cast_rs.nm_mask(x, "2:4", dim=0), ref_nm_mask(x.contiguous(), 2, 4, 0))


def test_fast_and_generic_paths_agree_bit_for_bit():
    x = torch.randn(96, 320)
    x[::7, ::3] = 0.0
    x[::11, 1::5] = float("nan")
    for dim in (-1, 0):
        fast = cast_rs.nm_mask(x, "2:4", dim=dim)
        with cast_rs.force_generic_path():
            generic = cast_rs.nm_mask(x, "2:4", dim=dim)
        assert torch.equal(fast, generic)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32])
def test_numpy_arrays(dtype):
    a = (np.random.default_rng(0).standard_normal((8, 16)) * 10).astype(dtype)
    got = cast_rs.nm_mask(a, (2, 4))
    assert isinstance(got, np.ndarray) and got.dtype == np.bool_ and got.shape == a.shape
    expected = ref_nm_mask(torch.from_numpy(a.astype(np.float64)), 2, 4).numpy()
    assert np.array_equal(got, expected)
    # Fortran-ordered and dim=0 input too.
    f = np.asfortranarray(a)
    assert np.array_equal(cast_rs.nm_mask(f, "2:4"), expected)
    assert np.array_equal(cast_rs.nm_mask(a, "2:4", dim=0), ref_nm_mask(torch.from_numpy(a.astype(np.float64)), 2, 4, 0).numpy())


def test_three_d_tensors_and_empty():
    x = torch.randn(2, 3, 8)
    assert torch.equal(cast_rs.nm_mask(x, "2:4"), ref_nm_mask(x, 2, 4))
    x0 = torch.randn(8, 3, 2)
    assert torch.equal(cast_rs.nm_mask(x0, "2:4", dim=0), ref_nm_mask(x0, 2, 4, 0))
    assert cast_rs.nm_mask(torch.empty(0, 8), "2:4").shape == (0, 8)


@pytest.mark.parametrize("pattern", ["4:4", "0:4", "5:4", "1:1", "2:33", "2-4", "", (2,), (2.0, 4)])
def test_bad_patterns(pattern):
    with pytest.raises((ValueError, TypeError), match="pattern"):
        cast_rs.nm_mask(torch.randn(4, 8), pattern)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        cast_rs.nm_mask(torch.randn(4, 6), "2:4")
    with pytest.raises(ValueError, match="dimension 0"):
        cast_rs.nm_mask(torch.randn(6, 8), "2:4", dim=0)
    with pytest.raises(ValueError, match="first or the last"):
        cast_rs.nm_mask(torch.randn(4, 8, 8), "2:4", dim=1)
    with pytest.raises(ValueError, match="0-d"):
        cast_rs.nm_mask(torch.tensor(1.0), "2:4")
    with pytest.raises(TypeError, match="floating-point"):
        cast_rs.nm_mask(torch.ones(4, 8, dtype=torch.int64), "2:4")
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        cast_rs.nm_mask([1.0, 2.0, 3.0, 4.0], "2:4")
    with pytest.raises(ValueError, match="bits"):
        cast_rs.unpack_mask(torch.zeros(3, dtype=torch.uint8), (4, 8))
    with pytest.raises(TypeError, match="uint8"):
        cast_rs.unpack_mask(torch.zeros(4), (4, 8))


def test_requires_grad_input_is_fine():
    w = torch.randn(4, 8, requires_grad=True)
    assert torch.equal(cast_rs.nm_mask(w, "2:4"), ref_nm_mask(w.detach(), 2, 4))
    assert w.grad is None and w.requires_grad
