"""The C++ PyTorch operators (``csrc/cast_rs_ops.cpp``, issue 10): schemas, fake
implementations and autograd (``torch.library.opcheck``), the same numbers and the same
errors as the direct pyo3 route on both kernel paths, TorchScript (the C++ dispatcher, no
Python), and errors that carry the failing argument as data.

Tolerances: every comparison between the two routes is exact (``torch.equal``): both call the
same Rust entry point with the same tensors, so any difference is a bug, not rounding. The
comparisons with the plain-PyTorch reference (``reference.py``) are exact for masks (a
selection) and for scaling (one multiplication per element, as the reference); the AdamS step
is compared with ``foreach_adams_step`` to the bound used in ``test_optim.py``."""

import pytest
import torch

import cast_rs
from cast_rs import _cast_rs
from _adams_op import adams_step, op_kwargs
from reference import foreach_adams_step, ref_nm_mask

ops = torch.ops.cast_rs


def test_operators_are_registered_with_the_schemas_they_document():
    assert _cast_rs.OPERATORS
    names = {"nm_mask", "nm_mask_packed", "unpack_mask", "scale_forward", "scale_backward", "adams_step_"}
    for name in names:
        for key in ("CPU", "CUDA"):  # the C++ registrations (CUDA: the generic path, any build)
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cast_rs::{name}", key), (name, key)
    schema = ops.adams_step_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "exp_avgs", "exp_avg_sqs", "masks", "steps", "keep_cache"}
    for name in names - {"adams_step_"}:
        args = getattr(ops, name).default._schema.arguments
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in args), name


@pytest.mark.parametrize("dim", [-1, 0])
def test_masks_match_the_reference(kernel_path, dim):
    x = torch.randn(16, 24)
    fg = kernel_path == "generic"
    keep = ops.nm_mask(x, 2, 4, dim, fg)
    assert torch.equal(keep, ref_nm_mask(x, 2, 4, dim))
    assert torch.equal(keep, cast_rs.nm_mask(x, "2:4", dim=dim))  # the Python API: the same operator
    bits = ops.nm_mask_packed(x, 2, 4, dim, fg)
    assert torch.equal(ops.unpack_mask(bits, list(x.shape)), keep)


@pytest.mark.parametrize("dim", [-1, 0])
def test_scaling_matches_the_reference(kernel_path, dim):
    fg = kernel_path == "generic"
    w = torch.randn(12, 8)  # [out, in] for dim -1, [in, out] for dim 0
    rows, cols = (12, 8) if dim == -1 else (8, 12)
    a = torch.rand(rows, 2) + 0.5
    full = a.repeat_interleave(cols // 2, dim=1)  # [rows, cols]
    ref = w * (full if dim == -1 else full.t())
    out = ops.scale_forward(w, a, 2, dim, fg)
    assert torch.equal(out, ref)
    g = torch.randn(12, 8)
    gw, ga = ops.scale_backward(g, w, a, 2, dim, fg)
    full_t = full if dim == -1 else full.t()
    assert torch.equal(gw, g * full_t)
    # Autograd through the operator (the formula registered with it, in C++).
    wr, ar = w.clone().requires_grad_(), a.clone().requires_grad_()
    ops.scale_forward(wr, ar, 2, dim, fg).backward(g)
    assert torch.equal(wr.grad, gw) and torch.equal(ar.grad, ga)


def _step_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 16), (4, 8), (6,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    mus = [torch.zeros(s) for s in shapes]
    vs = [torch.zeros(s) for s in shapes]
    masks = [torch.zeros(16, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), None]
    steps = [torch.tensor(0.0) for _ in shapes]
    return params, grads, mus, vs, masks, steps


KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, l1_decay=0.05, total_steps=10.0, mask_interval=1)


