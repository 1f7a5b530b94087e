"""sparsify → AdamS → finalize → check_nm on plain PyTorch models."""

import copy
import re

import pytest
import torch
from torch import nn

import cast_rs
from cast_rs.optim import NM_ATTR


class TinyLM(nn.Module):
    def __init__(self, vocab=32, width=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, 32)
        self.fc2 = nn.Linear(32, width)
        self.odd = nn.Linear(width, 6)  # kept: input 16 divides
        self.odd_in = nn.Linear(6, 4)  # input 6: skipped
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        h = self.emb(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h) + self.odd_in(self.odd(h)).sum(-1, keepdim=True)


def test_layers_and_skips_with_reasons():
    model = TinyLM()
    sp = cast_rs.sparsify(model, "2:4")
    assert [l.name for l in sp.layers] == ["fc1", "fc2", "odd"]
    reasons = {s.name: s.reason for s in sp.skipped}
    assert reasons["head"] == "weight tied to embedding 'emb'"
    assert "not divisible by M=4" in reasons["odd_in"]
    text = str(sp)
    assert "fc1" in text and "tied to embedding" in text
    assert getattr(model.fc1.parametrizations.weight.original, NM_ATTR) == (2, 4, -1)
    assert model.fc1.parametrizations.weight[0].scale.shape == (32, 2)


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(include=["fc*"]), ["fc1", "fc2"]),
        (dict(exclude="fc2"), ["fc1", "odd"]),
        (dict(exclude=re.compile(r"^fc\d$")), ["odd"]),
        (dict(exclude="re:odd"), ["fc1", "fc2"]),
        (dict(include=[nn.Linear], exclude=["odd"]), ["fc1", "fc2"]),
    ],
)
def test_include_exclude_rules(kw, expected):
    sp = cast_rs.sparsify(TinyLM(), "2:4", **kw)
    assert [l.name for l in sp.layers] == expected
    assert all(s.reason for s in sp.skipped)


def test_bad_rules_and_double_sparsify():
    with pytest.raises(TypeError, match="exclude"):
        cast_rs.sparsify(TinyLM(), exclude=[3])
    model = TinyLM()
    cast_rs.sparsify(model)
    with pytest.raises(RuntimeError, match="already sparsified"):
        cast_rs.sparsify(model)
    with pytest.raises(ValueError, match="scaling_groups"):
        cast_rs.sparsify(TinyLM(), scaling_groups=-1)


def train(model, teacher, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)
        with torch.no_grad():
            t = teacher(x)
        cast_rs.distill_loss(logits, t, y).backward()
        opt.step()


@pytest.mark.parametrize("scaling_groups", [2, 0])
def test_full_flow_finalize_is_exact_and_loads_into_original(kernel_path, scaling_groups):
    torch.manual_seed(0)
    model = TinyLM()
    original_keys = set(model.state_dict())
    teacher = copy.deepcopy(model).eval()
    sp = cast_rs.sparsify(model, "2:4", scaling_groups=scaling_groups)
    opt = cast_rs.AdamS(model.parameters(), lr=1e-2, l1_decay=1e-2, total_steps=30)
    x = torch.randint(0, 32, (4, 12))
    y = torch.randint(0, 32, (4, 12))
    train(model, teacher, opt, 30, x, y)
    if scaling_groups:
        assert not torch.equal(model.fc1.parametrizations.weight[0].scale, torch.ones(32, 2)), "scale must train"
    stats = sp.stats(opt)
    assert 0.5 < stats.overall <= 1.0 and all(r.mask_flip_rate is not None for r in stats)
    with torch.no_grad():
        before = model(x)
    report = sp.finalize()
    assert [r.name for r in report] == ["fc1", "fc2", "odd"]
    assert all(abs(r.kept_fraction - 0.5) < 1e-9 for r in report)
    assert 0 <= report.total_l1_removed_fraction < 0.5
    check = cast_rs.check_nm(model, "2:4")
    assert check.ok and [r.name for r in check] == ["fc1", "fc2", "odd"], str(check)
    assert not hasattr(model.fc1.weight, NM_ATTR)
    assert not any(".parametrizations." in k for k in model.state_dict())
    assert set(model.state_dict()) == original_keys
    fresh = TinyLM()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        # finalize only zeroed weights that were already small: outputs move little.
        assert float((model(x) - before).abs().max()) < 0.5 * float(before.abs().max())
    with pytest.raises(RuntimeError, match="already finalized"):
        sp.finalize()


