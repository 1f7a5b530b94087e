"""Bad input gets a clear error naming the parameter, and nothing is changed by it."""

import pytest
import torch

import cast_rs
from _adams_op import adams_step


def snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for p in params
        if p in opt.state
    }


def assert_unchanged(opt, params, snap):
    values, state = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    for p in params:
        if id(p) in state:
            for k, v in state[id(p)].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(opt.state[p][k], v), k
                else:
                    assert opt.state[p][k] == v, k
        else:
            assert p not in opt.state or not opt.state[p]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(pattern="4:4"), ValueError, "pattern"),
        (dict(pattern="0:4"), ValueError, "pattern"),
        (dict(pattern="5:4"), ValueError, "pattern"),
        (dict(pattern="two:four"), ValueError, "pattern"),
        (dict(pattern=[2, 4, 8]), TypeError, "pattern"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(l1_decay=-1.0), ValueError, "l1_decay"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(betas=0.9), TypeError, "betas"),
        (dict(total_steps=0), ValueError, "total_steps"),
        (dict(total_steps=1.5), ValueError, "total_steps"),
        (dict(mask_interval=0), ValueError, "mask_interval"),
    ],
)
def test_constructor_rejects_bad_hyperparameters(kwargs, exc, match):
    w = torch.nn.Parameter(torch.randn(4, 8))
    args = dict(pattern="2:4", total_steps=10)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        cast_rs.AdamS([w], **args)


def test_missing_total_steps_is_explained():
    w = torch.nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match="total_steps: required"):
        cast_rs.AdamS([w], pattern="2:4")
    w2 = torch.nn.Parameter(torch.randn(4, 8))
    setattr(w2, cast_rs.optim.NM_ATTR, (2, 4, -1))
    with pytest.raises(ValueError, match="total_steps"):
        cast_rs.AdamS([w2])


def test_indivisible_dimension_names_the_parameter():
    model = torch.nn.Linear(6, 4)
    with pytest.raises(ValueError, match=r"parameter '0\.weight'.*size 6 is not divisible by M=4"):
        cast_rs.AdamS([("0.weight", model.weight)], pattern="2:4", total_steps=10)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*not divisible"):
        cast_rs.AdamS([model.weight], pattern="2:4", total_steps=10)


def test_non_float_parameters():
    p = torch.zeros(4, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        cast_rs.AdamS([p], pattern="2:4", total_steps=10)


def test_bad_group_added_later_is_not_kept():
    w = torch.nn.Parameter(torch.randn(4, 8))
    opt = cast_rs.AdamS([w], pattern="2:4", total_steps=10)
    with pytest.raises(ValueError, match="not divisible"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 6))], "pattern": "2:4"})
    assert len(opt.param_groups) == 1


def make_trained(steps=3):
    w = torch.nn.Parameter(torch.randn(8, 16))
    b = torch.nn.Parameter(torch.randn(8))
    opt = cast_rs.AdamS([{"params": [w], "pattern": "2:4"}, {"params": [b]}], total_steps=10)
    for _ in range(steps):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    return opt, [w, b]


def test_sparse_gradient_rejected_and_nothing_changes():
    opt, params = make_trained()
    w, b = params
    w.grad = torch.randn_like(w)
    b.grad = torch.randn(8).to_sparse()
    snap = snapshot(opt, params)
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(opt, params, snap)  # group 0 (valid) was not stepped either


