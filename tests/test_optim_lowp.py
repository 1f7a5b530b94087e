"""The fused bf16 / fp16 CPU path of AdamS (issue 12).

Dense groups against ``torch.optim.AdamW(fused=True)`` on the same dtype, bit for bit: the
kernel performs torch's fused-kernel operations in the same order (see ``src/adams/lowp.rs``),
so every stored value must agree exactly, step after step. Sparse groups against
``reference.ref_adams_lowp_step`` (float32 arithmetic, one rounding per stored value), also
exactly: same operations, same roundings, so the trajectories cannot drift apart.
"""

import pytest
import torch

import cast_rs
from reference import ref_adams_lowp_step, ref_nm_mask

LOWP = [torch.bfloat16, torch.float16]
# Sizes that leave tails after every vector width (16 and 32 lanes) and split into pieces.
SHAPES = [(1000,), (37, 29), (256, 72)]


def lowp_params(shapes, dtype):
    return [torch.nn.Parameter(torch.randn(*s).to(dtype)) for s in shapes]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(2000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)


def bits_equal(a, b):
    return torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16))


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_dense_groups_are_bit_identical_to_fused_adamw(dtype, weight_decay):
    params = lowp_params(SHAPES, dtype)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    init = [p.detach().clone() for p in params]
    hp = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    with pytest.warns(UserWarning, match="acts as plain AdamW"):
        opt = cast_rs.AdamS(params, **hp)
    ref = torch.optim.AdamW(twins, fused=True, **hp)
    steps = 30
    for s in range(steps):
        set_grads(params, s)
        set_grads(twins, s)
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(params, twins)):
        assert not torch.equal(p, init[i]), "the step moved nothing"
        assert bits_equal(p, q), f"param {i}: {int((p != q).sum())} of {p.numel()} differ"
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].dtype == dtype
            assert bits_equal(opt.state[p][key], ref.state[q][key]), f"param {i} {key}"
    assert opt._kernel_calls == [steps * len(SHAPES), 0]  # all on the fused path


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
# masked_lr_scale 2: masked weights step 2·lr, the kept ones lr (the select of two step sizes).
@pytest.mark.parametrize("masked_lr_scale", [1.0, 2.0])
def test_sparse_groups_equal_the_float32_reference_rounded_once(dtype, pattern, masked_lr_scale):
    n, m = pattern
    shapes = [(64, 72), (40, 16)]
    params = lowp_params(shapes, dtype)
    twins = [p.detach().clone() for p in params]
    init = [p.detach().clone() for p in params]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.02, l1_decay=2e-2)
    total, interval, steps = 40, 7, 50  # α reaches 1 at 40; masks refresh at 1, 8, 15, ...
    opt = cast_rs.AdamS(params, pattern=pattern, total_steps=total, mask_interval=interval, masked_lr_scale=masked_lr_scale, **hp)
    mus = [torch.zeros_like(t) for t in twins]
    vs = [torch.zeros_like(t) for t in twins]
    masks = [None] * len(twins)
    for s in range(1, steps + 1):
        set_grads(params, s)
        grads = [p.grad.clone() for p in params]
        opt.step()
        alpha = min(1.0, s / total)
        for i, t in enumerate(twins):
            if (s - 1) % interval == 0:
                masks[i] = ref_nm_mask(t, n, m, -1)
            ref_adams_lowp_step(
                t,
                grads[i],
                mus[i],
                vs[i],
                masks[i],
                s,
                lr=hp["lr"],
                betas=hp["betas"],
                eps=hp["eps"],
                weight_decay=hp["weight_decay"],
                l1_decay=hp["l1_decay"],
                alpha=alpha,
                masked_lr_scale=masked_lr_scale,
            )
    for i, (p, t) in enumerate(zip(params, twins)):
        st = opt.state[p]
        assert torch.equal(cast_rs.unpack_mask(st["mask"], p.shape), masks[i]), f"mask {i}"
        assert bits_equal(p, t), f"param {i}: {int((p != t).sum())} of {p.numel()} differ"
        assert bits_equal(st["exp_avg"], mus[i]) and bits_equal(st["exp_avg_sq"], vs[i]), f"state {i}"
        # The decay moved masked weights toward zero (the check is not vacuous): AdamS steps
        # them by about lr per step once the decay dominates, so over 50 steps at lr 1e-2 their
        # mean magnitude (about 0.35 for the smaller half of randn groups) at least halves.
        masked = ~masks[i]
        assert float(p.detach().float()[masked].abs().mean()) < 0.5 * float(init[i].float()[masked].abs().mean())
    assert opt._kernel_calls == [steps * len(shapes), 0]