def test_adams_step_operator_with_and_without_its_cache_and_the_reference(kernel_path):
    fg = kernel_path == "generic"
    a = _step_inputs(0)
    b = [[t.clone() if t is not None else None for t in ts] for ts in _step_inputs(0)]
    cache = [torch.empty(0), torch.empty(0), None]
    for _ in range(3):
        flips, fast = ops.adams_step_(*a[:5], [2, 4, -1, 2, 4, -1, 0, 0, 0], a[5], [], force_generic=fg, **op_kwargs(**KW))
        assert fast.tolist() == [not fg] * 3
        # The same step with the generic path's mask cache (what AdamS passes): the same numbers.
        _, _, cached = adams_step(*b[:5], [(2, 4, -1), (2, 4, -1), None], b[5], mask_cache=cache, force_generic=fg, **KW)
        assert flips.tolist() == [-1 if f is None else f for f in cached]
    for x, y in zip(a[0] + a[2] + a[3] + a[5], b[0] + b[2] + b[3] + b[5]):
        assert torch.equal(x, y)
    assert flips[2] == -1 and flips[0] >= 0  # the dense tensor has no mask; the sparse ones refresh every step
    # The reference: plain-PyTorch AdamS on the two sparse tensors (mask refreshed every step).
    c = _step_inputs(0)
    ps, gs, mus, vs = c[0][:2], c[1][:2], c[2][:2], c[3][:2]
    masks = [None, None]
    for s in range(1, 4):
        foreach_adams_step(
            ps, gs, mus, vs, masks, s, lr=KW["lr"], eps=KW["eps"], l1_decay=KW["l1_decay"], total_steps=10, mask_interval=1
        )
    for x, y in zip(ps, a[0][:2]):
        # Three steps of updates of size <= lr: float32 rounding of a few ulps per step.
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert [float(s) for s in a[5]] == [3.0, 3.0, 3.0]


def test_adams_step_operator_writes_nothing_when_it_refuses():
    p, g, mu, v, masks, steps = _step_inputs(1)
    v[1] = torch.zeros(4, 7)
    before = [t.clone() for t in p + mu + steps]
    with pytest.raises(ValueError, match=r"^exp_avg_sqs\[1\]: expected shape \[4, 8\]"):
        ops.adams_step_(p, g, mu, v, masks, [2, 4, -1, 2, 4, -1, 0, 0, 0], steps, [], **op_kwargs(**KW))
    with pytest.raises(ValueError, match=r"^patterns: expected 9 values"):
        ops.adams_step_(p, g, mu, v, masks, [2, 4, -1], steps, [], **op_kwargs(**KW))
    with pytest.raises(ValueError, match=r"^grads: expected 3 entries"):
        ops.adams_step_(p, g[:2], mu, v, masks, [0] * 9, steps, [], **op_kwargs(**KW))
    with pytest.raises(ValueError, match=r"^mask_interval: expected an integer >= 1, got -1"):
        ops.adams_step_(p, g, mu, v, masks, [0] * 9, steps, [], **op_kwargs(**{**KW, "mask_interval": -1}))
    assert all(torch.equal(x, y) for x, y in zip(p + mu + steps, before))
    assert all(int(m.sum()) == 0 for m in masks[:2])


