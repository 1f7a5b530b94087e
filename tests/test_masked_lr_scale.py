"""AdamS's ``masked_lr_scale`` (masked-out weights step r·lr, kept weights lr; 1 = the paper's
update) against the plain-PyTorch reference on both kernel paths in float32 (bf16/fp16, bit
for bit: test_optim_lowp.py), through the operator, and its validation."""

import copy
import math

import pytest
import torch

import cast_rs
from _adams_op import op_kwargs
from reference import RefAdamS
from test_optim import HP, assert_close_robust, grads_for, make_params, run

SHAPES = [(64, 128), (33, 16), (8, 8)]


@pytest.mark.parametrize("r", [2.5, 0.5])
def test_matches_reference(kernel_path, r):
    params = make_params(SHAPES)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hp = dict(HP, weight_decay=0.01)
    opt = cast_rs.AdamS(params, pattern="2:4", masked_lr_scale=r, **hp)
    ref = RefAdamS(ref_params, {p: (2, 4, -1) for p in ref_params}, masked_lr_scale=r, **hp)
    run(opt, params, 50)
    run(ref, ref_params, 50)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        # The masked weights' steps are r·lr: the same rounding argument at r·lr.
        assert_close_robust(p, q, HP["lr"] * max(r, 1.0), f"param {i}")
        assert torch.equal(cast_rs.unpack_mask(opt.state[p]["mask"], p.shape), ref.state[q]["mask"])
    fast, generic = opt._kernel_calls
    assert (generic == 0) if kernel_path == "fast" else (fast == 0)


def test_non_contiguous_generic_route_matches_reference():
    """Non-contiguous tensors take the generic path's `_foreach_*` route (contiguous ones with
    r != 1 take it too, covered above): the same numbers."""
    base = [torch.randn(128, 64), torch.randn(16, 32)]
    params = [torch.nn.Parameter(b.t()) for b in base]  # (64, 128) and (32, 16), transposed views
    assert not any(p.is_contiguous() for p in params)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cast_rs.AdamS(params, pattern="2:4", masked_lr_scale=3.0, **HP)
    ref = RefAdamS(ref_params, {p: (2, 4, -1) for p in ref_params}, masked_lr_scale=3.0, **HP)
    run(opt, params, 30)
    run(ref, ref_params, 30)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close_robust(p, q, HP["lr"] * 3.0, f"param {i}")
    assert opt._kernel_calls[0] == 0


def test_scale_one_is_the_default_bit_for_bit(kernel_path):
    outs = []
    for kwargs in ({}, {"masked_lr_scale": 1.0}):
        torch.manual_seed(4)
        params = make_params(SHAPES)
        opt = cast_rs.AdamS(params, pattern="2:4", **kwargs, **HP)
        run(opt, params, 20)
        outs.append([p.detach().clone() for p in params])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_masked_weights_travel_r_times_faster():
    """Once α = 1 a masked weight moves by about lr·r per step (AdamS's near-sign step), a kept
    weight's step does not depend on r: the two runs differ only where the mask removes."""
    moved = {}
    for r in (1.0, 4.0):
        torch.manual_seed(5)
        p = torch.nn.Parameter(torch.randn(32, 64))
        opt = cast_rs.AdamS(
            [p], pattern="2:4", lr=1e-3, betas=(0.9, 0.99), l1_decay=1.0, total_steps=1, mask_interval=1000, masked_lr_scale=r
        )
        start = p.detach().clone()
        for s in range(10):
            p.grad = grads_for([p], s)[0] * 1e-3  # far below λ = 1: the decay dominates
            opt.step()
        keep = cast_rs.unpack_mask(opt.state[p]["mask"], p.shape)
        moved[r] = ((p.detach() - start).abs(), keep)
    (d1, k1), (d4, k4) = moved[1.0], moved[4.0]
    assert torch.equal(k1, k4)
    masked = ~k1
    # 10 steps of lr·r, each within a few percent of a full step (|μ̃|/sqrt(v) ≈ 1 with
    # β2 = 0.99 and a constant μ̃ = λ·sign(θ)), and no weight crosses zero in 10 steps of
    # 4e-3 unless it started within 0.04 of it: compare medians.
    ratio = float(d4[masked].median() / d1[masked].median())
    assert ratio == pytest.approx(4.0, rel=0.05)
    torch.testing.assert_close(d4[k1], d1[k1], rtol=0, atol=0)


