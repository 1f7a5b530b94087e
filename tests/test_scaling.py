"""Weight scaling kernels against the definition, gradcheck, fast vs generic."""

import pytest
import torch

import cast_rs


def ref_scale(w, a, groups, dim):
    """W · A[r, c // (C/n)] written with repeat_interleave."""
    if dim == -1:
        return w * a.repeat_interleave(w.shape[1] // groups, dim=1)
    return w * a.t().repeat_interleave(w.shape[0] // groups, dim=0)


@pytest.mark.parametrize(
    "dim,shape,groups", [(-1, (6, 16), 2), (-1, (5, 12), 3), (0, (16, 6), 2), (0, (12, 7), 4), (-1, (300, 512), 2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward_match_reference(kernel_path, dim, shape, groups, dtype):
    w = torch.randn(shape, dtype=dtype, requires_grad=True)
    rows = shape[0] if dim == -1 else shape[1]
    a = (1 + 0.1 * torch.randn(rows, groups, dtype=dtype)).requires_grad_()
    out = cast_rs.scale_weight(w, a, groups, dim)
    w2, a2 = w.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    ref = ref_scale(w2, a2, groups, dim)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim,shape", [(-1, (4, 8)), (0, (8, 3))])
def test_gradcheck_double(kernel_path, dim, shape):
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rows = shape[0] if dim == -1 else shape[1]
    a = torch.randn(rows, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, a: cast_rs.scale_weight(w, a, 2, dim), (w, a))


def test_fast_and_generic_agree():
    w = torch.randn(64, 128)
    a = torch.randn(64, 2)
    g = torch.randn(64, 128)
    fast = torch.ops.cast_rs.scale_backward(g, w, a, 2, -1, False)
    generic = torch.ops.cast_rs.scale_backward(g, w, a, 2, -1, True)
    torch.testing.assert_close(fast[0], generic[0], rtol=0, atol=0)
    torch.testing.assert_close(fast[1], generic[1], rtol=1e-5, atol=1e-5)


def test_zeros_stay_zeros_and_scale_starts_at_one():
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    ws = cast_rs.WeightScale(4, 2)
    assert torch.equal(ws.scale, torch.ones(4, 2))
    out = ws(lin.weight)
    assert torch.equal(out, lin.weight)
    with torch.no_grad():
        ws.scale.mul_(3)
    assert bool((ws(lin.weight)[:, ::2] == 0).all())


def test_bad_arguments():
    with pytest.raises(ValueError, match="groups"):
        torch.ops.cast_rs.scale_forward(torch.randn(4, 6), torch.ones(4, 4), 4, -1)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.cast_rs.scale_forward(torch.randn(4, 8), torch.ones(3, 2), 2, -1)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.cast_rs.scale_forward(torch.randn(4, 8), torch.ones(4, 2, dtype=torch.float64), 2, -1)
    with pytest.raises(ValueError, match="dim"):
        torch.ops.cast_rs.scale_forward(torch.randn(4, 8), torch.ones(4, 2), 2, 3)
    with pytest.raises(ValueError, match="scaling_groups"):
        cast_rs.WeightScale(4, 0)