BAD_CALLS = {
    "pattern_m_too_large": lambda x: ops.nm_mask(x, 2, 64),
    "n_equals_m": lambda x: ops.nm_mask(x, 4, 4),
    "not_divisible": lambda x: ops.nm_mask_packed(x, 2, 5),
    "bad_dim": lambda x: ops.nm_mask(x.reshape(2, 4, 6), 2, 4, 1),
    "int_tensor": lambda x: ops.nm_mask(x.long(), 2, 4),
    "unpack_wrong_len": lambda x: ops.unpack_mask(torch.zeros(3, dtype=torch.uint8), [4, 8]),
    "scale_shape": lambda x: ops.scale_forward(x, torch.ones(4, 3), 2),
    "scale_dtype": lambda x: ops.scale_forward(x, torch.ones(4, 2, dtype=torch.float64), 2),
    "scale_groups": lambda x: ops.scale_forward(x, torch.ones(4, 5), 5),
    "grad_shape": lambda x: ops.scale_backward(x[:2], x, torch.ones(4, 2), 2),
    "linear_in_features": lambda x: ops.nm_linear(
        x, torch.zeros(16 * 8), torch.zeros(16 * 8 // 16, dtype=torch.int32), None, 16, 16, 2, 4
    ),
    "linear_dtype": lambda x: ops.nm_linear(
        x.double(), torch.zeros(16 * 6), torch.zeros(6, dtype=torch.int32), None, 16, 12, 2, 4
    ),
}

FIELDS = ("param", "index", "detail", "other_param", "other_index")


def _raised(fn, x):
    with pytest.raises(Exception) as e:
        fn(x)
    return e.value


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_errors_are_the_same_eager_and_compiled(case):
    """One route, one error: the Rust side checks and builds the exception, which the
    operator raises as it is, called eagerly or from a compiled graph (the fake kernels hold
    no rule, so the mistake is found by the kernel when the graph runs): the same class, the
    same message and the same structured fields."""
    x = torch.randn(4, 12)
    fn = BAD_CALLS[case]
    want = _raised(fn, x)
    assert isinstance(want, (ValueError, TypeError)), want
    assert want.param is not None  # the failing argument, as data
    torch._dynamo.reset()
    got = _raised(torch.compile(fn, backend="eager", fullgraph=True), x)
    assert type(got) is type(want)
    assert str(got) == str(want)
    assert [getattr(got, f) for f in FIELDS] == [getattr(want, f) for f in FIELDS]


def test_errors_carry_the_argument_as_data():
    p, g, mu, v, masks, steps = _step_inputs(2)
    v[1] = torch.zeros(4, 7)
    with pytest.raises(ValueError) as e:
        adams_step(p, g, mu, v, masks, [(2, 4, -1), (2, 4, -1), None], steps, **KW)
    assert (e.value.param, e.value.index) == ("exp_avg_sqs", 1)
    assert e.value.detail == "expected shape [4, 8] (the parameter's), got [4, 7]"
    assert str(e.value) == f"exp_avg_sqs[1]: {e.value.detail}"
    v[1] = torch.zeros(4, 8)
    with pytest.raises(ValueError) as e:
        adams_step(p, [g[0], mu[1], g[2]], mu, v, masks, [(2, 4, -1), (2, 4, -1), None], steps, **KW)
    assert (e.value.param, e.value.index, e.value.other_param, e.value.other_index) == ("exp_avgs", 1, "grads", 1)
    assert e.value.detail == "shares memory with {other}; each buffer must be its own tensor"
    with pytest.raises(ValueError) as e:
        adams_step(p, g, mu, v, masks, [(2, 4, -1), (2, 4, -1), None], steps, **{**KW, "lr": -1.0})
    assert (e.value.param, e.value.index) == ("lr", None)


@pytest.mark.filterwarnings("ignore:cast_rs.AdamS. no parameter is sparse")
def test_adams_names_both_parameters_when_their_state_shares_memory():
    """The renaming from the kernel's lists to the user's parameters reads the error's data,
    including the second buffer of an aliasing error."""
    a, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))
    opt = cast_rs.AdamS([a, b], lr=1e-3)
    a.grad, b.grad = torch.randn(8, 16), torch.randn(8, 16)
    opt.step()
    opt.state[b]["exp_avg"] = opt.state[a]["exp_avg"]
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError) as e:
        opt.step()
    assert str(e.value) == (
        "param_groups[0]['params'][1] state 'exp_avg': shares memory with "
        "param_groups[0]['params'][0] state 'exp_avg'; each buffer must be its own tensor"
    )
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_opcheck_schemas_fakes_and_autograd():
    """torch.library.opcheck: the schema's mutation annotations hold, the fake implementation
    agrees with the kernel, autograd is registered (or absent) consistently, and the
    operator survives AOT dispatch."""
    x = torch.randn(8, 16)
    torch.library.opcheck(ops.nm_mask.default, (x, 2, 4, -1, False))
    torch.library.opcheck(ops.nm_mask_packed.default, (x, 2, 4, 0, False))
    torch.library.opcheck(ops.unpack_mask.default, (ops.nm_mask_packed(x, 2, 4), [8, 16]))
    w, a = torch.randn(8, 16, requires_grad=True), torch.rand(8, 4, requires_grad=True)
    torch.library.opcheck(ops.scale_forward.default, (w, a, 4, -1, False))
    g = torch.randn(8, 16)
    torch.library.opcheck(ops.scale_backward.default, (g, w.detach(), a.detach(), 4, -1, False))
    p, gr, mu, v, masks, steps = _step_inputs(3)
    torch.library.opcheck(
        ops.adams_step_.default,
        (p, gr, mu, v, masks, [2, 4, -1, 2, 4, -1, 0, 0, 0], steps, []),
        op_kwargs(**KW),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_fake_tensors_give_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(6, 32)
        assert ops.nm_mask(x, 2, 4).shape == (6, 32)
        assert ops.nm_mask_packed(x, 2, 4).shape == (24,)
        assert ops.scale_forward(x, torch.empty(6, 4), 4).shape == (6, 32)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script. is deprecated")
def test_torchscript_calls_the_operators_without_python():
    """A scripted function runs the operators through the C++ dispatcher, as a C++ caller
    (torch::jit, or c10::Dispatcher) would."""

    @torch.jit.script
    def masked_scaled(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.ops.cast_rs.scale_forward(w, a, 2, -1, False) * torch.ops.cast_rs.nm_mask(w, 2, 4, -1, False)

    w, a = torch.randn(4, 8), torch.rand(4, 2)
    assert "cast_rs::nm_mask" in str(masked_scaled.graph)
    assert torch.equal(masked_scaled(w, a), torch.ops.cast_rs.scale_forward(w, a, 2) * cast_rs.nm_mask(w))
