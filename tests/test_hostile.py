"""Hostile inputs, property-based (hypothesis): the mask, AdamS step and weight-scaling kernels
over random shapes, strides, dtypes (f32, f64, bf16, f16) and values (±0, subnormals, ±inf, NaN,
all-equal groups) on both kernel paths; every invalid call raises a clear error and leaves
parameters and optimizer state bit-identical; a subprocess runs the nastiest calls to prove
nothing takes the interpreter down.

Fast path vs generic path of the AdamS step (float32): they are NOT bit-identical, and this file
does not pretend they are. Started from identical θ, μ, v and mask, one step differs by a few
ulps in θ, μ and v because the generic path is made of torch ops, and on torch 2.13 CPU (a) the
vectorised ``Tensor.sqrt`` of float32 is not correctly rounded (1 ulp off for ~20% of inputs;
the scalar tail and NumPy are exact) and (b) the vectorised ``lerp_`` (the μ update) uses an FMA.
What is asserted instead: the fast path equals, bit for bit, the documented formula evaluated in
IEEE float32 with NumPy (for bf16/fp16: the 16-bit path's formula, torch's fused-AdamW order,
rounded once per stored value); the generic path is within a derived rounding bound of it; both
give exactly the reference N:M mask of θ at every refresh; and wherever both runs take the
generic path (f64, non-contiguous) they agree bit for bit.
"""

import math
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import cast_rs
from cast_rs.optim import NM_ATTR
from reference import RefAdamS, ref_nm_mask

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency (./run test installs it)")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SPECIAL = [0.0, -0.0, 1e-40, -1e-40, 1e-45, float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 3.0e38]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ERRORS = (ValueError, TypeError, cast_rs.CastError)

values = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True, width=32))
# The property tests below draw several tensors per example: generation is allowed to be slowish.
BIG_EXAMPLES = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
)


