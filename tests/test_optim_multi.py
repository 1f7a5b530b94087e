"""The multi-tensor generic path of AdamS (csrc/adams_foreach.cpp): the path every CUDA tensor
takes, forced here on CPU. It is checked against the plain-PyTorch reference (also in
test_optim.py through the `kernel_path` fixture); these tests cover what is particular to it:
the cached `keep` tensors, (device, dtype) grouping, per-tensor step counts within one
multi-tensor call, and an operation count that does not grow with the number of parameters."""

import copy
import gc

import pytest
import torch

import cast_rs
from _adams_op import adams_step
from reference import RefAdamS
from test_optim import HP, assert_close_robust, grads_for, make_params, run


def keeps_match_masks(opt):
    """Every cached keep tensor is 1 exactly where the packed mask keeps the weight."""
    filled = {p: entry for p, entry in opt._keep_cache.items() if entry is not None and entry[0].numel()}
    assert filled, "the generic path should have cached keep tensors"
    for p, (cached, _, _) in filled.items():
        keep = cast_rs.unpack_mask(opt.state[p]["mask"], p.shape)
        assert cached.dtype == p.dtype and cached.shape == p.shape
        assert torch.equal(cached, keep.to(p.dtype))


def test_cached_keeps_follow_every_refresh():
    params = make_params([(64, 32), (16, 16)])
    opt = cast_rs.AdamS(params, pattern="2:4", **HP)  # mask_interval 7
    with cast_rs.force_generic_path():
        for s in range(30):
            for p, g in zip(params, grads_for(params, s)):
                p.grad = g
            opt.step()
            keeps_match_masks(opt)
    assert opt._kernel_calls == [0, 2 * 30]


