import math

import pytest
import torch
import torch.nn.functional as F

import cast_rs


def manual(student, teacher, labels, eta, ignore=-100):
    total_kl, total_ce, count = 0.0, 0.0, 0
    for s, t, y in zip(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), labels.reshape(-1)):
        if int(y) == ignore:
            continue
        p = torch.softmax(t.double(), -1)
        logq = torch.log_softmax(s.double(), -1)
        total_kl += float((p * (p.log() - logq)).sum())
        total_ce += float(-logq[int(y)])
        count += 1
    return eta * total_kl / count + (1 - eta) * total_ce / count


def test_matches_definition_and_ignores_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 1] = -100
    y[1, 4] = -100
    got = cast_rs.distill_loss(s, t, y)
    assert math.isclose(float(got), manual(s, t, y, 1 / 3), rel_tol=1e-5)
    got_half = cast_rs.distill_loss(s, t, y, eta=0.5)
    assert math.isclose(float(got_half), manual(s, t, y, 0.5), rel_tol=1e-5)


def test_eta_zero_is_cross_entropy_and_teacher_gets_no_grad():
    s = torch.randn(8, 7, requires_grad=True)
    t = torch.randn(8, 7, requires_grad=True)
    y = torch.randint(0, 7, (8,))
    loss = cast_rs.distill_loss(s, t, y, eta=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(s, y))
    cast_rs.distill_loss(s, t, y).backward()
    assert t.grad is None and s.grad is not None


def test_identical_logits_give_zero_kl():
    s = torch.randn(4, 9)
    y = torch.randint(0, 9, (4,))
    loss = cast_rs.distill_loss(s, s.clone(), y, eta=1.0)
    assert abs(float(loss)) < 1e-6


def test_temperature_scales_kl_by_t_squared():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    y = torch.randint(0, 9, (4,))
    kl2 = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(cast_rs.distill_loss(s, t, y, eta=1.0, temperature=2.0), kl2)


def test_all_ignored_gives_zero_with_graph():
    s = torch.randn(3, 5, requires_grad=True)
    loss = cast_rs.distill_loss(s, torch.randn(3, 5), torch.full((3,), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(3, 5))


def test_errors():
    with pytest.raises(ValueError, match="teacher_logits"):
        cast_rs.distill_loss(torch.randn(2, 3), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        cast_rs.distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="eta"):
        cast_rs.distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), eta=2.0)


def test_a_loss_step_compiles_with_fullgraph_and_matches_eager():
    # The compiled form masks the ignored tokens instead of selecting them: the same sums in
    # another order, so float32 rounding over a few hundred terms (rtol 1e-5) is the tolerance.
    torch.manual_seed(0)
    s = torch.randn(4, 8, 32, requires_grad=True)
    t = torch.randn(4, 8, 32)
    y = torch.randint(0, 32, (4, 8))
    y[0, :3] = -100
    eager = cast_rs.distill_loss(s, t, y)
    compiled = torch.compile(cast_rs.distill_loss, fullgraph=True, backend="aot_eager")
    got = compiled(s, t, y)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    (g_eager,) = torch.autograd.grad(eager, s)
    (g_comp,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-7)
    # Every token ignored: a zero loss with a graph, as eager.
    none = compiled(s, t, torch.full_like(y, -100))
    assert float(none) == 0.0 and none.requires_grad