# --------------------------------------------------------------------------- helpers
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """The bit pattern of a tensor (NaN payloads and signed zeros included), as a new tensor."""
    t = t.detach()
    if t.dtype == torch.bool:
        return t.clone()
    return t.view(_INT_VIEW[t.element_size()]).clone()


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_exact(got, want, what):
    """Equal values, NaN where the other has NaN (any payload), zeros of the same sign."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
    keep = ~torch.isnan(want)
    assert torch.equal(bits(got)[keep], bits(want)[keep]), f"{what}: signed zeros differ"


GAP = 1234.5  # fills the storage around a strided view: reading it gives wrong results, writing it is caught
LAYOUTS = ["contiguous", "transposed", "offset", "every_other_col", "every_other_row"]


def place(x, layout):
    """``(view, storage)``: ``view`` holds ``x``'s values (2-d) with the given memory layout, and
    ``storage`` is the whole tensor it lives in, ``GAP`` everywhere the view does not cover."""
    r, c = x.shape
    x = x.clone()  # never a view of the caller's tensor (x.t().contiguous() can be one)
    if layout == "contiguous":
        return x, x
    if layout == "transposed":  # same logical tensor, column-major storage
        s = x.t().contiguous()
        return s.t(), s
    if layout == "offset":  # contiguous, but not at the start of its storage
        s = torch.full((r + 1, c), GAP, dtype=x.dtype)
        s[1:] = x
        return s[1:], s
    if layout == "every_other_col":
        s = torch.full((r, 2 * c), GAP, dtype=x.dtype)
        s[:, ::2] = x
        return s[:, ::2], s
    assert layout == "every_other_row"
    s = torch.full((2 * r, c), GAP, dtype=x.dtype)
    s[::2] = x
    return s[::2], s


@st.composite
def hostile(draw, shape, m=None, dim=-1):
    """A float64 tensor of ``shape`` with hostile values: independent, all equal, or (given a
    group size ``m`` along ``dim``) equal within each group and different across groups."""
    numel = shape[0] * shape[1]
    modes = ["free", "free", "all_equal"] + (["group_equal"] if m else [])
    mode = draw(st.sampled_from(modes))
    if mode == "all_equal":
        return torch.full(shape, draw(values), dtype=torch.float64)
    if mode == "free":
        return torch.tensor(draw(st.lists(values, min_size=numel, max_size=numel)), dtype=torch.float64).reshape(shape)
    gshape = (shape[0], shape[1] // m) if dim == -1 else (shape[0] // m, shape[1])
    per_group = draw(st.lists(values, min_size=gshape[0] * gshape[1], max_size=gshape[0] * gshape[1]))
    t = torch.tensor(per_group, dtype=torch.float64).reshape(gshape)
    return t.repeat_interleave(m, dim=1 if dim == -1 else 0)


def per_group_counts(keep, m, dim):
    if dim == -1:
        return keep.reshape(-1, m).sum(-1)
    return keep.reshape(keep.shape[0] // m, m, -1).sum(1)


# --------------------------------------------------------------------------- N:M mask
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


# --------------------------------------------------------------------------- weight scaling
@st.composite
def scale_case(draw):
    dim = draw(st.sampled_from([-1, 0]))  # -1: weight [R, C] (nn.Linear); 0: weight [C, R] (Conv1D)
    rows = draw(st.integers(0, 5))
    groups = draw(st.integers(1, 4))
    block = draw(st.integers(1, 4))
    cols = groups * block
    wshape = (rows, cols) if dim == -1 else (cols, rows)
    dtype = draw(st.sampled_from(DTYPES))
    w = draw(hostile(wshape, block, dim))  # "group_equal" here: equal within each scaled block
    a = draw(hostile((rows, groups)))
    g = draw(hostile(wshape, block, dim))
    layouts = draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 3))
    return dim, groups, dtype, w, a, g, layouts


def expand_scale(a, groups, dim, wshape):
    """A broadcast to the weight's shape: block j of input c (c // (C/n)) of row r gets A[r, j]."""
    cols = wshape[1] if dim == -1 else wshape[0]
    e = a.repeat_interleave(cols // groups, dim=1)  # [R, C]
    return e if dim == -1 else e.t()


def block_sums(x, groups, dim):
    """[R, n]: sums over each block of the input dimension of ``x`` (weight-shaped)."""
    if dim == -1:
        r, c = x.shape
        return x.reshape(r, groups, c // groups).sum(-1)
    c, r = x.shape
    return x.reshape(groups, c // groups, r).sum(1).t()


@settings(max_examples=300, **BIG_EXAMPLES)
@given(scale_case())
def test_scaling_kernels_property_match_reference_on_both_paths(case):
    """scale_forward / scale_backward against plain PyTorch on both paths: the forward and
    ∂L/∂W are single products, so exact (signed zeros and NaN included); ∂L/∂A is a reduction,
    compared with a float64 sum under a rounding bound where it is finite, and NaN wherever a
    product in the block is NaN. The inputs (and the storage around strided views) are untouched."""
    dim, groups, dtype, w64, a64, g64, (lw, la, lg) = case
    w, w_store = place(w64.to(dtype), lw)
    a, a_store = place(a64.to(dtype), la)
    g, g_store = place(g64.to(dtype), lg)
    stores = [w_store, a_store, g_store]
    before = [bits(s) for s in stores]

    wc, ac, gc = w.clone().contiguous(), a.clone().contiguous(), g.clone().contiguous()
    e = expand_scale(ac, groups, dim, tuple(w.shape))
    want_out, want_gw = wc * e, gc * e
    prod = gc.double() * wc.double()  # exact: products of two f32/bf16/f16 values fit in f64
    want_ga, abs_sum = block_sums(prod, groups, dim), block_sums(prod.abs(), groups, dim)
    nan_block = block_sums(torch.isnan(prod).double(), groups, dim) > 0
    fi = torch.finfo(dtype)
    block = (w.shape[1] if dim == -1 else w.shape[0]) // groups
    finite_block = torch.isfinite(abs_sum) & (abs_sum <= fi.max / 2)
    tiny = fi.smallest_normal * fi.eps  # the smallest subnormal
    tol = (block + 2) * fi.eps * abs_sum + (block + 1) * tiny

    for generic in (False, True):
        out = torch.ops.cast_rs.scale_forward(w, a, groups, dim, generic)
        assert_exact(out, want_out, f"forward (generic={generic})")
        gw, ga = torch.ops.cast_rs.scale_backward(g, w, a, groups, dim, generic)
        assert_exact(gw, want_gw, f"grad_w (generic={generic})")
        assert ga.dtype == dtype and tuple(ga.shape) == tuple(a.shape)
        got = ga.double()
        assert bool(torch.isnan(got)[nan_block].all()), f"grad_a: a block with a NaN product is not NaN (generic={generic})"
        err = (got - want_ga).abs()
        bad = finite_block & ~(err <= tol)
        assert not bool(bad.any()), (f"grad_a (generic={generic})", got[bad], want_ga[bad], tol[bad])
        for s, b in zip(stores, before):
            assert torch.equal(bits(s), b), f"an input was modified (generic={generic})"


# --------------------------------------------------------------------------- AdamS step
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


STEP_PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]


@st.composite
def step_case(draw):
    n, m = draw(st.sampled_from(STEP_PATTERNS))
    dim = draw(st.sampled_from([-1, -1, 0]))
    marked = dim == 0 or draw(st.booleans())  # dim-0 groups only through the sparsify marker
    groups, other = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    shape = (other, groups * m) if dim == -1 else (groups * m, other)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    grad_layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed"]))
    p = draw(hostile(shape, m, dim))
    g = draw(hostile(shape, m, dim))
    hp = dict(
        lr=draw(st.sampled_from([1e-3, 0.1])),
        betas=draw(st.sampled_from([(0.9, 0.999), (0.8, 0.9)])),
        eps=draw(st.sampled_from([1e-8, 1e-8, 0.0])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        l1_decay=draw(st.sampled_from([0.0, 0.1, 2.0])),
        total_steps=draw(st.sampled_from([1, 3, 100])),
        mask_interval=draw(st.sampled_from([1, 2])),
    )
    return (n, m, dim), marked, dtype, layout, grad_layout, p, g, hp


def step_scalars(step, hp):
    lr, (b1, b2), T = hp["lr"], hp["betas"], hp["total_steps"]
    bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
    return dict(step_size=lr / bc1, inv_bc2_sqrt=1.0 / math.sqrt(bc2), alpha=min(1.0, step / T), bc2=bc2)


def fast_path_oracle(p, g, mu, v, keep, step, hp):
    """One AdamS step as documented (AdamS docstring, src/adams/), evaluated in IEEE float32
    with NumPy (no FMA, correctly rounded sqrt, no flush-to-zero); returns (θ, μ, v)."""
    f = np.float32
    lr, (b1, b2), eps, wd, lam = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["l1_decay"]
    sc = step_scalars(step, hp)
    p, g, mu, v = (t.detach().contiguous().numpy().copy() for t in (p, g, mu, v))
    keep = keep.numpy()
    with np.errstate(all="ignore"):
        th = p * f(1.0 - lr * wd) if wd != 0.0 else p
        m = mu + f(1.0 - b1) * (g - mu)
        # src/adams/scalars.rs `sign`, as torch.sign: ±1, else +0 (for ±0 and NaN)
        sign = np.where(th > 0, f(1.0), np.where(th < 0, f(-1.0), f(0.0)))
        decayed = f(1.0 - sc["alpha"]) * m + f(sc["alpha"] * lam) * sign
        mt = np.where(keep, m, decayed)
        vv = v * f(b2) + (f(1.0 - b2) * mt) * mt
        denom = np.sqrt(vv) * f(sc["inv_bc2_sqrt"]) + f(eps)
        new = th + (-f(sc["step_size"]) * mt) / denom
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in (new, m, vv))


def fast_path_oracle_lowp(p, g, mu, v, keep, step, hp):
    """The bf16/fp16 fused step (src/adams/lowp.rs: torch's fused-AdamW order) in NumPy float32:
    inputs widened exactly, the two FMAs in float64 (the product of two float32 is exact there;
    a double-rounding tie is about one in 2^29), IEEE sqrt, then one rounding to the parameter's
    dtype by torch (round to nearest even, as the kernel). Returns (θ, μ, v)."""
    f = np.float32
    lr, (b1, b2), eps, wd, lam = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["l1_decay"]
    sc = step_scalars(step, hp)
    dtype = p.dtype
    p, g, mu, v = (t.detach().contiguous().float().numpy().copy() for t in (p, g, mu, v))
    keep = keep.numpy()

    def fma(a, b, c):
        return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)

    with np.errstate(all="ignore"):
        th = p * f(1.0 - lr * wd) if wd != 0.0 else p
        m = fma(f(1.0 - b1), g - mu, mu)
        sign = np.where(th > 0, f(1.0), np.where(th < 0, f(-1.0), f(0.0)))
        decayed = f(1.0 - sc["alpha"]) * m + f(sc["alpha"] * lam) * sign
        mt = np.where(keep, m, decayed)
        vv = fma(f(1.0 - b2) * mt, mt, v * f(b2))
        denom = np.sqrt(vv) / f(math.sqrt(sc["bc2"])) + f(eps)
        new = th + (-f(sc["step_size"]) * mt) / denom
    return tuple(torch.from_numpy(np.ascontiguousarray(x)).to(dtype) for x in (new, m, vv))


def step_tolerances(dtype, p, g, mu, v_new, step, hp):
    """Per-element bounds (θ, μ, v) on how far two correct evaluations of one AdamS step can end
    apart, started from the same θ, μ, v and mask: a few units of rounding of every quantity
    involved, plus μ̃'s rounding amplified by the division where μ̃ cancels ((1 − α)μ ≈ −αλ·sign θ,
    or a μ update g − μ that cancels) and sqrt(v) is small. |update| <= γ/(1 − β1^s)·sqrt((1 − β2^s)/(1 − β2))."""
    fi = torch.finfo(dtype)
    u, tiny = fi.eps, fi.smallest_normal * fi.eps
    lr, (_b1, b2), eps, wd, lam = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["l1_decay"]
    sc = step_scalars(step, hp)
    p, g, mu, v_new = (t.detach().double() for t in (p, g, mu, v_new))
    d_mt = 4 * u * (mu.abs() + g.abs() + sc["alpha"] * lam) + 4 * tiny
    denom = v_new.abs().sqrt() * sc["inv_bc2_sqrt"] + eps
    upd_max = sc["step_size"] * math.sqrt(sc["bc2"] / (1.0 - b2))
    tol_p = 4 * u * (p.abs() * (1.0 - lr * wd) + upd_max) + 2 * sc["step_size"] * d_mt / denom + 4 * tiny
    tol_v = 4 * u * v_new.abs() + 4 * (1.0 - b2) * (mu.abs() + g.abs() + sc["alpha"] * lam) * d_mt + 4 * tiny
    return tol_p, d_mt, tol_v


def assert_within(actual, expected, tol, what, same_nonfinite=True, where=None):
    """``same_nonfinite``: True, the same NaN / +inf / -inf elements; "finite", the same
    non-finite elements, whichever non-finite value each holds; False, not compared."""
    a, e = actual.detach().double(), expected.detach().double()
    if same_nonfinite == "finite":
        assert torch.equal(torch.isfinite(a), torch.isfinite(e)), (f"{what}: non-finite elements differ", a, e)
    elif same_nonfinite:
        for cls in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(cls(a), cls(e)), (f"{what}: non-finite elements differ ({cls.__name__})", a, e)
    both = torch.isfinite(a) & torch.isfinite(e)
    if where is not None:
        both = both & where
    bad = both & ((a - e).abs() > tol)
    assert not bool(bad.any()), (what, a[bad], e[bad], tol[bad])


def make_param(x, dtype, layout, spec, marked):
    view, store = place(x.to(dtype), layout)
    p = torch.nn.Parameter(view)  # shares the storage: a non-contiguous view stays one
    assert p.data_ptr() == view.data_ptr() and p.stride() == view.stride()
    if marked:
        setattr(p, NM_ATTR, spec)  # as cast_rs.sparsify does
    return p, store


def state_tensors(opt, p):
    st_ = opt.state[p]
    return st_["exp_avg"], st_["exp_avg_sq"], st_["mask"], st_["step"]


@settings(max_examples=200, **BIG_EXAMPLES)
@given(step_case())
# Found by a random run: N:M along dim 0, float64, a refresh at step 3. A drop mask built fresh
# at the refresh was a transposed view (the other route, `_foreach_` calls instead of
# `_fused_adam_`), the cached one contiguous: the two runs differed by one ulp.
@example(
    case=(
        (1, 2, 0),
        True,
        torch.float64,
        "contiguous",
        "contiguous",
        torch.zeros(2, 3, dtype=torch.float64),
        torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64),
        {
            "lr": 0.001,
            "betas": (0.9, 0.999),
            "eps": 1e-08,
            "weight_decay": 0.1,
            "l1_decay": 0.0,
            "total_steps": 1,
            "mask_interval": 2,
        },
    )
)
def test_step_property_over_shapes_strides_dtypes(case):
    """AdamS, three steps, fast run and forced-generic run in lockstep (the generic twin is reset
    to the fast run's θ and state before each step, so every step is compared from identical
    inputs). Each step: no error; the mask is exactly N per group and, at a refresh, exactly
    ref_nm_mask of θ before the step, else unchanged; nothing outside a strided parameter's view
    and no gradient is written; the path taken is the documented one; the two runs agree (bit for
    bit when both are generic, else the fast run is the float32 formula bit for bit and the
    generic one is within the rounding bound); a RefAdamS step from the same state agrees within
    the bound where the inputs are finite."""
    spec, marked, dtype, layout, grad_layout, p64, g64, hp = case
    n, m, dim = spec
    pattern = None if marked else (n, m)
    with torch.no_grad():
        pf, store_f = make_param(p64, dtype, layout, spec, marked)
        pg, store_g = make_param(p64, dtype, layout, spec, marked)
    gap = place(torch.zeros(p64.shape, dtype=torch.float64), layout)[1] != 0
    opt_f = cast_rs.AdamS([pf], pattern=pattern, **hp)
    opt_g = cast_rs.AdamS([pg], pattern=pattern, **hp)
    fast_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    oracle_fn = fast_path_oracle if dtype == torch.float32 else fast_path_oracle_lowp
    keep_before = None
    for s in range(1, 4):
        grad = torch.roll(g64, shifts=s - 1).to(dtype)
        gf = place(grad, grad_layout)[0]
        pf.grad, pg.grad = gf, place(grad, grad_layout)[0]
        grad_bits = bits(gf)
        with torch.no_grad():
            if s > 1:  # lockstep: the generic twin starts this step from the fast run's values
                pg.copy_(pf)
                for a, b in zip(state_tensors(opt_g, pg), state_tensors(opt_f, pf)):
                    a.copy_(b)
            p_before = pf.detach().clone()
            mu_before = opt_f.state[pf]["exp_avg"].clone() if s > 1 else torch.zeros(p64.shape, dtype=dtype)
            v_before = opt_f.state[pf]["exp_avg_sq"].clone() if s > 1 else torch.zeros(p64.shape, dtype=dtype)
        gap_f, gap_g = bits(store_f)[gap], bits(store_g)[gap]
        calls_f = list(opt_f._kernel_calls)

        opt_f.step()
        with cast_rs.force_generic_path(True):
            opt_g.step()

        # Path: the fast path is for contiguous float32 / bf16 / fp16 (parameter, gradient, state).
        used_fast = opt_f._kernel_calls[0] - calls_f[0] == 1
        assert used_fast == (fast_dtype and pf.is_contiguous() and gf.is_contiguous()), (used_fast, layout, grad_layout)
        assert opt_g._kernel_calls[0] == 0
        # Mask: exactly N per group; at a refresh the reference mask of θ before the step.
        refresh = (s - 1) % hp["mask_interval"] == 0
        want_keep = ref_nm_mask(p_before.contiguous(), n, m, dim) if refresh else keep_before
        for opt, p in ((opt_f, pf), (opt_g, pg)):
            keep = cast_rs.unpack_mask(opt.state[p]["mask"], p.shape)
            assert torch.equal(keep, want_keep), (s, refresh, p_before, keep, want_keep)
            assert bool((per_group_counts(keep, m, dim) == n).all())
            assert float(opt.state[p]["step"]) == s
        keep_before = want_keep
        # Nothing written outside the parameter's view, nor to the gradient.
        assert torch.equal(bits(store_f)[gap], gap_f) and torch.equal(bits(store_g)[gap], gap_g)
        assert same_bits(pf.grad, gf) and torch.equal(bits(pf.grad), grad_bits)
        assert pf.untyped_storage().data_ptr() == store_f.untyped_storage().data_ptr()  # still a view of it

        got_f = (pf.detach(), opt_f.state[pf]["exp_avg"], opt_f.state[pf]["exp_avg_sq"])
        got_g = (pg.detach(), opt_g.state[pg]["exp_avg"], opt_g.state[pg]["exp_avg_sq"])
        names = ("param", "exp_avg", "exp_avg_sq")
        if not used_fast:
            for name, a, b in zip(names, got_g, got_f):
                assert_exact(a.contiguous(), b.contiguous(), f"step {s} {name}: generic vs generic-forced")
        else:
            oracle = oracle_fn(p_before, grad, mu_before, v_before, want_keep, s, hp)
            for name, a, b in zip(names, got_f, oracle):
                assert_exact(a.contiguous(), b, f"step {s} {name}: fast path vs its formula")
            tols = step_tolerances(dtype, p_before, grad, mu_before, got_f[2], s, hp)
            # bf16/fp16: the generic path rounds every op to the dtype (eps = 1e-8 becomes 0 in
            # fp16, so 0 / 0 gives NaN where the fused path, in float32, gives 0); compare the
            # elements finite on both sides. In fp16, moreover, a v below its smallest normal
            # (6.1e-5: any |μ̃| below about 0.08 at β2 = 0.999) has lost its relative precision
            # in the generic path, and with it sqrt(v) and the update; the rounding bound holds
            # only where v stays normal on both sides, so that is where it is checked.
            where = None
            if dtype == torch.float16:
                normal = torch.finfo(dtype).smallest_normal
                where = (got_f[2].detach().double().abs() >= normal) & (got_g[2].detach().double().abs() >= normal)
            # float32: the same elements are non-finite on both paths, but not always with the
            # same value: the multi-tensor path blends μ̃ = μ + α·drop·(λ·sign(θ) − μ)
            # arithmetically (there is no `_foreach_where`), so an infinite μ gives NaN where
            # the fast path's per-element select keeps ±inf.
            for name, a, b, tol in zip(names, got_g, got_f, tols):
                assert_within(
                    a,
                    b,
                    tol,
                    f"step {s} {name}: generic vs fast",
                    same_nonfinite="finite" if dtype == torch.float32 else False,
                    where=where,
                )

        # RefAdamS, one step from the same state, where every input of the step is finite.
        finite = all(bool(torch.isfinite(t).all()) for t in (p_before, grad, mu_before, v_before))
        if finite:
            q = torch.nn.Parameter(p_before.contiguous().clone())
            ref = RefAdamS([q], {q: spec}, **hp)
            if s > 1:
                ref.state[q] = {
                    "step": s - 1,
                    "exp_avg": mu_before.contiguous().clone(),
                    "exp_avg_sq": v_before.contiguous().clone(),
                    "mask": want_keep.clone(),
                }
            q.grad = grad.contiguous().clone()
            ref.step()
            assert torch.equal(ref.state[q]["mask"], want_keep)
            want = (q.detach(), ref.state[q]["exp_avg"], ref.state[q]["exp_avg_sq"])
            tols = step_tolerances(dtype, p_before, grad, mu_before, want[2], s, hp)
            # bf16/f16: torch's fused ops (addcmul_, addcdiv_) round once where the kernel rounds
            # per op, so v and eps can underflow on one side only; compare the finite elements.
            exact_classes = dtype in (torch.float32, torch.float64)
            for name, a, b, tol in zip(names, got_f, want, tols):
                assert_within(a, b, tol, f"step {s} {name}: vs RefAdamS", same_nonfinite=exact_classes)
            if exact_classes and hp["eps"] > 0 and all(bool((t.abs() < 1e30).all()) for t in (p_before, grad)):
                assert bool(torch.isfinite(pf).all()), "finite inputs gave a non-finite parameter"