def test_scale_is_folded_exactly():
    model = nn.Sequential(nn.Linear(8, 4))
    sp = cast_rs.sparsify(model, "2:4")
    with torch.no_grad():
        model[0].parametrizations.weight[0].scale.copy_(torch.tensor([[2.0, 3.0]] * 4))
        w = model[0].parametrizations.weight.original.clone()
    keep = cast_rs.nm_mask(w, "2:4")
    sp.finalize()
    expected = w * keep * torch.tensor([2.0] * 4 + [3.0] * 4)
    assert torch.equal(model[0].weight.detach(), expected)


def test_check_nm_on_tensors_and_unsparsified_models():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    rep = cast_rs.check_nm(w, "2:4")
    assert not rep.ok and rep[0].violating_groups == 1 and "NOT N:M" in str(rep)
    assert cast_rs.check_nm(w, "3:4").ok
    dense = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    rep = cast_rs.check_nm(dense, "2:4")
    assert not rep.ok and len(rep) == 2
    cast_rs.baselines.magnitude_prune(dense, "2:4")
    assert cast_rs.check_nm(dense, "2:4").ok
    with pytest.raises(TypeError):
        cast_rs.check_nm([1, 2, 3])
    with pytest.raises(ValueError):
        cast_rs.check_nm(torch.randn(3, 6), "2:4")


def test_adams_warns_without_sparse_parameters():
    model = nn.Linear(8, 4)
    with pytest.warns(UserWarning, match="acts as plain AdamW"):
        cast_rs.AdamS(model.parameters(), lr=1e-3)
    cast_rs.sparsify(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cast_rs.AdamS(model.parameters(), lr=1e-3, total_steps=10)


def test_export_semi_structured_explains_what_is_needed():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(cast_rs.CastError, match="finalize"):
        cast_rs.export_semi_structured(model)
    sp = cast_rs.sparsify(model)
    sp.finalize()
    with pytest.raises(cast_rs.CastError, match="CUDA"):
        cast_rs.export_semi_structured(model)
    with pytest.raises(cast_rs.CastError, match="2:4 only"):
        cast_rs.export_semi_structured(model, "1:4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_export_semi_structured_on_cuda():  # pragma: no cover - GPU only
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs compute capability >= 8.0")
    model = nn.Sequential(nn.Linear(128, 128))
    sp = cast_rs.sparsify(model)
    sp.finalize()
    model = model.cuda().half()
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
    ref = model(x)
    assert cast_rs.export_semi_structured(model) == ["0"]
    torch.testing.assert_close(model(x), ref, rtol=1e-2, atol=1e-2)


def test_check_nm_sees_parametrized_conv1d_before_finalize():
    """parametrize (and FSDP2) subclass the module's class; Conv1D must still be recognised."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 16))
    sparse = cast_rs.sparsify(model, "2:4")
    assert type(model[0]).__name__ != "Conv1D"
    report = cast_rs.check_nm(model, "2:4")
    assert [r.name for r in report] == ["0"] and report[0].dim == 0 and not report.ok
    sparse.finalize()
    assert cast_rs.check_nm(model, "2:4").ok


def test_adams_remarks_weights_replaced_after_sparsify():
    """fully_shard replaces parameters (the N:M marker is lost); AdamS restores it from the module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    cast_rs.sparsify(model, "2:4")
    plist = model[0].parametrizations.weight
    plist.original = nn.Parameter(plist.original.detach().clone())  # what fully_shard does
    assert not hasattr(plist.original, NM_ATTR)
    opt = cast_rs.AdamS(model.parameters(), lr=0.1, total_steps=5)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert "mask" in opt.state[plist.original]


def test_plain_state_dict_maps_keys_and_refuses_unfinalized_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4))
    cast_rs.sparsify(model, "2:4")
    with torch.no_grad():
        model[0].parametrizations.weight[0].scale.fill_(2.0)
    sd = model.state_dict()
    with pytest.raises(ValueError, match="0.parametrizations.weight.0.scale.*finalize"):
        cast_rs.plain_state_dict(sd)
    with torch.no_grad():
        model[0].parametrizations.weight[0].scale.fill_(1.0)
    plain = cast_rs.plain_state_dict(model.state_dict())
    assert sorted(plain) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    fresh = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4))
    fresh.load_state_dict(plain, strict=True)
    assert torch.equal(fresh[0].weight, model[0].parametrizations.weight.original)


