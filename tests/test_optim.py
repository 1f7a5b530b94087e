"""AdamS against the plain-PyTorch reference and torch.optim.AdamW, on both kernel paths."""

import numpy as np
import pytest
import torch

import cast_rs
from reference import RefAdamS

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, l1_decay=2e-2, total_steps=40, mask_interval=7)


def make_params(shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]


def grads_for(params, step, scale=0.1):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale for p in params]


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, grads_for(params, s)):
            p.grad = g
        opt.step()


def assert_close_robust(actual, expected, lr, what, rtol=1e-4, atol=1e-5):
    """Tight agreement (rtol/atol: the dtype's rounding) for almost every element; a masked
    weight whose μ̃ cancels to ~0 can legitimately differ by rounding amplified through
    sqrt(v) ≈ ε, so allow a few such elements to differ by at most a few lr."""
    actual, expected = actual.detach(), expected.detach()
    diff = (actual.double() - expected.double()).abs()
    tight = diff <= atol + rtol * expected.double().abs()
    assert int((~tight).sum()) <= max(1, actual.numel() // 2000), f"{what}: {int((~tight).sum())} elements differ"
    assert float(diff.max()) <= 30 * lr, f"{what}: max diff {float(diff.max())}"


SHAPES = [[(64, 128)], [(33, 16), (8, 8)], [(300, 256), (12, 64), (4, 8)]]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8)])
def test_sparse_matches_reference_over_50_steps(kernel_path, shapes, pattern):
    params = make_params(shapes)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cast_rs.AdamS(params, pattern=pattern, **HP)
    n, m = pattern
    ref = RefAdamS(ref_params, {p: (n, m, -1) for p in ref_params}, **{k: v for k, v in HP.items()})
    run(opt, params, 50)
    run(ref, ref_params, 50)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close_robust(p, q, HP["lr"], f"param {i}")
        st, rst = opt.state[p], ref.state[q]
        assert torch.equal(cast_rs.unpack_mask(st["mask"], p.shape), rst["mask"])
        assert float(st["step"]) == 50.0
    # The path the test meant to exercise was really taken.
    fast, generic = opt._kernel_calls
    assert (generic == 0) if kernel_path == "fast" else (fast == 0)


@pytest.mark.parametrize("l1_mode, ramp_end, l1_decay", [("absolute", 0.5, 2e-2), ("relative", 1.0, 1.0), ("relative", 0.3, 4.0)])
def test_ramp_end_and_relative_l1_match_reference(kernel_path, l1_mode, ramp_end, l1_decay):
    """ramp_end shortens the α ramp; l1_mode="relative" makes λ = l1_decay × RMS(μ̂) of each
    tensor, measured at every refresh; both as the reference computes them."""
    params = make_params([(64, 128), (33, 16), (8, 8)])
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hp = dict(HP, l1_decay=l1_decay)
    opt = cast_rs.AdamS(params, pattern="2:4", l1_mode=l1_mode, ramp_end=ramp_end, **hp)
    ref = RefAdamS(ref_params, {p: (2, 4, -1) for p in ref_params}, l1_mode=l1_mode, ramp_end=ramp_end, **hp)
    run(opt, params, 50)
    run(ref, ref_params, 50)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close_robust(p, q, HP["lr"], f"param {i}")
        assert torch.equal(cast_rs.unpack_mask(opt.state[p]["mask"], p.shape), ref.state[q]["mask"])
        if l1_mode == "relative":
            # Measured in float64 from float32 moments on both sides: equal to ~1e-6 relative.
            assert opt.state[p]["l1_decay"] == pytest.approx(ref.state[q]["l1_decay"], rel=1e-5)
        else:
            assert "l1_decay" not in opt.state[p]