# --------------------------------------------------------------------------- invalid calls
def _other_dtype(dtype):
    return torch.float32 if dtype == torch.float64 else torch.float64


def _set_group(key, value):
    def apply(opt, victim, ctx):
        opt.param_groups[1][key] = value

    return apply


def _grad_dtype(opt, victim, ctx):
    victim.grad_dtype = None  # torch itself refuses a mismatched grad unless told to allow it
    victim.grad = torch.zeros(victim.shape, dtype=_other_dtype(victim.dtype))


def _grad_shape(opt, victim, ctx):
    # torch refuses to assign a gradient of another shape; a parameter whose data was swapped
    # for another shape after backward is how a wrong-shaped gradient reaches an optimizer.
    victim.data = torch.zeros(victim.shape[0] + 1, victim.shape[1], dtype=victim.dtype)


def _grad_sparse(opt, victim, ctx):
    victim.grad = victim.grad.to_sparse()


def _mark_indivisible(opt, victim, ctx):
    setattr(victim, NM_ATTR, ctx["bad_spec"])  # marked after construction, as a late sparsify would


def _exp_avg_shape(opt, victim, ctx):
    opt.state[victim]["exp_avg"] = torch.zeros(victim.numel() + 1, dtype=victim.dtype)


def _exp_avg_dtype(opt, victim, ctx):
    opt.state[victim]["exp_avg"] = opt.state[victim]["exp_avg"].to(_other_dtype(victim.dtype))


