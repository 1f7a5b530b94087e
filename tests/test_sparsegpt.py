"""SparseGPT one-shot N:M and the fixed-mask fine-tuning recipe (cast_rs.baselines)."""

import pytest
import torch
from torch import nn

import cast_rs
from _tiny_hf import tiny_llama_config
from cast_rs import baselines
from reference import ref_nm_mask, ref_sparsegpt_nm


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("pattern,blocksize", [((2, 4), 8), ((2, 4), 128), ((1, 4), 4), ((4, 8), 16)])
def test_sparsegpt_nm_matches_textbook_obs(pattern, blocksize):
    # Both sides in float64; the Cholesky route and the explicit inverses agree to ~1e-13 on a
    # Hessian this well conditioned (n ≫ columns, 1 % dampening), far inside the tolerance, so
    # the masks (a comparison of saliencies that differ by O(1)) are equal too.
    n, m = pattern
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g, dtype=torch.float64)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 32, dtype=torch.float64)
    x[:, 5] = 0  # a dead input channel: its column is pruned to zero
    h = _hessian(x)
    got, keep = baselines.sparsegpt_nm(w, h, pattern, blocksize=blocksize)
    want, want_keep = ref_sparsegpt_nm(w, h, n, m)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.all(got[:, 5] == 0)
    assert torch.all(got[~keep] == 0)
    assert torch.all(keep.reshape(6, -1, m).sum(-1) == n)
    assert torch.equal(w, w.clone())  # input untouched (returned a new tensor)


def test_sparsegpt_beats_magnitude_and_wanda_on_layer_output_error():
    # What SparseGPT is for: with the OBS update the layer's output on the calibration inputs
    # is closer to the dense one than any mask-only method can get.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3  # correlated inputs
    h = _hessian(x).float()
    out = x @ w.T
    sgpt, keep = baselines.sparsegpt_nm(w, h, "2:4")
    mag = w * ref_nm_mask(w, 2, 4)
    wanda = w * ref_nm_mask(w.abs() * x.norm(dim=0), 2, 4)
    err = lambda v: float((x @ v.T - out).square().sum())  # noqa: E731
    assert err(sgpt) < 0.8 * min(err(mag), err(wanda))


def test_sparsegpt_nm_rejects_bad_input():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="hessian: expected shape"):
        baselines.sparsegpt_nm(w, torch.eye(4))
    with pytest.raises(ValueError, match="blocksize"):
        baselines.sparsegpt_nm(w, h, blocksize=6)
    with pytest.raises(ValueError, match="percdamp"):
        baselines.sparsegpt_nm(w, h, percdamp=float("nan"))
    with pytest.raises(ValueError, match="divisible by M=4"):
        baselines.sparsegpt_nm(torch.randn(4, 6), torch.eye(6))
    bad = torch.eye(8)
    bad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="positive definite"):
        baselines.sparsegpt_nm(w, bad)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.unused = nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_sparsegpt_prune_sequential_feeds_pruned_inputs_forward():
    torch.manual_seed(0)
    batches = [torch.randn(64, 16) for _ in range(3)]
    x = torch.cat(batches)
    seq, one = Tiny(), Tiny()
    one.load_state_dict(seq.state_dict())
    dense = Tiny()
    dense.load_state_dict(seq.state_dict())
    assert baselines.sparsegpt_prune(seq, batches, "2:4", include=["a", "b"]) == ["a", "b"]
    baselines.sparsegpt_prune(one, batches, "2:4", include=["a", "b"], sequential=False)
    assert cast_rs.check_nm(seq).ok and cast_rs.check_nm(one).ok
    # The first layer sees the same (dense) inputs either way; the second sees the pruned
    # first layer's output only when sequential.
    want_a, _ = baselines.sparsegpt_nm(dense.a.weight.detach(), _hessian(x).float())
    torch.testing.assert_close(seq.a.weight.detach(), want_a)
    torch.testing.assert_close(one.a.weight.detach(), want_a)
    h_seq = _hessian(torch.relu(seq.a(x)).detach()).float()
    want_b, _ = baselines.sparsegpt_nm(dense.b.weight.detach(), h_seq)
    torch.testing.assert_close(seq.b.weight.detach(), want_b)
    assert not torch.allclose(one.b.weight, seq.b.weight)


def test_sparsegpt_prune_conv1d_layout():
    pytest.importorskip("transformers", reason="needs transformers (a test dependency)")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 16))  # weight [in=16, out=8]: groups along dim 0
    w0 = model[0].weight.detach().clone()
    batches = [torch.randn(40, 16)]
    baselines.sparsegpt_prune(model, batches, "2:4")
    want, _ = baselines.sparsegpt_nm(w0.T, _hessian(batches[0]).float())
    torch.testing.assert_close(model[0].weight.detach(), want.T)
    assert cast_rs.check_nm(model).ok


