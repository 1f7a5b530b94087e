"""Hostile inputs: property-based checks of the mask and step kernels (hypothesis), and a
subprocess that runs the nastiest cases to prove nothing takes the interpreter down."""

import subprocess
import sys
import textwrap

import pytest
import torch

import cast_rs
from reference import ref_nm_mask

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency (./run test installs it)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SPECIAL = [0.0, -0.0, 1e-40, -1e-40, 1e-45, float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 3.0e38]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

values = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True, width=32))


@st.composite
def mask_case(draw):
    n_m = draw(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (3, 6), (5, 16), (7, 32)]))
    m = n_m[1]
    dim = draw(st.sampled_from([-1, 0]))
    groups = draw(st.integers(1, 4))
    other = draw(st.integers(1, 5))
    shape = (other, groups * m) if dim == -1 else (groups * m, other)
    numel = shape[0] * shape[1]
    if draw(st.booleans()):  # all-equal groups
        vals = [draw(values)] * numel
    else:
        vals = draw(st.lists(values, min_size=numel, max_size=numel))
    dtype = draw(st.sampled_from(DTYPES))
    transposed = draw(st.booleans())
    return n_m, dim, shape, vals, dtype, transposed


@settings(max_examples=150, deadline=None)
@given(mask_case())
def test_mask_property_matches_reference_on_both_paths(case):
    (n, m), dim, shape, vals, dtype, transposed = case
    x = torch.tensor(vals, dtype=torch.float64).reshape(shape).to(dtype)
    if transposed:  # same logical tensor, non-contiguous storage
        x = x.t().contiguous().t()
    expected = ref_nm_mask(x.contiguous(), n, m, dim)
    for generic in (False, True):
        with cast_rs.force_generic_path(generic):
            got = cast_rs.nm_mask(x, (n, m), dim=dim)
        assert torch.equal(got, expected), (generic, x)
        per_group = got.reshape(-1, m).sum(-1) if dim == -1 else got.reshape(shape[0] // m, m, -1).sum(1)
        assert bool((per_group == n).all())


@settings(max_examples=60, deadline=None)
@given(
    vals=st.lists(values, min_size=32, max_size=32),
    grads=st.lists(values, min_size=32, max_size=32),
    dtype=st.sampled_from(DTYPES),
)
def test_step_never_crashes_and_stays_consistent(vals, grads, dtype):
    """Any values (NaN, inf, subnormal) step without error; the mask stays exactly N:M; finite
    inputs with finite state give finite outputs."""
    p = torch.nn.Parameter(torch.tensor(vals, dtype=torch.float64).reshape(4, 8).to(dtype))
    opt = cast_rs.AdamS([p], lr=1e-3, pattern="2:4", total_steps=5, mask_interval=2)
    for _ in range(3):
        p.grad = torch.tensor(grads, dtype=torch.float64).reshape(4, 8).to(dtype)
        opt.step()
    keep = cast_rs.unpack_mask(opt.state[p]["mask"], p.shape)
    assert int(keep.sum()) == 16
    finite_in = all(abs(v) < 1e30 for v in vals + grads if v == v)
    if finite_in and all(v == v for v in vals + grads) and dtype in (torch.float32, torch.float64):
        assert bool(torch.isfinite(p).all())


def test_hostile_calls_do_not_crash_the_interpreter():
    code = textwrap.dedent(
        """
        import torch, cast_rs
        from cast_rs import _cast_rs
        bad = [
            lambda: cast_rs.nm_mask(torch.randn(0, 8), "2:4"),
            lambda: cast_rs.nm_mask(torch.full((4, 8), float("nan")), "2:4"),
            lambda: cast_rs.nm_mask(torch.randn(4, 8)[:, ::2], "2:4"),
            lambda: cast_rs.nm_mask(torch.randn(4, 6), "2:4"),
            lambda: cast_rs.nm_mask(torch.randn(3, 8).to(torch.bfloat16).t(), "2:4", dim=0),
            lambda: _cast_rs.unpack_mask(torch.zeros(1, dtype=torch.uint8), [-1, 8]),
            lambda: _cast_rs.unpack_mask(torch.zeros(0, dtype=torch.uint8), [0]),
            lambda: _cast_rs.adams_step([torch.randn(8)], [torch.randn(8)], [torch.zeros(8)], [torch.zeros(8)],
                                        [torch.zeros(1, dtype=torch.uint8)], [(2, 4, -1)], [torch.zeros(3)],
                                        lr=0.1, beta1=0.9, beta2=0.9, eps=0.0, weight_decay=0.0, l1_decay=0.0,
                                        total_steps=1.0, mask_interval=1),
            lambda: _cast_rs.adams_step([torch.randn(8)], [torch.randn(8)], [torch.zeros(8)], [torch.zeros(8)],
                                        [None], [(40, 4, -1)], [torch.zeros(())],
                                        lr=0.1, beta1=0.9, beta2=0.9, eps=0.0, weight_decay=0.0, l1_decay=0.0,
                                        total_steps=1.0, mask_interval=1),
            lambda: _cast_rs.adams_step([torch.randn(8)], [torch.randn(8)], [torch.zeros(8)], [torch.zeros(8)],
                                        [None], [None], [torch.zeros(())], lr=float("nan"), beta1=0.9, beta2=0.9,
                                        eps=0.0, weight_decay=0.0, l1_decay=0.0, total_steps=None, mask_interval=1),
            lambda: _cast_rs.scale_forward(torch.randn(4, 8), torch.ones(4, 2), 2, 0),
            lambda: _cast_rs.scale_backward(torch.randn(3, 3), torch.randn(4, 8), torch.ones(4, 2), 2, -1),
            lambda: _cast_rs.nm_mask_numpy(__import__("numpy").zeros((2, 8), dtype="int8"), 2, 4),
        ]
        handled = 0
        for f in bad:
            try:
                f()
            except (ValueError, TypeError, cast_rs.CastError):
                pass
            handled += 1
        print("handled", handled)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "handled 13" in proc.stdout