def _add_indivisible_group(opt, victim, ctx):
    extra = torch.nn.Parameter(torch.zeros(3, 6))
    group = {"params": [("extra", extra)] if ctx["named"] else [extra], "pattern": "2:4"}
    return lambda: opt.add_param_group(group)


# kind: (make the call invalid -> the call (default opt.step), exception, message pattern).
# {name} is the victim (the last parameter of the last group), {extra} a parameter being added.
INVALID = {
    "grad_dtype": (_grad_dtype, TypeError, "{name} gradient: expected dtype"),
    "grad_shape": (_grad_shape, ValueError, "{name} gradient: expected shape"),
    "grad_sparse": (_grad_sparse, TypeError, "{name}: AdamS does not support sparse gradients"),
    "lr_nan": (_set_group("lr", float("nan")), ValueError, r"param_groups\[1\]: lr"),
    "lr_negative": (_set_group("lr", -1e-3), ValueError, r"param_groups\[1\]: lr"),
    "lr_tensor_of_two": (_set_group("lr", torch.tensor([1e-3, 1e-3])), ValueError, r"param_groups\[1\]: lr"),
    "l1_decay_negative": (_set_group("l1_decay", -1e-3), ValueError, r"param_groups\[1\]: l1_decay"),
    "eps_inf": (_set_group("eps", float("inf")), ValueError, r"param_groups\[1\]: eps"),
    "weight_decay_nan": (_set_group("weight_decay", float("nan")), ValueError, r"param_groups\[1\]: weight_decay"),
    "betas": (_set_group("betas", (0.9, 1.0)), ValueError, r"param_groups\[1\]: betas\[1\]"),
    "mask_interval_zero": (_set_group("mask_interval", 0), ValueError, r"param_groups\[1\]: mask_interval"),
    "total_steps_float": (_set_group("total_steps", 2.5), ValueError, r"param_groups\[1\]: total_steps"),
    "total_steps_none": (_set_group("total_steps", None), ValueError, "total_steps: required"),
    "pattern": (_set_group("pattern", "5:4"), ValueError, r"param_groups\[1\]: pattern"),
    "marked_indivisible": (_mark_indivisible, ValueError, "{name}: .*not divisible by M"),
    "exp_avg_shape": (_exp_avg_shape, ValueError, "{name} state 'exp_avg': expected shape"),
    "exp_avg_dtype": (_exp_avg_dtype, TypeError, "{name} state 'exp_avg': expected dtype"),
    "add_param_group_indivisible": (_add_indivisible_group, ValueError, "{extra}: 2:4 groups .* not divisible by M=4"),
}