def test_relative_l1_is_scale_free():
    """Scaling every gradient by c scales the relative λ by c, so the normalised steps (and the
    weights) are the same: what l1_decay means does not depend on the model's gradient scale."""
    outs = []
    for c in (1.0, 1e-3):
        params = make_params([(32, 64)])
        torch.manual_seed(0)
        params[0].data.copy_(torch.randn(32, 64))
        opt = cast_rs.AdamS(
            params,
            pattern="2:4",
            lr=1e-2,
            betas=(0.9, 0.99),
            eps=0.0,
            l1_decay=2.0,
            total_steps=30,
            mask_interval=5,
            l1_mode="relative",
        )
        for s in range(30):
            params[0].grad = grads_for(params, s)[0] * c
            opt.step()
        outs.append((params[0].detach().clone(), opt.state[params[0]]["l1_decay"]))
    (w1, l1), (w2, l2) = outs
    assert l2 == pytest.approx(l1 * 1e-3, rel=1e-4)
    # eps = 0: Adam's step is invariant to a power-of-ten gradient scale up to float32 rounding
    # of the scaled gradients (relative 2^-24 per op), amplified by at most ~lr per step.
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-4)


def test_ramp_end_and_l1_mode_validation():
    p = make_params([(8, 8)])
    with pytest.raises(ValueError, match="ramp_end"):
        cast_rs.AdamS(p, pattern="2:4", total_steps=10, ramp_end=0.0)
    with pytest.raises(ValueError, match="ramp_end"):
        cast_rs.AdamS(p, pattern="2:4", total_steps=10, ramp_end=1.5)
    with pytest.raises(ValueError, match="l1_mode"):
        cast_rs.AdamS(p, pattern="2:4", total_steps=10, l1_mode="auto")


def test_relative_l1_resumes_bit_identically(kernel_path):
    def make():
        ps = make_params([(16, 32)])
        torch.manual_seed(3)
        ps[0].data.copy_(torch.randn(16, 32))
        return ps, cast_rs.AdamS(
            ps, pattern="2:4", l1_mode="relative", l1_decay=1.0, ramp_end=0.5, **{k: v for k, v in HP.items() if k != "l1_decay"}
        )

    a, oa = make()
    run(oa, a, 30)
    b, ob = make()
    run(ob, b, 12)
    sd = ob.state_dict()
    c, oc = make()
    c[0].data.copy_(b[0].data)
    oc.load_state_dict(sd)
    run(oc, c, 18, start=12)
    assert torch.equal(a[0], c[0]) and oa.state[a[0]]["l1_decay"] == oc.state[c[0]]["l1_decay"]


def test_dim0_marked_parameters(kernel_path):
    params = make_params([(16, 24), (8, 8)])
    setattr(params[0], cast_rs.optim.NM_ATTR, (2, 4, 0))
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cast_rs.AdamS(params, **HP)
    ref = RefAdamS(ref_params, {ref_params[0]: (2, 4, 0)}, **HP)
    run(opt, params, 50)
    run(ref, ref_params, 50)
    for p, q in zip(params, ref_params):
        assert_close_robust(p, q, HP["lr"], "dim0")
    assert torch.equal(cast_rs.unpack_mask(opt.state[params[0]]["mask"], (16, 24)), ref.state[ref_params[0]]["mask"])
    assert "mask" not in opt.state[params[1]]