def test_cache_equals_no_cache_bit_for_bit():
    """The optimizer (cached keep tensors) and a bare kernel call without a cache (which unpacks the
    packed masks at every call, as the torch.ops operator does) run the same multi-tensor
    arithmetic, so they agree exactly."""
    params = make_params([(32, 64), (8, 16), (24,)])
    twins = [p.detach().clone() for p in params]
    opt = cast_rs.AdamS([{"params": params[:2], "pattern": "2:4"}, {"params": params[2:]}], **HP)
    mus = [torch.zeros_like(t) for t in twins]
    vs = [torch.zeros_like(t) for t in twins]
    masks = [torch.zeros((t.numel() + 7) // 8, dtype=torch.uint8) for t in twins[:2]] + [None]
    steps = [torch.tensor(0.0) for _ in twins]
    kw = dict(
        lr=HP["lr"],
        beta1=HP["betas"][0],
        beta2=HP["betas"][1],
        eps=HP["eps"],
        weight_decay=0.0,
        l1_decay=HP["l1_decay"],
        total_steps=float(HP["total_steps"]),
        mask_interval=HP["mask_interval"],
        force_generic=True,
    )
    with cast_rs.force_generic_path():
        for s in range(25):
            grads = grads_for(params, s)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            adams_step(twins, grads, mus, vs, masks, [(2, 4, -1), (2, 4, -1), None], steps, **kw)
    for p, t in zip(params, twins):
        assert torch.equal(p.detach(), t)
    assert torch.equal(opt.state[params[0]]["mask"], masks[0])


def test_a_mask_changed_from_outside_invalidates_the_cache():
    """Writing a parameter's packed mask (as a user restoring one by hand might) bumps its
    version counter, so the next step rebuilds the keep tensor from it."""
    w = torch.nn.Parameter(torch.randn(16, 32))
    opt = cast_rs.AdamS([w], pattern="2:4", **{**HP, "mask_interval": 1000})
    with cast_rs.force_generic_path():
        run(opt, [w], 3)
        keeps_match_masks(opt)
        other = cast_rs.nm_mask_packed(torch.randn(16, 32), "2:4")
        opt.state[w]["mask"].copy_(other)
        run(opt, [w], 1, start=3)
        keeps_match_masks(opt)
        assert torch.equal(opt.state[w]["mask"], other)


def test_load_state_dict_drops_the_cache_and_resumes_exactly():
    params = make_params([(32, 32)])
    opt = cast_rs.AdamS(params, pattern="2:4", **HP)
    with cast_rs.force_generic_path():
        run(opt, params, 12)
        # state_dict() shares the live state tensors: keep a copy.
        saved_p, saved_opt = params[0].detach().clone(), copy.deepcopy(opt.state_dict())
        run(opt, params, 10, start=12)
        final = params[0].detach().clone()
        with torch.no_grad():
            params[0].copy_(saved_p)
        opt.load_state_dict(saved_opt)
        assert opt._keep_cache == {}
        run(opt, params, 10, start=12)
    assert torch.equal(params[0].detach(), final)
    assert "keep" not in str(opt.state_dict()["state"][0].keys())


def test_mixed_dtypes_and_step_counts_in_one_call():
    """float32, float64 and bfloat16 tensors in one group (three multi-tensor groups), and a
    tensor that starts late (its step count, so α and the bias corrections, differ from the
    others' within the same `_foreach_*` call)."""
    a = torch.nn.Parameter(torch.randn(16, 32))
    b = torch.nn.Parameter(torch.randn(16, 32, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(8, 16, dtype=torch.bfloat16))
    late = torch.nn.Parameter(torch.randn(16, 32))
    ps = [a, b, c, late]
    opt = cast_rs.AdamS(ps, pattern="2:4", **HP)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = RefAdamS(twins, {t: (2, 4, -1) for t in twins}, **HP)
    with cast_rs.force_generic_path():
        for s in range(20):
            for o, group in ((opt, ps), (ref, twins)):
                for i, (p, g) in enumerate(zip(group, grads_for(group, s))):
                    p.grad = g if (i < 3 or s >= 6) else None
                o.step()
    assert float(opt.state[late]["step"]) == 14.0 and float(opt.state[a]["step"]) == 20.0
    for i in (0, 1, 3):
        assert_close_robust(ps[i], twins[i], HP["lr"], f"param {i}")
    assert_close_robust(ps[2].float(), twins[2].float(), HP["lr"], "bf16", rtol=0.02, atol=2e-2)


def _top_level_aten_ops(step) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()

    def nested(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not nested(e))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_aten_ops_per_step_do_not_grow_with_parameters(weight_decay):
    """A step without a mask refresh makes the same number of top-level ATen calls for 5 and
    for 40 sparse parameters (the per-tensor work happens inside the `_foreach_*` ops)."""
    # A finalized model of an earlier test, kept alive by torch.compile's caches, keeps its
    # mask guard (a global optimizer step post-hook) re-zeroing it after every step of every
    # optimizer, which would add its ops here: free it first.
    torch._dynamo.reset()
    gc.collect()
    counts = []
    for k in (5, 40):
        ps = make_params([(16, 16)] * k)
        opt = cast_rs.AdamS(ps, pattern="2:4", weight_decay=weight_decay, **{**HP, "mask_interval": 1000, "total_steps": 1000})
        with cast_rs.force_generic_path():
            run(opt, ps, 2)  # the first step refreshes (and fills the cache)
            for p in ps:
                p.grad = torch.randn_like(p)
            counts.append(_top_level_aten_ops(opt.step))
    assert counts[0] == counts[1], counts
    # Weight decay rides in `_fused_adamw_`: it adds no call. 7 calls compute the step; the
    # operator's two small outputs (flips, paths) add an `empty` each and their conversion to
    # Python lists a `resolve_conj` and a `resolve_neg` each: 13, whatever the parameter count.
    assert counts[0] <= 13, counts


def test_strided_and_contiguous_tensors_in_one_call():
    """A transposed (non-contiguous) weight takes the `_foreach_*` route and a contiguous one
    the `_fused_adamw_` route of the same call; sparse and dense on each."""
    base = [torch.randn(32, 16), torch.randn(16, 32), torch.randn(8, 16), torch.randn(16, 8)]
    ps = [
        torch.nn.Parameter(base[0].t()),
        torch.nn.Parameter(base[1]),
        torch.nn.Parameter(base[2].t()),
        torch.nn.Parameter(base[3]),
    ]
    assert not ps[0].is_contiguous() and not ps[2].is_contiguous()
    opt = cast_rs.AdamS([{"params": ps[:2], "pattern": "2:4"}, {"params": ps[2:], "weight_decay": 0.05}], **HP)
    twins = [torch.nn.Parameter(p.detach().contiguous().clone()) for p in ps]
    ref = RefAdamS(
        [{"params": twins[:2]}, {"params": twins[2:], "weight_decay": 0.05}], {twins[0]: (2, 4, -1), twins[1]: (2, 4, -1)}, **HP
    )
    with cast_rs.force_generic_path():
        run(opt, ps, 30)
    run(ref, twins, 30)
    for i, (p, q) in enumerate(zip(ps, twins)):
        assert_close_robust(p, q, HP["lr"], f"param {i}")
    assert opt._kernel_calls == [0, 4 * 30]


@pytest.mark.parametrize("weight_decay", [2.0, 4.0])
def test_decay_factor_at_or_below_zero_keeps_the_fast_paths_signs(weight_decay):
    """lr·wd ≥ 1 makes the decay factor 1 − lr·wd zero or negative. AdamS takes sign(θ) of the
    decayed θ; the generic fused route decays inside `_fused_adamw_`, after μ̃ is built, so it
    must fold sign(1 − lr·wd) into λ. One step at α = 1 (total_steps=1), where every masked
    weight moves by about lr·sign: a wrong sign would be off by 2·lr."""
    torch.manual_seed(3)
    base = torch.randn(32, 64)
    grad = torch.randn(32, 64) * 1e-2
    runs = []
    for generic in (False, True):
        p = torch.nn.Parameter(base.clone())
        p.grad = grad.clone()
        opt = cast_rs.AdamS([p], pattern="2:4", lr=0.5, weight_decay=weight_decay, l1_decay=0.1, total_steps=1)
        with cast_rs.force_generic_path(generic):
            opt.step()
        assert opt._kernel_calls == ([0, 1] if generic else [1, 0])
        runs.append(p.detach().clone())
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