@pytest.mark.parametrize("scaling_groups", [2, 0])
def test_deepcopy_of_a_sparsified_model_stays_sparse_for_adams(scaling_groups):
    """Parameter's deepcopy drops attributes (the N:M marker); the module's spec re-registers
    the copy, so AdamS on the copy still treats its weights as N:M."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    cast_rs.sparsify(model, "2:4", scaling_groups=scaling_groups)
    copy_ = copy.deepcopy(model)
    w = cast_rs.sparsity.original_weight(copy_[0])
    assert w is not cast_rs.sparsity.original_weight(model[0])
    opt = cast_rs.AdamS(copy_.parameters(), lr=0.1, total_steps=5)
    assert getattr(w, NM_ATTR) == (2, 4, -1)
    copy_(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert "mask" in opt.state[w]


def _finalized_tinylm(steps=20):
    torch.manual_seed(0)
    model = TinyLM()
    teacher = copy.deepcopy(model).eval()
    sp = cast_rs.sparsify(model, "2:4")
    opt = cast_rs.AdamS(model.parameters(), lr=1e-2, l1_decay=1e-2, total_steps=steps)
    x, y = torch.randint(0, 32, (4, 12)), torch.randint(0, 32, (4, 12))
    train(model, teacher, opt, steps, x, y)
    sp.finalize()
    assert cast_rs.check_nm(model, "2:4").ok and sp.mask_fixed
    return model, teacher, sp, opt, x, y


@pytest.mark.parametrize("optimizer", ["adams_continued", "adamw", "sgd_momentum"])
def test_training_after_finalize_keeps_nm(optimizer):
    """Fine-tuning a finalized model keeps it exactly N:M with no extra call, whatever the
    optimizer (one more step used to break every group: Adam's momentum from sparse training
    moves the pruned weights). The kept weights do train."""
    model, teacher, sp, opt, x, y = _finalized_tinylm()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    elif optimizer == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {l.name: l.module.weight.detach().clone() for l in sp.layers}
    train(model, teacher, opt, 50, x, y)
    assert cast_rs.check_nm(model, "2:4").ok
    for l in sp.layers:
        w = l.module.weight
        assert not bool(((w != 0) & (before[l.name] == 0)).any()), f"{l.name}: a pruned weight came back"
        assert not torch.equal(w.detach(), before[l.name]), f"{l.name}: the kept weights must train"
        assert bool((w.grad[before[l.name] == 0] == 0).all()), "masked gradients are zeroed as they accumulate"


def test_release_mask_lets_weights_become_dense():
    model, teacher, sp, _, x, y = _finalized_tinylm()
    sp.release_mask()
    assert not sp.mask_fixed
    train(model, teacher, torch.optim.AdamW(model.parameters(), lr=1e-2), 3, x, y)
    assert not cast_rs.check_nm(model, "2:4").ok
    with pytest.raises(RuntimeError, match="not finalized"):
        cast_rs.sparsify(TinyLM(), "2:4").release_mask()


def test_keep_nm_guards_a_copy_and_refuses_a_dense_model():
    """A deep copy (new parameter objects) is not covered by finalize's guard; keep_nm is."""
    model, teacher, _, _, x, y = _finalized_tinylm()
    clone = copy.deepcopy(model)
    guard = cast_rs.keep_nm(clone, "2:4")
    train(clone, teacher, torch.optim.AdamW(clone.parameters(), lr=1e-2), 20, x, y)
    assert cast_rs.check_nm(clone, "2:4").ok
    guard.release()
    with pytest.raises(ValueError, match="not exactly 2:4"):
        cast_rs.keep_nm(TinyLM(), "2:4")


def test_mask_guard_goes_away_with_its_model():
    """The guard holds its weights weakly: once the model is gone, the next step of any
    optimizer drops its masks, and the next guard created removes its hook."""
    import gc
    import weakref

    from torch.optim.optimizer import _global_optimizer_post_hooks

    def sgd_step():
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        torch.optim.SGD([p], lr=0.1).step()

    gc.collect()
    sgd_step()  # guards of earlier tests' dead models go inert...
    cast_rs.keep_nm(TinyLM_nm(), "2:4").release()  # ...and are removed
    n_hooks = len(_global_optimizer_post_hooks)
    model, _, sp, opt, _, _ = _finalized_tinylm()
    guard = sp._mask_guard
    assert len(_global_optimizer_post_hooks) == n_hooks + 1 and guard.active
    alive = weakref.ref(model)
    del model, sp, opt
    gc.collect()
    assert alive() is None
    sgd_step()
    assert not guard.active and guard._entries == []
    other = cast_rs.keep_nm(TinyLM_nm(), "2:4")
    assert len(_global_optimizer_post_hooks) == n_hooks + 1  # the new guard's hook only
    other.release()
    assert len(_global_optimizer_post_hooks) == n_hooks