def test_fast_and_generic_paths_agree():
    params = make_params([(64, 64), (16, 32)])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a = cast_rs.AdamS(params, pattern="2:4", **HP)
    b = cast_rs.AdamS(twins, pattern="2:4", **HP)
    run(a, params, 50)
    with cast_rs.force_generic_path():
        run(b, twins, 50)
    assert b._kernel_calls[0] == 0 and a._kernel_calls[1] == 0
    for p, q in zip(params, twins):
        assert_close_robust(p, q, HP["lr"], "fast vs generic")
        assert torch.equal(a.state[p]["mask"], b.state[q]["mask"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("amsgrad_free_shapes", [[(10,), (7, 3)], [(128, 64), (64,)]])
def test_dense_groups_equal_adamw(kernel_path, weight_decay, amsgrad_free_shapes):
    params = make_params(amsgrad_free_shapes)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with pytest.warns(UserWarning, match="acts as plain AdamW"):
        opt = cast_rs.AdamS(params, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    ref = torch.optim.AdamW(twins, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, foreach=False)
    run(opt, params, 60)
    run(ref, twins, 60)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_mixed_groups_and_bf16_generic():
    """A float32 sparse, a bf16 sparse and a float32 dense tensor, all on the generic path (bf16
    on the fused path: test_optim_lowp.py)."""
    w = torch.nn.Parameter(torch.randn(32, 64))
    b = torch.nn.Parameter(torch.randn(32))
    hb = torch.nn.Parameter(torch.randn(16, 32, dtype=torch.bfloat16))
    opt = cast_rs.AdamS([{"params": [w, hb], "pattern": "2:4"}, {"params": [b]}], **HP)
    twins = [torch.nn.Parameter(t.detach().clone()) for t in (w, hb, b)]
    ref = RefAdamS(twins, {twins[0]: (2, 4, -1), twins[1]: (2, 4, -1)}, **HP)
    with cast_rs.force_generic_path():
        run(opt, [w, hb, b], 20)
    run(ref, twins, 20)
    assert_close_robust(w, twins[0], HP["lr"], "w")
    torch.testing.assert_close(b, twins[2], rtol=1e-5, atol=1e-6)
    # bf16 rounds every op and the reference runs the same ops in bf16, though not fused the
    # same way: a few bf16 ulps (2^-8 relative each) over 20 steps, and, as in float32, an
    # element whose update is rounding-dominated (μ̃ ≈ 0) may take a different ±lr-sized step.
    assert_close_robust(hb.float(), twins[1].float(), HP["lr"], "bf16", rtol=0.02, atol=2e-2)
    assert opt.state[hb]["exp_avg"].dtype == torch.bfloat16
    assert opt._kernel_calls == [0, 3 * 20]


def test_masked_weights_go_to_zero_while_kept_weights_fit():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(64, 64) * 0.05)
    target = torch.randn(64, 64) * 0.05
    T = 300
    # λ at the gradient scale (|2(w - target)| ~ 0.1): the decay wins from α ≈ 1/2 on.
    opt = cast_rs.AdamS([w], lr=2e-3, pattern="2:4", l1_decay=0.1, total_steps=T)
    for _ in range(T):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    keep = cast_rs.nm_mask(w, "2:4")
    masked = w.detach()[~keep].abs()
    kept = w.detach()[keep].abs()
    # Masked weights oscillate around 0 within about lr; kept ones fit the target.
    assert float(masked.max()) < 5 * 2e-3, float(masked.max())
    assert float(kept.mean()) > 10 * float(masked.mean())
    assert float((w.detach() * keep - target * keep).abs().max()) < 0.02


def test_state_dict_resume_is_bit_identical(kernel_path, tmp_path):
    def build():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        groups = [
            {"params": [model[0].weight, model[2].weight], "pattern": "2:4"},
            {"params": [model[0].bias, model[2].bias], "weight_decay": 0.01},
        ]
        opt = cast_rs.AdamS(groups, lr=5e-3, l1_decay=1e-2, total_steps=30, mask_interval=10)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
        return model, opt, sched

    x = torch.randn(64, 16)
    y = torch.randn(64, 8)

    def train(model, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()

    m1, o1, s1 = build()
    train(m1, o1, s1, 30)

    m2, o2, s2 = build()
    train(m2, o2, s2, 15)  # resume point between mask refreshes (11 and 21)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()}, path)
    del m2, o2, s2
    m3, o3, s3 = build()
    ck = torch.load(path)
    m3.load_state_dict(ck["model"])
    o3.load_state_dict(ck["opt"])
    s3.load_state_dict(ck["sched"])
    mask_state = o3.state[m3[0].weight]["mask"]
    assert mask_state.dtype == torch.uint8 and mask_state.numel() == 16 * 32 // 8
    train(m3, o3, s3, 15)

    for (name, a), b in zip(m1.state_dict().items(), m3.state_dict().values()):
        assert torch.equal(a, b), name
    for pa, pb in zip(m1.parameters(), m3.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq", "mask"):
            if key in o1.state[pa]:
                assert torch.equal(o1.state[pa][key], o3.state[pb][key]), key


def test_closure_zero_grad_and_hooks():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = cast_rs.AdamS([w], pattern="2:4", total_steps=10)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    opt.zero_grad()
    assert w.grad is None
    before = w.detach().clone()
    opt.step()  # no gradients: nothing moves
    assert torch.equal(before, w)


def test_lr_as_tensor_and_scheduler_changes_lr():
    w = torch.nn.Parameter(torch.ones(4, 8))
    opt = cast_rs.AdamS([w], lr=torch.tensor(0.1), pattern="2:4", total_steps=10)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    w.grad = torch.ones_like(w)
    opt.step()
    sched.step()
    moved = w.detach().clone()
    w.grad = torch.ones_like(w)
    opt.step()  # lr is now 0
    assert not torch.equal(moved, torch.ones(4, 8))
    assert torch.equal(moved, w.detach())


def test_optimizer_memory_is_adamw_plus_one_bit():
    w = torch.nn.Parameter(torch.randn(256, 512))
    opt = cast_rs.AdamS([w], pattern="2:4", total_steps=10)
    w.grad = torch.randn_like(w)
    opt.step()
    st = opt.state[w]
    extra = st["mask"].numel() * st["mask"].element_size()
    assert extra * 8 == w.numel()
    assert st["exp_avg"].shape == w.shape and st["exp_avg_sq"].shape == w.shape
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "mask"}  # no flip rate before a second mask


def test_mask_flip_rate_counts_changed_groups(kernel_path):
    w = torch.nn.Parameter(torch.tensor([[9.0, 8.0, 1.0, 0.0, 0.0, 1.0, 8.0, 9.0]]))
    opt = cast_rs.AdamS([w], lr=1e-9, pattern="2:4", total_steps=10, mask_interval=2)
    w.grad = torch.zeros_like(w)
    opt.step()  # step 1: the first mask; nothing to compare it with
    assert "mask_flip_rate" not in opt.state[w]
    assert opt.state[w]["mask"].tolist() == cast_rs.nm_mask_packed(w.detach(), "2:4").tolist()
    with torch.no_grad():
        w.copy_(torch.tensor([[9.0, 8.0, 1.0, 0.0, 9.0, 8.0, 0.0, 1.0]]))  # second group flips
    opt.step()  # step 2: no refresh, rate unchanged
    opt.step()  # step 3: refresh
    assert opt.state[w]["mask_flip_rate"] == 0.5


@pytest.mark.parametrize("dim", [-1, 0])
def test_empty_local_shards_step(kernel_path, dim):
    """An FSDP2 rank can hold an empty shard (more ranks than rows): the step is a no-op."""
    p = torch.nn.Parameter(torch.zeros(0, 8))
    if dim == 0:
        p._cast_rs_nm = (2, 4, 0)
    dense = torch.nn.Parameter(torch.zeros(0))
    opt = cast_rs.AdamS([p, dense], lr=0.1, pattern="2:4" if dim == -1 else None, total_steps=5)
    for _ in range(2):
        p.grad, dense.grad = torch.zeros(0, 8), torch.zeros(0)
        opt.step()
    assert float(opt.state[p]["step"]) == 2 and opt.state[p]["mask"].numel() == 0
    assert "mask_flip_rate" not in opt.state[p]  # one refresh so far (step 1)


@pytest.mark.parametrize("cols", [8, 6])  # rows of whole bytes (packed count) and not (flag count)
def test_dim0_flip_rate_matches_mask_difference(kernel_path, cols):
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(16, cols))
    w._cast_rs_nm = (2, 4, 0)
    opt = cast_rs.AdamS([w], lr=0.3, total_steps=10, mask_interval=2)
    masks, rates = [], []
    for step in range(1, 6):
        w.grad = torch.randn_like(w)
        opt.step()
        if step % 2 == 1:
            masks.append(opt.masks()[w].clone())
            if len(masks) >= 2:
                a, b = (x.reshape(4, 4, cols) for x in masks[-2:])
                changed = int((a != b).any(dim=1).sum())
                assert opt.state[w]["mask_flip_rate"] == changed / (16 * cols // 4)
                rates.append(changed)
    assert max(rates) > 0  # the case is not vacuous


def test_numpy_scalar_hyperparameters(kernel_path):
    """NumPy scalars (np.float32 lr, np.int64 total_steps, ...) work as in torch.optim.AdamW:
    the same steps as the equal Python numbers, stored in the groups as Python numbers."""
    w0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        w = torch.nn.Parameter(w0.clone())
        opt = cast_rs.AdamS([w], **kw)
        for s in range(4):
            w.grad = torch.sin(w0 * (s + 1))
            opt.step()
        return w.detach(), opt

    np_kw = dict(
        lr=np.float32(1e-2),
        betas=(np.float32(0.9), np.float64(0.99)),
        eps=np.float64(1e-8),
        weight_decay=np.float32(0.0),
        l1_decay=np.float32(0.5),
        total_steps=np.int64(5),
        mask_interval=np.int32(2),
        ramp_end=np.float64(0.5),
        pattern=(np.int64(2), np.int64(4)),
    )
    py_kw = {k: tuple(x.item() for x in v) if isinstance(v, tuple) else v.item() for k, v in np_kw.items()}
    got, opt = run(**np_kw)
    want, _ = run(**py_kw)
    assert torch.equal(got, want)
    group = opt.param_groups[0]
    for key in ("lr", "eps", "weight_decay", "l1_decay", "ramp_end"):
        assert type(group[key]) is float, key
    assert type(group["total_steps"]) is int and type(group["mask_interval"]) is int
    assert [type(b) for b in group["betas"]] == [float, float] and group["pattern"] == "2:4"
    for bad, key in (
        (dict(total_steps=np.float64(5.0)), "total_steps"),
        (dict(mask_interval=np.bool_(True)), "mask_interval"),
        (dict(lr=np.float32("nan")), "lr"),
        (dict(l1_decay=np.float64(-1.0)), "l1_decay"),
    ):
        with pytest.raises(ValueError, match=key):
            cast_rs.AdamS([torch.nn.Parameter(w0.clone())], pattern="2:4", **dict(dict(total_steps=5), **bad))


def test_group_changed_between_steps_is_checked_again():
    """A step skips re-checking a group whose settings are unchanged since they last passed;
    any change (a scheduler's lr, a NumPy scalar, a bool where an int goes, a value out of range)
    is checked and converted as at construction, before anything is written."""
    w = torch.nn.Parameter(torch.randn(8, 16))
    opt = cast_rs.AdamS([w], lr=1e-2, total_steps=10, pattern="2:4")
    w.grad = torch.randn(8, 16)
    opt.step()
    group = opt.param_groups[0]
    for key, bad in (("mask_interval", True), ("total_steps", 2.5), ("ramp_end", 0.0), ("lr", float("nan"))):
        good = group[key]
        group[key] = bad
        before = (w.detach().clone(), opt.state[w]["exp_avg"].clone(), float(opt.state[w]["step"]))
        with pytest.raises(ValueError, match=key):
            opt.step()
        assert torch.equal(w, before[0]) and torch.equal(opt.state[w]["exp_avg"], before[1])
        assert float(opt.state[w]["step"]) == before[2]
        group[key] = good
    group["lr"] = np.float32(5e-3)
    group["mask_interval"] = np.int64(3)
    opt.step()
    assert type(group["lr"]) is float and type(group["mask_interval"]) is int
    assert float(opt.state[w]["step"]) == 2.0


def test_warmup_is_the_same_update_as_a_scaled_lr(kernel_path):
    # AdamS(warmup=w) must step exactly as AdamS whose lr a scheduler sets to lr·min(1, s/(wT)):
    # the same kernel call with the same scalar, so the parameters agree bit for bit.
    torch.manual_seed(0)
    w0 = torch.randn(8, 16)
    steps, lr, warmup = 12, 1e-2, 0.25  # ramp over the first 3 steps
    grads = [torch.randn(8, 16) for _ in range(steps)]
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    opt_a = cast_rs.AdamS([a], lr=lr, pattern="2:4", total_steps=steps, warmup=warmup)
    opt_b = cast_rs.AdamS([b], lr=lr, pattern="2:4", total_steps=steps)
    for s, g in enumerate(grads, start=1):
        opt_b.param_groups[0]["lr"] = lr * min(1.0, s / (warmup * steps))
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        assert torch.equal(a, b), s
    # Without total_steps there is nothing to take a fraction of; the range is checked.
    with pytest.raises(ValueError, match="warmup: 0.1 is a fraction of total_steps"):
        cast_rs.AdamS([torch.nn.Parameter(torch.zeros(4))], warmup=0.1)
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match=r"warmup: expected a number in \[0, 1\)"):
            cast_rs.AdamS([torch.nn.Parameter(torch.zeros(4))], total_steps=10, warmup=bad)


def test_cooldown_is_the_same_update_as_a_scaled_lr(kernel_path):
    # AdamS(cooldown=c) with a warmup must step exactly as AdamS whose lr a scheduler sets to
    # lr·min(1, s/(wT))·min(1, max(T - s + 1, 1)/(cT)): the same scalar into the same kernel,
    # so the parameters agree bit for bit, past T too (where the cooldown holds its last value
    # instead of stopping training).
    torch.manual_seed(0)
    w0 = torch.randn(8, 16)
    total, lr, warmup, cooldown = 12, 1e-2, 0.25, 0.5  # up over steps 1-3, down over 7-12
    steps = total + 3
    grads = [torch.randn(8, 16) for _ in range(steps)]
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    opt_a = cast_rs.AdamS([a], lr=lr, pattern="2:4", total_steps=total, warmup=warmup, cooldown=cooldown)
    opt_b = cast_rs.AdamS([b], lr=lr, pattern="2:4", total_steps=total)
    factors = []
    for s, g in enumerate(grads, start=1):
        factor = min(1.0, s / (warmup * total)) * min(1.0, max(total - s + 1, 1) / (cooldown * total))
        factors.append(factor)
        opt_b.param_groups[0]["lr"] = lr * factor
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        assert torch.equal(a, b), s
    # The ramp did what it says: full lr in the middle, 1/6 of it at T and after.
    assert factors[3:6] == [1.0] * 3 and factors[total - 1] == factors[-1] == 1 / 6
    # It is state-free: a group saved without it (older checkpoints) steps as cooldown 0.
    sd = opt_a.state_dict()
    del sd["param_groups"][0]["cooldown"]
    opt_c = cast_rs.AdamS([torch.nn.Parameter(a.detach().clone())], lr=lr, pattern="2:4", total_steps=total)
    opt_c.load_state_dict(sd)
    assert "cooldown" not in opt_c.param_groups[0] or opt_c.param_groups[0]["cooldown"] == 0.0
    with pytest.raises(ValueError, match="cooldown: 0.1 is a fraction of total_steps"):
        cast_rs.AdamS([torch.nn.Parameter(torch.zeros(4))], cooldown=0.1)
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match=r"cooldown: expected a number in \[0, 1\)"):
            cast_rs.AdamS([torch.nn.Parameter(torch.zeros(4))], total_steps=10, cooldown=bad)