@st.composite
def invalid_case(draw):
    kind = draw(st.sampled_from(sorted(INVALID)))
    n, m = draw(st.sampled_from(STEP_PATTERNS))
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in range(3)]
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    shape_a = (draw(st.integers(1, 3)), m * draw(st.integers(1, 2)))
    shape_b = (1, draw(st.integers(1, 6)))
    vdim, other, size = draw(st.sampled_from([-1, 0])), draw(st.integers(1, 3)), m * draw(st.integers(1, 2))
    bad_spec = None
    if kind == "marked_indivisible":  # a dense victim with a dimension M does not divide
        size += draw(st.integers(1, m - 1))
        bad_spec = (n, m, vdim)
    shape_v = (other, size) if vdim == -1 else (size, other)
    victim_sparse = kind == "total_steps_none" or (bad_spec is None and draw(st.booleans()))
    shapes = [shape_a, shape_b, shape_v]
    vals = [draw(hostile(sh)) for sh in shapes]
    grads = [draw(hostile(sh)) for sh in shapes]
    named = draw(st.booleans())
    return kind, (n, m, vdim), dtypes, layouts, vals, grads, victim_sparse, bad_spec, named


def snapshot(opt):
    """Bits of every parameter and state tensor, other state values, and the groups."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {
        id(p): {k: ((x.dtype, tuple(x.shape), bits(x)) if isinstance(x, torch.Tensor) else x) for k, x in st_.items()}
        for p, st_ in opt.state.items()
        if st_
    }
    groups = [([id(p) for p in g["params"]], repr({k: x for k, x in g.items() if k != "params"})) for g in opt.param_groups]
    return [(p, bits(p)) for p in params], state, groups, list(opt._kernel_calls)


def assert_unchanged(opt, snap):
    params, state, groups, calls = snap
    for i, (p, b) in enumerate(params):
        assert torch.equal(bits(p), b), f"parameter {i} was modified by a failing call"
    now = {id(p): st_ for p, st_ in opt.state.items() if st_}
    assert set(now) == set(state), "optimizer state was created or dropped by a failing call"
    for pid, st_ in state.items():
        assert set(now[pid]) == set(st_), "state keys changed"
        for k, x in st_.items():
            y = now[pid][k]
            if isinstance(y, torch.Tensor):
                assert (y.dtype, tuple(y.shape)) == x[:2] and torch.equal(bits(y), x[2]), (
                    f"state {k!r} was modified by a failing call"
                )
            else:
                assert y == x, f"state {k!r} was modified by a failing call"
    assert [
        ([id(p) for p in g["params"]], repr({k: x for k, x in g.items() if k != "params"})) for g in opt.param_groups
    ] == groups
    assert list(opt._kernel_calls) == calls, "a kernel ran during a failing call"


@settings(max_examples=200, **BIG_EXAMPLES)
@given(invalid_case())
def test_invalid_call_raises_clearly_and_changes_nothing(case):
    """A valid optimizer (group 0: an N:M weight; group 1: a dense parameter, then the victim),
    stepped once so state exists; then ONE thing made invalid, always on the last parameter or
    group, so a half-done update of the earlier ones would show. The call raises the documented
    error naming the parameter or hyper-parameter, and every parameter, every state entry
    (exp_avg, exp_avg_sq, mask, step, mask_flip_rate) and every group is bit-identical."""
    kind, spec, dtypes, layouts, vals, grads, victim_sparse, bad_spec, named = case
    n, m, _ = spec
    with torch.no_grad():
        a = make_param(vals[0], dtypes[0], layouts[0], None, False)[0]
        b = make_param(vals[1], dtypes[1], layouts[1], None, False)[0]
        victim = make_param(vals[2], dtypes[2], layouts[2], spec, victim_sparse)[0]
    params = [a, b, victim]
    g0, g1 = ([("a", a)], [("b", b), ("victim", victim)]) if named else ([a], [b, victim])
    opt = cast_rs.AdamS([{"params": g0, "pattern": (n, m)}, {"params": g1}], lr=1e-3, total_steps=10, mask_interval=2)
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    opt.step()
    for p, g in zip(params, grads):  # the next step's (valid) gradients
        p.grad = torch.roll(g, 1).to(p.dtype)

    make_invalid, exc, pattern = INVALID[kind]
    call = make_invalid(opt, victim, {"bad_spec": bad_spec, "named": named}) or opt.step
    name = "parameter 'victim'" if named else "param_groups[1]['params'][1]"
    extra = "parameter 'extra'" if named else "param_groups[2]['params'][0]"
    snap = snapshot(opt)
    with pytest.raises(exc, match=pattern.format(name=re.escape(name), extra=re.escape(extra))):
        call()
    assert_unchanged(opt, snap)


def _two_groups_stepped_once():
    """Group 0: a valid 2:4 weight; group 1: a dense bias, then a 2:4 (marked) victim."""
    gen = torch.Generator().manual_seed(0)
    w, b, v = (torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in ((4, 8), (8,), (4, 8)))
    setattr(v, NM_ATTR, (2, 4, -1))
    opt = cast_rs.AdamS([{"params": [w], "pattern": "2:4"}, {"params": [b, v]}], total_steps=10)
    for p in (w, b, v):
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in (w, b, v):
        p.grad = torch.randn(p.shape, generator=gen)
    return opt, v


def _set_state(key, make):
    def apply(opt, v):
        opt.state[v][key] = make(opt.state[v])

    return apply


def _overlapping(opt, v):
    v.data = v.detach()[:1].expand(4, 8)  # 32 elements over 8 memory locations: no in-place update


# Invalid calls that AdamS.step's Python checks do not catch: only the kernel sees them. AdamS
# validates every group's kernel call before the first one writes, so earlier groups stay as
# they were, and renames the kernel's argument lists ('grads[0]') to the parameter.
KERNEL_DETECTED = {
    "grad_is_the_parameter": lambda opt, v: setattr(v, "grad", v.detach()),
    "exp_avg_sq_wrong_shape": _set_state("exp_avg_sq", lambda st_: torch.zeros(4, 7)),
    "exp_avg_sq_is_exp_avg": _set_state("exp_avg_sq", lambda st_: st_["exp_avg"]),
    "step_counter_of_two_elements": _set_state("step", lambda st_: torch.zeros(2)),
    "mask_wrong_length": _set_state("mask", lambda st_: torch.zeros(3, dtype=torch.uint8)),
    "self_overlapping_parameter": _overlapping,
}


@pytest.mark.parametrize("kind", sorted(KERNEL_DETECTED))
def test_kernel_detected_errors_leave_everything_untouched(kind):
    opt, v = _two_groups_stepped_once()
    KERNEL_DETECTED[kind](opt, v)
    snap = snapshot(opt)
    with pytest.raises(ERRORS):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("kind", sorted(KERNEL_DETECTED))
def test_kernel_detected_errors_name_the_parameter(kind):
    opt, v = _two_groups_stepped_once()
    KERNEL_DETECTED[kind](opt, v)
    with pytest.raises(ERRORS) as info:
        opt.step()
    message = str(info.value)
    assert "param_groups[1]['params'][1]" in message and "frame #" not in message, message


def test_nan_weight_sign_agrees_on_both_paths():
    """1:2 groups; the first group is two NaNs, so its second NaN is masked out (NaN ties go to
    the lower index). Both paths must leave the same state behind."""
    state = []
    for generic in (False, True):
        p = torch.nn.Parameter(torch.tensor([[float("nan"), float("nan"), 1.0, -2.0]]))
        opt = cast_rs.AdamS([p], pattern="1:2", lr=1e-3, l1_decay=0.1, total_steps=10)
        p.grad = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
        with cast_rs.force_generic_path(generic):
            opt.step()
        assert opt._kernel_calls == ([0, 1] if generic else [1, 0])
        assert torch.equal(cast_rs.unpack_mask(opt.state[p]["mask"], p.shape), torch.tensor([[True, False, False, True]]))
        state.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
    for name, a, b in zip(("param", "exp_avg"), state[0][:2], state[1][:2]):
        assert_exact(a, b, name)
    # v squares μ̃, which the two paths blend with different (equally exact) formulas for a
    # masked weight: (1 − α)·μ + αλ·sign(θ) against μ − α·μ + αλ·sign(θ), a few float32
    # roundings apart. The NaNs must be where they are.
    v_fast, v_generic = state[0][2], state[1][2]
    assert torch.equal(torch.isnan(v_fast), torch.isnan(v_generic))
    torch.testing.assert_close(v_generic, v_fast, rtol=4 * 2.0**-24, atol=0, equal_nan=True)


META_CALLS = {
    "unpack_mask": lambda: torch.ops.cast_rs.unpack_mask(torch.zeros(4, dtype=torch.uint8, device="meta"), [4, 8]),
    "nm_mask": lambda: cast_rs.nm_mask(torch.ones(4, 8, device="meta"), "2:4"),
    "scale_forward_device_mismatch": lambda: torch.ops.cast_rs.scale_forward(
        torch.ones(4, 8), torch.ones(4, 2, device="meta"), 2, -1
    ),
}


@pytest.mark.parametrize("call", sorted(META_CALLS))
def test_meta_tensors_get_a_clear_error(call):
    """A meta tensor (a model built on the meta device) either works (results on meta) or gets
    an error that says so; never an internal error or another device's name."""
    try:
        out = META_CALLS[call]()
    except ERRORS as e:
        message = str(e)
        assert "cast-rs bug" not in message and "mps" not in message.lower() and "meta" in message.lower(), message
    else:
        assert all(t.device.type == "meta" for t in (out if isinstance(out, tuple) else (out,)))