def TinyLM_nm():
    """A TinyLM whose sparsify-able layers are exactly 2:4."""
    model = TinyLM()
    with torch.no_grad():
        for _, mod, dim in cast_rs.checking._nm_layers(model, (2, 4)):
            mod.weight.mul_(cast_rs.nm_mask(mod.weight, "2:4", dim=dim))
    return model


def test_suggest_lr_is_the_removed_weights_quantile_over_the_schedule_sum():
    from reference import ref_nm_mask

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    sparse = cast_rs.sparsify(model, "2:4")
    ws = [layer.weight.detach() for layer in sparse.layers]
    assert ws, "the test needs sparse layers"
    removed = torch.cat([w[~ref_nm_mask(w, 2, 4, -1)].abs() for w in ws])
    q99 = float(torch.quantile(removed, 0.99))
    assert sparse.suggest_lr(400) == pytest.approx(q99 / (0.5 * 400), rel=1e-6)
    assert sparse.suggest_lr(400, schedule_sum=1.0) == pytest.approx(q99 / 400, rel=1e-6)
    median = float(torch.quantile(removed, 0.5))
    assert sparse.suggest_lr(1000, quantile=0.5) == pytest.approx(median / 500, rel=1e-6)
    # Scale-free in the right way: weights twice as large need twice the travel.
    with torch.no_grad():
        for layer in sparse.layers:
            layer.weight.mul_(2)
    assert sparse.suggest_lr(400) == pytest.approx(2 * q99 / 200, rel=1e-6)
    # With the dense lr: half of it, never below the floor.
    floor = 2 * q99 / 200
    assert sparse.suggest_lr(400, dense_lr=1e3 * floor) == pytest.approx(500 * floor, rel=1e-6)
    assert sparse.suggest_lr(400, dense_lr=floor) == pytest.approx(floor, rel=1e-6)
    for kwargs, param in (
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"total_steps": 10, "quantile": 0.0}, "quantile"),
        ({"total_steps": 10, "schedule_sum": 1.5}, "schedule_sum"),
        ({"total_steps": 10, "dense_lr": 0.0}, "dense_lr"),
        ({"total_steps": 10, "dense_lr": float("nan")}, "dense_lr"),
    ):
        with pytest.raises(cast_rs.CastError, match=f"^{param}:"):
            sparse.suggest_lr(**kwargs)
    sparse.finalize()
    with pytest.raises(cast_rs.CastError, match="finalized"):
        sparse.suggest_lr(400)