def test_operator_takes_it():
    """torch.ops.cast_rs.adams_step_ with masked_lr_scale equals the optimizer's own call."""
    torch.manual_seed(6)
    w = torch.randn(16, 32)
    g = torch.randn(16, 32) * 0.1
    p1, p2 = torch.nn.Parameter(w.clone()), w.clone()
    opt = cast_rs.AdamS([p1], pattern="2:4", lr=1e-2, l1_decay=0.1, total_steps=4, masked_lr_scale=2.0)
    p1.grad = g.clone()
    opt.step()
    mu, v = torch.zeros_like(p2), torch.zeros_like(p2)
    bits = torch.zeros((p2.numel() + 7) // 8, dtype=torch.uint8)
    step = torch.zeros(())
    torch.ops.cast_rs.adams_step_(
        [p2],
        [g.clone()],
        [mu],
        [v],
        [bits],
        [2, 4, -1],
        [step],
        [],
        **op_kwargs(
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            l1_decay=0.1,
            total_steps=4.0,
            mask_interval=10,
            masked_lr_scale=2.0,
        ),
    )
    assert torch.equal(p1.detach(), p2)
    assert torch.equal(opt.state[p1]["mask"], bits)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "2"])
def test_validation_names_it_and_changes_nothing(bad):
    p = make_params([(8, 8)])
    with pytest.raises((ValueError, TypeError), match="masked_lr_scale"):
        cast_rs.AdamS(p, pattern="2:4", total_steps=10, masked_lr_scale=bad)
    opt = cast_rs.AdamS(p, pattern="2:4", total_steps=10)
    run(opt, p, 1)
    before = (p[0].detach().clone(), {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p[0]].items()})
    opt.param_groups[0]["masked_lr_scale"] = bad
    p[0].grad = torch.ones_like(p[0])
    with pytest.raises((ValueError, TypeError), match="masked_lr_scale"):
        opt.step()
    assert torch.equal(p[0], before[0])
    for k, v in before[1].items():
        now = opt.state[p[0]][k]
        assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v


def test_state_dict_without_it_loads_as_the_paper_update():
    """A state_dict saved before the option existed has no ``masked_lr_scale`` in its groups:
    it loads and steps as r = 1."""

    def make():
        torch.manual_seed(7)
        ps = make_params([(16, 32)])
        return ps, cast_rs.AdamS(ps, pattern="2:4", **HP)

    a, oa = make()
    run(oa, a, 5)
    sd = copy.deepcopy(oa.state_dict())  # state_dict() holds the live state tensors
    for g in sd["param_groups"]:
        del g["masked_lr_scale"]
    b, ob = make()
    b[0].data.copy_(a[0].data)
    ob.load_state_dict(sd)
    run(oa, a, 5, start=5)
    run(ob, b, 5, start=5)
    assert torch.equal(a[0], b[0])
    # And a saved r survives the round trip.
    c, oc = make()
    oc.param_groups[0]["masked_lr_scale"] = 3.0
    d, od = make()
    od.load_state_dict(oc.state_dict())
    assert od.param_groups[0]["masked_lr_scale"] == 3.0


def test_suggest_lr_divides_its_floor_by_it():
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    sparse = cast_rs.sparsify(model, pattern="2:4")
    floor = sparse.suggest_lr(100)
    assert sparse.suggest_lr(100, masked_lr_scale=2.0) == pytest.approx(floor / 2, rel=1e-12)
    with pytest.raises(cast_rs.CastError, match="masked_lr_scale"):
        sparse.suggest_lr(100, masked_lr_scale=0)