def test_gradient_dtype_mismatch():
    opt, params = make_trained()
    w, b = params
    snap = snapshot(opt, params)
    w.grad_dtype = None  # torch itself refuses a mismatched grad unless told to allow it
    w.grad = torch.randn(8, 16, dtype=torch.float64)
    b.grad = torch.randn(8)
    with pytest.raises(TypeError, match="gradient: expected dtype"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_hyperparameter_corrupted_after_construction():
    opt, params = make_trained()
    opt.param_groups[1]["lr"] = -1.0
    for p in params:
        p.grad = torch.randn_like(p)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_fresh_optimizer_error_creates_no_state():
    w = torch.nn.Parameter(torch.randn(8, 16))
    b = torch.nn.Parameter(torch.randn(8))
    opt = cast_rs.AdamS([{"params": [w], "pattern": "2:4"}, {"params": [b]}], total_steps=10)
    w.grad = torch.randn_like(w)
    b.grad = torch.randn(8).to_sparse()
    with pytest.raises(TypeError):
        opt.step()
    assert not opt.state


def test_corrupt_state_dict_mask_rejected():
    opt, params = make_trained()
    sd = opt.state_dict()
    sd["state"][0]["mask"] = torch.zeros(3, dtype=torch.uint8)
    opt2, _ = make_trained(0)
    with pytest.raises(ValueError, match="mask"):
        opt2.load_state_dict(sd)


def test_kernel_validates_before_writing():
    """The binding checks every tensor of the call before the first write."""
    p = [torch.randn(8, 16), torch.randn(4, 8)]
    g = [torch.randn(8, 16), torch.randn(4, 8)]
    mu = [torch.zeros(8, 16), torch.zeros(4, 8)]
    v = [torch.zeros(8, 16), torch.zeros(4, 7)]  # wrong shape in the second tensor
    masks = [torch.zeros(16, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)]
    before = [t.clone() for t in p]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, l1_decay=0.0, total_steps=10.0, mask_interval=10)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\]"):
        adams_step(p, g, mu, v, masks, [(2, 4, -1)] * 2, [torch.tensor(0.0), torch.tensor(0.0)], **kw)
    assert all(torch.equal(a, b) for a, b in zip(p, before))
    assert all(int(m.sum()) == 0 for m in masks)
    v[1] = torch.zeros(4, 8)
    masks[1] = torch.zeros(5, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"masks\[1\]"):
        adams_step(p, g, mu, v, masks, [(2, 4, -1)] * 2, [torch.tensor(0.0), torch.tensor(0.0)], **kw)
    with pytest.raises(ValueError, match="shares memory"):
        adams_step([p[0]], [p[0]], [mu[0]], [v[0]], [None], [None], [torch.tensor(0.0)], **kw)
    with pytest.raises(ValueError, match="total_steps"):
        adams_step([p[0]], [g[0]], [mu[0]], [v[0]], [masks[0]], [(2, 4, -1)], [torch.tensor(0.0)], **{**kw, "total_steps": None})
    with pytest.raises(TypeError, match="expected dtype torch.float32"):
        adams_step([p[0]], [g[0].double()], [mu[0]], [v[0]], [None], [None], [torch.tensor(0.0)], **kw)
    # Not a tensor at all: torch's operator argument parser refuses it, naming the argument.
    with pytest.raises(RuntimeError, match="for argument 'grads'"):
        adams_step([p[0]], ["not a tensor"], [mu[0]], [v[0]], [None], [None], [torch.tensor(0.0)], **kw)
    assert all(torch.equal(a, b) for a, b in zip(p, before))


def test_cast_error_is_exported():
    assert issubclass(cast_rs.CastError, Exception)
    assert not issubclass(cast_rs.CastError, (ValueError, TypeError))
    # Named as users import it, in tracebacks too (it was "_cast_rs.CastRsError").
    assert (cast_rs.CastError.__module__, cast_rs.CastError.__name__) == ("cast_rs", "CastError")
    import traceback

    try:
        raise cast_rs.CastError("finalize: example")
    except cast_rs.CastError as e:
        assert traceback.format_exception_only(e) == ["cast_rs.CastError: finalize: example\n"]


def test_tensor_subclasses_are_refused_not_crashed():
    """A DTensor (FSDP2) reaching the kernels used to segfault (no storage of its own). The
    kernel entry points refuse it with a clear CastError; AdamS steps its local shard and
    refuses a DTensor parameter whose gradient is not sharded like it. Run in a subprocess
    with a 1-process gloo group."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, socket, torch, torch.distributed as dist
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
        from torch.distributed.tensor import distribute_tensor, Replicate, Shard
        from torch.distributed.device_mesh import init_device_mesh
        import cast_rs
        mesh = init_device_mesh("cpu", (1,))
        x = distribute_tensor(torch.randn(8, 16), mesh, [Shard(0)])
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 16), mesh, [Shard(0)]))
        before = p.detach().to_local().clone()
        p.grad = distribute_tensor(torch.randn(8, 16), mesh, [Replicate()])
        opt = cast_rs.AdamS([p], pattern="2:4", total_steps=10)
        refused = 0
        for f, word in ((lambda: cast_rs.nm_mask(x, "2:4"), "DTensor"),
                        (lambda: cast_rs.nm_mask_packed(x, "2:4"), "DTensor"),
                        (opt.step, "gradient placements")):
            try:
                f()
            except cast_rs.CastError as e:
                assert word in str(e), e
                refused += 1
        assert not opt.state and torch.equal(p.detach().to_local(), before)
        p.grad = distribute_tensor(torch.randn(8, 16), mesh, [Shard(0)])
        opt.step()
        assert type(opt.state[p]["mask"]).__name__ == "DTensor"
        assert not torch.equal(p.detach().to_local(), before)
        print("refused", refused)
        dist.destroy_process_group()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "refused 3" in proc.stdout