def test_suggest_adams_halves_only_the_kept_weights_lr_for_short_runs():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    sparse = cast_rs.sparsify(model, "2:4")
    short, long_ = 10, 10**6
    floor_short, floor_long = sparse.suggest_lr(short), sparse.suggest_lr(long_)
    dense_lr = 2 * (floor_short * floor_long) ** 0.5  # half of it lies between the two floors
    assert floor_long < dense_lr / 2 < floor_short
    # Short run (floor above the dense lr): suggest_lr would raise every weight's lr to the
    # floor; suggest_adams keeps the kept weights at dense_lr / 2 and gives the masked ones
    # exactly the floor (lr · r).
    assert floor_short > dense_lr
    hp = sparse.suggest_adams(short, dense_lr=dense_lr)
    assert set(hp) == {"lr", "masked_lr_scale", "warmup", "cooldown"} and hp["warmup"] == cast_rs.sparsity.SUGGESTED_WARMUP
    assert hp["cooldown"] == 0.0  # half the dense lr: no cooldown
    assert hp["lr"] == dense_lr / 2 and hp["masked_lr_scale"] > 1
    assert hp["lr"] * hp["masked_lr_scale"] == pytest.approx(floor_short, rel=1e-12)
    assert sparse.suggest_lr(short, dense_lr=dense_lr) == floor_short
    # Longer runs: the kept weights' lr rises from dense_lr / 2 at T½ (where the floor is
    # dense_lr / 2) to dense_lr at 2 T½, linearly in the run length; the masked weights step at
    # the dense lr throughout (r = 2 at T½), and from 2 T½ on the update is the paper's (r = 1).
    half = short * floor_short / (dense_lr / 2)  # T½: the floor falls as 1/T
    for t, share in ((half, 0.5), (1.5 * half, 0.75), (1.9 * half, 0.95), (2 * half, 1.0), (long_, 1.0)):
        hp_t = sparse.suggest_adams(round(t), dense_lr=dense_lr)
        expected = min(1.0, max(0.5, round(t) / (2 * half)))  # round: total_steps is an integer
        assert expected == pytest.approx(share, abs=1e-3)
        assert hp_t["lr"] == pytest.approx(dense_lr * expected, rel=1e-9)
        # The cooldown goes with the kept weights' lr: none at half the dense lr, 10 % at all of it.
        assert hp_t["cooldown"] == pytest.approx(cast_rs.sparsity.SUGGESTED_COOLDOWN * (2 * expected - 1), abs=1e-9)
        assert sparse.suggest_lr(round(t)) < dense_lr
        assert hp_t["masked_lr_scale"] == pytest.approx(1 / expected, rel=1e-9)
        assert hp_t["lr"] * hp_t["masked_lr_scale"] == pytest.approx(dense_lr, rel=1e-12)
    assert sparse.suggest_adams(long_, dense_lr=dense_lr) == {
        "lr": dense_lr,
        "masked_lr_scale": 1.0,
        "warmup": 0.05,
        "cooldown": 0.1,
    }
    # schedule_sum / quantile reach the floor as in suggest_lr.
    hp_const = sparse.suggest_adams(short, dense_lr=dense_lr, schedule_sum=1.0, quantile=0.5)
    assert hp_const["lr"] * hp_const["masked_lr_scale"] == pytest.approx(
        max(dense_lr, sparse.suggest_lr(short, schedule_sum=1.0, quantile=0.5)), rel=1e-12
    )
    opt = cast_rs.AdamS(model.parameters(), total_steps=short, **hp)  # what it is for
    group = opt.param_groups[0]
    assert group["masked_lr_scale"] == hp["masked_lr_scale"] and group["warmup"] == 0.05 and group["cooldown"] == 0.0
    for kwargs, param in (
        ({"total_steps": 0, "dense_lr": 1e-3}, "total_steps"),
        ({"total_steps": 10, "dense_lr": 0.0}, "dense_lr"),
        ({"total_steps": 10, "dense_lr": float("inf")}, "dense_lr"),
        ({"total_steps": 10, "dense_lr": None}, "dense_lr"),
        ({"total_steps": 10, "dense_lr": 1e-3, "quantile": 2}, "quantile"),
        ({"total_steps": 10, "dense_lr": 1e-3, "schedule_sum": 0}, "schedule_sum"),
    ):
        with pytest.raises(cast_rs.CastError, match=f"^{param}:"):
            sparse.suggest_adams(**kwargs)
    with pytest.raises(TypeError):
        sparse.suggest_adams(10)  # dense_lr is required: without it there is no kept-weight lr
    sparse.finalize()
    with pytest.raises(cast_rs.CastError, match="^suggest_adams: the model is finalized"):
        sparse.suggest_adams(10, dense_lr=1e-3)


def test_suggestions_on_a_model_that_is_already_nm():
    """A one-shot pruned start (SparseGPT, magnitude) has its masked weights at zero: no travel
    floor, so suggest_adams gives the whole dense lr and the paper's update, and suggest_lr
    without dense_lr says why it has nothing to return instead of returning 0."""
    sparse = cast_rs.sparsify(TinyLM_nm(), "2:4")
    assert sparse.suggest_adams(10, dense_lr=1e-3) == {"lr": 1e-3, "masked_lr_scale": 1.0, "warmup": 0.05, "cooldown": 0.1}
    assert sparse.suggest_lr(10, dense_lr=1e-3) == 5e-4
    with pytest.raises(cast_rs.CastError, match="^suggest_lr: the weights the N:M masks remove are already zero"):
        sparse.suggest_lr(10)


def test_finalize_refuses_non_finite_weights_and_check_nm_flags_them():
    model = nn.Sequential(nn.Linear(16, 8))
    sparse = cast_rs.sparsify(model, "2:4")
    with torch.no_grad():
        sparse.layers[0].weight[1, 2] = float("nan")
    before = sparse.layers[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"finalize: layer '0': its weight holds 1 non-finite value"):
        sparse.finalize()
    assert not sparse.finalized
    assert torch.equal(sparse.layers[0].weight.detach().nan_to_num(), before.nan_to_num())
    w = torch.zeros(4, 8)
    w[0, 0] = float("inf")
    report = cast_rs.check_nm(w, "2:4")
    assert not report.ok and report[0].nonfinite == 1 and report[0].violating_groups == 0
    assert "non-finite" in str(report)