# --------------------------------------------------------------------------- no crash
def test_hostile_calls_do_not_crash_the_interpreter():
    code = textwrap.dedent(
        """
        import torch, cast_rs
        from cast_rs import _cast_rs
        from cast_rs._adams_hyper import kernel_hyper

        def op_kwargs(lr, beta1, beta2, eps, l1_decay, **rest):  # the operator's hyper list, as AdamS builds it
            group = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0, l1_decay=l1_decay)
            return dict(rest, hyper=kernel_hyper(group))

        def adams(p, g, **kw):
            opt = cast_rs.AdamS([p], total_steps=3, **kw)
            p.grad = g
            opt.step()
            opt.step()

        def nm_param(x, spec):
            p = torch.nn.Parameter(x)
            setattr(p, cast_rs.optim.NM_ATTR, spec)
            return p

        nan, inf = float("nan"), float("inf")
        hostile = torch.tensor([nan, -inf, inf, -0.0, 1e-45, -1e-40, 3e38, 0.0] * 4).reshape(4, 8)
        bad = [
            lambda: cast_rs.nm_mask(torch.randn(0, 8), "2:4"),
            lambda: cast_rs.nm_mask(torch.full((4, 8), float("nan")), "2:4"),
            lambda: cast_rs.nm_mask(torch.randn(4, 8)[:, ::2], "2:4"),
            lambda: cast_rs.nm_mask(torch.randn(4, 6), "2:4"),
            lambda: cast_rs.nm_mask(torch.randn(3, 8).to(torch.bfloat16).t(), "2:4", dim=0),
            lambda: torch.ops.cast_rs.unpack_mask(torch.zeros(1, dtype=torch.uint8), [-1, 8]),
            lambda: torch.ops.cast_rs.unpack_mask(torch.zeros(0, dtype=torch.uint8), [0]),
            lambda: torch.ops.cast_rs.adams_step_([torch.randn(8)], [torch.randn(8)], [torch.zeros(8)], [torch.zeros(8)],
                                        [torch.zeros(1, dtype=torch.uint8)], [2, 4, -1], [torch.zeros(3)], [],
                                        **op_kwargs(lr=0.1, beta1=0.9, beta2=0.9, eps=0.0, l1_decay=0.0,
                                                    total_steps=1.0, mask_interval=1)),
            lambda: torch.ops.cast_rs.adams_step_([torch.randn(8)], [torch.randn(8)], [torch.zeros(8)], [torch.zeros(8)],
                                        [None], [40, 4, -1], [torch.zeros(())], [],
                                        **op_kwargs(lr=0.1, beta1=0.9, beta2=0.9, eps=0.0, l1_decay=0.0,
                                                    total_steps=1.0, mask_interval=1)),
            lambda: torch.ops.cast_rs.adams_step_([torch.randn(8)], [torch.randn(8)], [torch.zeros(8)], [torch.zeros(8)],
                                        [None], [0, 0, 0], [torch.zeros(())], [],
                                        **op_kwargs(lr=float("nan"), beta1=0.9, beta2=0.9, eps=0.0, l1_decay=0.0,
                                                    total_steps=None, mask_interval=1)),
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(4, 8), torch.ones(4, 2), 2, 0),
            lambda: torch.ops.cast_rs.scale_backward(torch.randn(3, 3), torch.randn(4, 8), torch.ones(4, 2), 2, -1),
            lambda: cast_rs.nm_mask(__import__("numpy").zeros((2, 8), dtype="int8"), "2:4"),
            # Weight scaling: hostile strides (stride 0, storage offsets, every other column,
            # self-overlapping), empty and 3-d weights, absurd groups, hostile values.
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(1, 8).expand(4, 8), torch.ones(4, 2), 2, -1, False),
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(4, 8).as_strided((4, 8), (1, 1)), hostile[:, :2].contiguous(), 2, -1),
            lambda: torch.ops.cast_rs.scale_backward(hostile.t(), hostile.t().contiguous(), torch.ones(1, 2).expand(8, 2), 2, 0),
            lambda: torch.ops.cast_rs.scale_backward(hostile.to(torch.bfloat16)[:, ::2], hostile[:, 1::2].to(torch.bfloat16),
                                            hostile[:, :2].to(torch.bfloat16), 2, -1, True),
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(17, 9, dtype=torch.float64)[1:, 1:], torch.ones(16, 4, dtype=torch.float64), 4, -1),
            lambda: torch.ops.cast_rs.scale_backward(torch.randn(8, 0), torch.randn(8, 0), torch.ones(0, 2), 2, 0),
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(2, 4, 8), torch.ones(4, 2), 2, -1),
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(4, 8), torch.ones(4, 2), 2**62, -1),
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(4, 8), torch.ones(4, 2), -2, -1),
            lambda: torch.ops.cast_rs.scale_backward(torch.randn(4, 8, dtype=torch.float16), torch.randn(4, 8), torch.ones(4, 2), 2, -1),
            lambda: torch.ops.cast_rs.scale_forward(torch.randn(4, 8, dtype=torch.complex64), torch.ones(4, 2, dtype=torch.complex64), 2, -1),
            # AdamS steps: hostile values and strides on every dtype, empty and self-overlapping
            # parameters, a gradient that is the parameter, a stride-0 gradient.
            lambda: adams(torch.nn.Parameter(hostile.t().contiguous().t()), hostile.flip(0), pattern="2:4"),
            lambda: adams(torch.nn.Parameter(hostile.to(torch.float16)[:, ::2]), hostile[:, 1::2].to(torch.float16), pattern="2:4"),
            lambda: adams(nm_param(hostile.to(torch.bfloat16).t(), (1, 4, 0)), hostile.t().to(torch.bfloat16)),
            lambda: adams(torch.nn.Parameter(torch.randn(0, 8)), torch.randn(0, 8), pattern="2:4"),
            lambda: adams(torch.nn.Parameter(torch.randn(1, 8).expand(4, 8)), torch.randn(4, 8), pattern="2:4"),
            lambda: adams(torch.nn.Parameter(torch.randn(4, 8)), torch.randn(1, 8).expand(4, 8), pattern="2:4"),
            lambda: (lambda p: adams(p, p.detach(), pattern="2:4"))(torch.nn.Parameter(torch.randn(4, 8))),
            # A meta tensor is not an MPS one: whatever happens, no crash.
            lambda: torch.ops.cast_rs.unpack_mask(torch.zeros(4, dtype=torch.uint8, device="meta"), [4, 8]),
            lambda: torch.ops.cast_rs.scale_forward(torch.ones(4, 8), torch.ones(4, 2, device="meta"), 2, -1),
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
    assert "handled 33" in proc.stdout