def test_sparsegpt_prune_errors_leave_the_model_unchanged():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration: expected at least one batch"):
        baselines.sparsegpt_prune(model, [], "2:4")
    with pytest.raises(ValueError, match="'unused' received no input"):
        baselines.sparsegpt_prune(model, [torch.randn(8, 16)], "2:4")
    bad = torch.randn(8, 16)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'a'.*positive definite"):
        baselines.sparsegpt_prune(model, [bad], "2:4", include=["a", "b"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(hasattr(mod, cast_rs.layers.SPARSE_MODULE_ATTR) for mod in model.modules())


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(
    "make_opt", [lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-2)]
)
def test_fixed_mask_holds_the_one_shot_support_through_training(score, make_opt):
    torch.manual_seed(0)
    model = Tiny()
    teacher = Tiny()
    teacher.load_state_dict(model.state_dict())
    batches = [torch.randn(32, 16) for _ in range(2)]
    kw = {} if score == "magnitude" else {"calibration": batches}
    fm = baselines.FixedMask(model, "2:4", score=score, include=["a", "b"], **kw)
    assert fm.layers == ["a", "b"]
    support = {n: getattr(model, n).weight.detach() != 0 for n in fm.layers}
    opt = make_opt(model.parameters())
    for _ in range(5):
        x = torch.randn(32, 16)
        loss = (model(x) - teacher(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        # Gradients of pruned weights are zero before the step (clipping and norms see them).
        assert torch.all(model.a.weight.grad[~support["a"]] == 0)
        opt.step()
    for n in fm.layers:
        w = getattr(model, n).weight.detach()
        assert torch.all(w[~support[n]] == 0), n
        assert bool((w[support[n]] != 0).all()), n  # the kept weights trained
    assert fm.finalize().ok
    fm.release()


def test_fixed_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="score: expected one of"):
        baselines.FixedMask(Tiny(), score="random")
    with pytest.raises(ValueError, match="calibration: score='wanda' needs"):
        baselines.FixedMask(Tiny(), score="wanda")
    with pytest.raises(ValueError, match="not used by score='magnitude'"):
        baselines.FixedMask(Tiny(), score="magnitude", calibration=[torch.randn(2, 16)])


class UntiedLM(nn.Module):
    def __init__(self, vocab: int = 40, width: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        x = self.tok(idx)
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


def test_output_head_stays_dense_by_default():
    model = UntiedLM()
    assert cast_rs.layers.output_heads(model) == ["head"]
    sparse = cast_rs.sparsify(model, "2:4")
    assert [l.name for l in sparse.layers] == ["blocks.0", "blocks.1"]
    reasons = {s.name: s.reason for s in sparse.skipped}
    assert "output head" in reasons["head"] and "include_head=True" in reasons["head"]
    both = cast_rs.sparsify(UntiedLM(), "2:4", include_head=True)
    assert [l.name for l in both.layers] == ["blocks.0", "blocks.1", "head"]
    # The baselines follow the same rule.
    assert baselines.magnitude_prune(UntiedLM(), "2:4") == ["blocks.0", "blocks.1"]
    # Asking for the head by name without include_head says how to get it.
    with pytest.raises(ValueError, match="include_head=True"):
        cast_rs.sparsify(UntiedLM(), "2:4", include=["head"])


def test_output_head_of_a_hugging_face_llama_is_its_lm_head():
    transformers = pytest.importorskip("transformers", reason="needs transformers (a test dependency)")
    cfg = tiny_llama_config(vocab_size=64, num_hidden_layers=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    assert cast_rs.layers.output_heads(model) == ["lm_head"]
    sparse = cast_rs.sparsify(model, "2:4")
    names = [l.name for l in sparse.layers]
    assert "lm_head" not in names and len(names) == 7
    assert "output head" in {s.name: s.reason for s in sparse.skipped}["lm_head"]


def test_include_that_selects_nothing_raises_and_changes_nothing():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="include: 'nonexistent_layer' matches no module"):
        cast_rs.sparsify(model, "2:4", include=["a", "nonexistent_layer"])
    with pytest.raises(ValueError, match="include: 'a' selects no layer.*excluded"):
        cast_rs.sparsify(model, "2:4", include=["a"], exclude=["a"])
    with pytest.raises(ValueError, match="matches no module"):
        baselines.magnitude_prune(model, "2:4", include=["nope"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(p, "_cast_rs_nm") for p in model.parameters())
    assert [l.name for l in cast_rs.sparsify(model, "2:4", include=["a"]).layers] == ["a"]
