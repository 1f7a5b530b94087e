"""Baselines: magnitude, Wanda and SR-STE on the shared mask kernel."""

import pytest
import torch
from torch import nn

import cast_rs
from cast_rs import baselines
from reference import ref_nm_mask


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_magnitude_prune_matches_reference():
    model = mlp()
    w0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    assert baselines.magnitude_prune(model, "2:4") == ["0", "2"]
    for w, lin in zip(w0, (model[0], model[2])):
        assert torch.equal(lin.weight.detach(), w * ref_nm_mask(w, 2, 4))
    assert cast_rs.check_nm(model).ok


def test_wanda_uses_activation_norms():
    model = mlp()
    x = torch.randn(64, 16)
    x[:, 3] *= 100.0  # one loud input channel: Wanda must keep its weights
    w = model[0].weight.detach().clone()
    baselines.wanda_prune(model, [x[:32], x[32:]], "2:4", include=["0"])
    norms = x.pow(2).sum(0).sqrt()
    expected = w * ref_nm_mask(w.abs() * norms, 2, 4)
    torch.testing.assert_close(model[0].weight.detach(), expected)
    # Magnitude alone keeps about half of any column; the loud channel keeps almost all.
    assert float((model[0].weight[:, 3] != 0).float().mean()) > 0.9
    assert cast_rs.check_nm(model).ok and [r.name for r in cast_rs.check_nm(model)] == ["0"]
    with pytest.raises(ValueError, match="calibration"):
        baselines.wanda_prune(mlp(), [], "2:4")


def test_wanda_on_dim0_layout_uses_row_norms():
    w = torch.randn(8, 3)  # Conv1D-style [in, out]
    norms = torch.arange(1.0, 9.0)
    score = w.abs() * norms.unsqueeze(1)
    keep = cast_rs.nm_mask(score, "2:4", dim=0)
    assert torch.equal(keep, ref_nm_mask(score, 2, 4, 0))


def test_srste_forward_masks_and_gradient_is_straight_through_plus_decay():
    model = mlp()
    dense = model[0].weight.detach().clone()
    srste = baselines.SRSTE(model, "2:4", decay=0.5, include=["0"])
    keep = ref_nm_mask(dense, 2, 4)
    torch.testing.assert_close(model[0].weight, dense * keep)
    x = torch.randn(5, 16)
    out = model(x).sum()
    out.backward()
    w = model[0].parametrizations.weight.original
    # Reference: the same loss with a hand-made masked weight.
    wm = (dense * keep).requires_grad_()
    h = torch.relu(x @ wm.t() + model[0].bias.detach())
    (h @ model[2].weight.detach().t() + model[2].bias.detach()).sum().backward()
    torch.testing.assert_close(w.grad, wm.grad + 0.5 * (~keep) * dense)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert srste.finalize() == ["0"]
    assert cast_rs.check_nm(model).ok
    assert not hasattr(model[0], "parametrizations")
