"""Masked N:M LoRA on Hugging Face peft (cast_rs.lora): the layer against a plain-PyTorch
reference, merges that stay exactly N:M with the same mask and compute what the adapted model
did, peft's save / load / disable / Trainer, bfloat16, and plain adapters reported, refused and
re-projected. Tiny Llama configs built here, nothing downloaded.

Rounding bounds: with unit roundoff u (2^-24 for float32) a length-k dot product computed in
floating point is within γ_k·Σ|aᵢ||bᵢ| of the exact one, γ_k = k·u / (1 - k·u) (Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5); every tolerance below is
such a bound evaluated on the tensors at hand, summed over the steps where the two
computations round differently.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import cast_rs
from _tiny_hf import tiny_llama_config

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (./run test installs it)")
peft = pytest.importorskip("peft", reason="peft is a test dependency (./run test installs it)")

from cast_rs._lora_layer import NMLoraLinear  # noqa: E402  (needs peft)

U32 = 2.0**-24


def gamma(k: int, u: float = U32) -> float:
    return k * u / (1 - k * u)


def llama(dtype=torch.float32):
    cfg = tiny_llama_config(tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    cast_rs.sparsify(model, "2:4", scaling_groups=0).finalize()
    return model.to(dtype)


def ids(rows=4, seed=1):
    return torch.randint(0, 96, (rows, 16), generator=torch.Generator().manual_seed(seed))


def randomize_b(pm, std=0.05, seed=2):
    """A trained-looking adapter: peft starts B at zero (no update at all)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def masked_layers(pm):
    return [(n, m) for n, m in pm.named_modules() if isinstance(m, NMLoraLinear) and m.nm_masked]


def nm_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ------------------------------------------------------------------ the layer


def test_layer_matches_plain_pytorch_reference():
    """Forward and A/B gradients of one masked layer against autograd through
    F.linear(x, W + s·(B@A)⊙M, b), written independently; base weight and bias get no gradient."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.mul_(cast_rs.nm_mask(lin.weight, "2:4"))
    model = torch.nn.Sequential(lin)
    pm = cast_rs.lora(model, r=8, lora_alpha=4)
    layer = pm.base_model.model[0]
    assert isinstance(layer, NMLoraLinear) and layer.nm_masked
    randomize_b(pm, std=0.3)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(5, 7, 64, requires_grad=True)
    y = pm(x)
    g = torch.randn_like(y)
    y.backward(g)

    mask = cast_rs.nm_mask(lin.weight, "2:4")
    assert torch.equal(layer.nm_mask(), mask)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = lin.weight.detach() + s * (b_ref @ a_ref) * mask
    y_ref = F.linear(x_ref, w_ref, lin.bias.detach())
    y_ref.backward(g)

    # Effective weight: the two round B@A (length r), the scaling and the sum differently.
    w_abs = lin.weight.abs() + s * (b.abs() @ a.abs())
    w_tol = 2 * (gamma(8) + 2 * U32) * w_abs
    # Outputs: a length-in dot product each (+ bias), on weights that differ by up to w_tol.
    x_abs = x.detach().abs()
    y_tol = 2 * gamma(65) * (F.linear(x_abs, w_abs) + lin.bias.abs()) + F.linear(x_abs, w_tol)
    assert ((y.detach() - y_ref.detach()).abs() <= y_tol).all()
    # Adapter gradients: G = gᵀx (a length-35 dot product over the tokens), masked, then
    # contracted with B (length out = 48, for dA) or A (length in = 64, for dB), scaled by s.
    g2, x2 = g.reshape(-1, 48).abs(), x_abs.reshape(-1, 64)
    gm_abs = (g2.t() @ x2) * mask
    tol_a = 2 * (gamma(35) + gamma(48) + 2 * U32) * s * (b.detach().abs().t() @ gm_abs)
    tol_b = 2 * (gamma(35) + gamma(64) + 2 * U32) * s * (gm_abs @ a.detach().abs().t())
    assert ((a.grad - a_ref.grad).abs() <= tol_a).all()
    assert ((b.grad - b_ref.grad).abs() <= tol_b).all()
    gx_tol = 2 * gamma(48) * (g.abs() @ w_abs) + g.abs() @ w_tol
    assert ((x.grad - x_ref.grad).abs() <= gx_tol).all()
    assert lin.weight.grad is None and lin.bias.grad is None  # frozen by peft
    # The update the layer applies is exactly zero off the mask.
    assert not layer.get_delta_weight("default").masked_fill(mask, 0).any()


# ------------------------------------------------------------------ merging


def test_merge_exact_nm_same_mask_and_identical_logits():
    """Train a few steps, then merge_and_unload: every targeted group N:M, the support inside
    the original mask, and (single adapter, nn.Linear: one code path computes the adapted
    layer's effective weight and the merged weight) bit-identical logits. compress accepts it."""
    model = llama()
    before = nm_weights(model)
    masks = {n: cast_rs.nm_mask(w, "2:4") for n, w in before.items() if n != "lm_head"}
    pm = cast_rs.lora(model, r=4, lora_alpha=8)
    assert len(masked_layers(pm)) == 14  # 7 per layer: q k v o gate up down
    assert cast_rs.check_lora(pm).ok
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = pm(ids(), labels=ids()).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.eval()
    with torch.no_grad():
        adapted = pm(ids()).logits
        with pm.disable_adapter():
            base_logits = pm(ids()).logits
    assert not torch.equal(adapted, base_logits)  # the adapter does something

    merged = pm.merge_and_unload()
    report = cast_rs.check_nm(merged, "2:4")
    assert report.ok and len(report) == 14 and all(r.violating_groups == 0 for r in report)
    changed = 0
    for name, mod in merged.named_modules():
        if name in masks:
            w = mod.weight.detach()
            assert not w.masked_fill(masks[name], 0).any(), name  # no weight outside the old mask
            changed += int(not torch.equal(w, before[name]))
    assert changed == 14
    with torch.no_grad():
        assert torch.equal(merged(ids()).logits, adapted)
    rep = cast_rs.compress(merged, "2:4")
    assert len(rep.layers) == 14


def test_two_adapters_merge_within_float32_rounding():
    """Two active adapters take the two-term form (y = base(x) + Σ x·ΔᵢMᵀ); merged, one matmul
    with W + Σ ΔᵢM. Per layer the outputs differ by rounding only: checked at one layer with the
    bound from its size, and the model stays exactly N:M with both merged."""
    model = llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    pm = cast_rs.lora(model, config)
    pm.add_adapter("second", cast_rs.lora_config(config))
    pm.base_model.set_adapter(["default", "second"])
    randomize_b(pm)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    assert layer.nm_masked and set(layer.active_adapters) == {"default", "second"}
    x = torch.randn(3, 64)
    with torch.no_grad():
        y_two_term = layer(x)
        d1, d2 = layer.get_delta_weight("default"), layer.get_delta_weight("second")
        w0 = layer.get_base_layer().weight.detach().clone()
    merged = pm.merge_and_unload()
    assert cast_rs.check_nm(merged, "2:4").ok
    w = merged.model.layers[0].mlp.down_proj.weight.detach()
    # The merged weight is W0 + D1 + D2 rounded twice (each sum within u of its exact value).
    # The two-term forward rounds three length-64 dot products and two sums, the merged one a
    # length-64 dot product of a weight within 2u of the exact sum: each is within
    # (γ_64 + 2u)·|x|·(|W0| + |D1| + |D2|)ᵀ of the exact output, so they are within twice that
    # (plus one more u for the merged weight's second rounding).
    assert ((w - (w0 + d1 + d2)).abs() <= 2 * U32 * (w0.abs() + d1.abs() + d2.abs())).all()
    y_merged = F.linear(x, w)
    bound = 2 * (gamma(64) + 3 * U32) * F.linear(x.abs(), w0.abs() + d1.abs() + d2.abs())
    assert ((y_merged - y_two_term).abs() <= bound).all()


# ------------------------------------------------------------------ peft's machinery


def test_save_load_disable_and_plain_loader_is_caught(tmp_path):
    model = llama()
    pm = cast_rs.lora(model, r=4, lora_alpha=8)
    randomize_b(pm)
    pm.eval()
    with torch.no_grad():
        adapted = pm(ids()).logits
    pm.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files

    loaded = cast_rs.load_lora(llama(), str(tmp_path))
    assert len(masked_layers(loaded)) == 14
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, adapted)
        with loaded.disable_adapter():
            base = loaded(ids()).logits
        assert torch.equal(base, llama()(ids()).logits)
        assert torch.equal(loaded(ids()).logits, adapted)  # enabled again

    # peft's own loader makes plain layers: they compute the unmasked update, and say so.
    plain = peft.PeftModel.from_pretrained(llama(), str(tmp_path))
    report = cast_rs.check_lora(plain)
    assert not report.ok and len(report.plain_on_nm()) == 14
    with torch.no_grad():
        assert not torch.allclose(plain(ids()).logits, adapted)


def test_trainer_trains_masked_adapter(tmp_path):
    """The HF Trainer on a masked PeftModel: adapters train, base stays, the merge is N:M and
    computes what the trained adapted model computes; the Trainer's checkpoint loads back."""
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (a pinned test dependency)")
    model = llama()
    base_weights = nm_weights(model)
    pm = cast_rs.lora(model, r=4, lora_alpha=8)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    data = [{"input_ids": row, "labels": row} for row in ids(rows=16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        save_steps=4,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    transformers.Trainer(model=pm, args=args, train_dataset=data).train()
    after = {n: p.detach() for n, p in pm.named_parameters() if p.requires_grad}
    assert before.keys() == after.keys() and all(("lora_A" in n or "lora_B" in n) for n in after)
    assert any(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name in base_weights:
            assert torch.equal(mod.weight, base_weights[name]), name  # base frozen
    pm.eval()
    with torch.no_grad():
        adapted = pm(ids()).logits
    reloaded = cast_rs.load_lora(llama(), str(tmp_path / "checkpoint-4"))
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, adapted)
    merged = cast_rs.merge_lora(pm)
    assert cast_rs.check_nm(merged, "2:4").ok
    with torch.no_grad():
        assert torch.equal(merged(ids()).logits, adapted)


def test_bfloat16_layer_gradients_against_a_float64_reference():
    """bf16 weights, activations and output gradient, float32 adapters: G = gᵀx is a bf16 GEMM
    (exact bf16 products, f32 accumulation, rounded once to bf16), then contracted in f32. The
    A/B gradients against autograd in float64 on the same bf16 values, within that bound."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.mul_(cast_rs.nm_mask(lin.weight, "2:4"))
    model = torch.nn.Sequential(lin).to(torch.bfloat16)
    pm = cast_rs.lora(model, r=8, lora_alpha=4)
    layer = pm.base_model.model[0]
    randomize_b(pm, std=0.3)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert a.dtype == torch.float32 and layer.get_base_layer().weight.dtype == torch.bfloat16
    x = torch.randn(5, 7, 64).to(torch.bfloat16)
    y = pm(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)

    mask = cast_rs.nm_mask(lin.weight, "2:4")
    a_ref = a.detach().double().requires_grad_()
    b_ref = b.detach().double().requires_grad_()
    w_ref = lin.weight.detach().double() + s * (b_ref @ a_ref) * mask
    F.linear(x.double(), w_ref).backward(g.double())
    # |ΔG| <= (2^-8 + γ(35)) · |g|ᵀ|x| per element (the bf16 rounding of the f32 sum of 35
    # exact products), then the f32 contractions with B (length 48) and A (length 64).
    g2, x2 = g.double().reshape(-1, 48).abs(), x.double().reshape(-1, 64).abs()
    gm_abs = (g2.t() @ x2) * mask
    eps_g = 2.0**-8 + gamma(35)
    tol_a = 2 * (eps_g + gamma(48) + 2 * U32) * s * (b.detach().double().abs().t() @ gm_abs)
    tol_b = 2 * (eps_g + gamma(64) + 2 * U32) * s * (gm_abs @ a.detach().double().abs().t())
    assert ((a.grad.double() - a_ref.grad).abs() <= tol_a).all()
    assert ((b.grad.double() - b_ref.grad).abs() <= tol_b).all()
    # G went through the bf16 GEMM (the fast path): its rounding shows beyond float32's bound.
    tight = 2 * (gamma(35) + gamma(48) + 2 * U32) * s * (b.detach().double().abs().t() @ gm_abs)
    assert ((a.grad.double() - a_ref.grad).abs() > tight).any()


def test_bfloat16_base():
    """bf16 base, float32 adapters (peft's default upcast): the layer computes with
    bf16(W + (s·B·A)⊙M), which is what the merge stores, so merged logits are bit-identical
    and the merged bf16 model is N:M and compresses."""
    model = llama(torch.bfloat16)
    pm = cast_rs.lora(model, r=4, lora_alpha=8)
    layer = masked_layers(pm)[0][1]
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    randomize_b(pm)
    pm.train()
    loss = pm(ids(), labels=ids()).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in pm.named_parameters() if p.requires_grad)
    pm.eval()
    with torch.no_grad():
        adapted = pm(ids()).logits
    merged = cast_rs.merge_lora(pm)
    assert cast_rs.check_nm(merged, "2:4").ok
    with torch.no_grad():
        assert torch.equal(merged(ids()).logits, adapted)
    assert len(cast_rs.compress(merged, "2:4").layers) == 14


# ------------------------------------------------------------------ plain adapters


def test_plain_lora_is_reported_refused_and_reprojected():
    model = llama()
    reference = copy.deepcopy(model.state_dict())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_b(pm)
    report = cast_rs.check_lora(pm)
    assert not report.ok and len(report.plain_on_nm()) == 6
    # What re-projection will drop, computed here from the factors and the masks directly.
    lost = total = 0.0
    for mod in pm.modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and hasattr(mod, "lora_A"):
            delta = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).double() * mod.scaling["default"]
            keep = cast_rs.nm_mask(mod.get_base_layer().weight, "2:4")
            lost += float(delta.masked_fill(keep, 0).square().sum())
            total += float(delta.square().sum())
    assert report.off_mask_energy == pytest.approx(lost / total, rel=1e-6)

    with pytest.raises(cast_rs.CastError, match=r"plain \(unmasked\) LoRA.*reproject=True"):
        cast_rs.merge_lora(pm)
    assert not cast_rs.check_lora(pm).ok  # nothing was merged by the refusal

    merged = pm.merge_and_unload()  # peft's plain merge: the model is no longer N:M
    assert not cast_rs.check_nm(merged, "2:4").ok
    with pytest.raises(cast_rs.CastError, match="reproject"):
        cast_rs.lora(merged, r=4)
    rep = cast_rs.reproject(merged, reference)
    assert cast_rs.check_nm(merged, "2:4").ok
    assert sum(r.was_violating > 0 for r in rep) == 6
    assert rep.energy_lost == pytest.approx(lost / total, rel=1e-4)


def test_merge_lora_reproject_warns_and_restores_nm():
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    randomize_b(pm)
    with pytest.warns(UserWarning, match="re-projected 2 layer"):
        merged = cast_rs.merge_lora(pm, reproject=True)
    assert cast_rs.check_nm(merged, "2:4").ok


# ------------------------------------------------------------------ errors and dense layers


def test_dense_target_gets_plain_lora():
    model = llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    pm = cast_rs.lora(model, config)
    head = pm.base_model.model.lm_head
    assert isinstance(head, NMLoraLinear) and not head.nm_masked
    report = cast_rs.check_lora(pm)
    assert report.ok and {r.base for r in report} == {"2:4", "dense"}
    randomize_b(pm)
    assert cast_rs.check_nm(cast_rs.merge_lora(pm), "2:4").ok


def test_errors():
    dense = transformers.LlamaForCausalLM(llama().config)
    with pytest.raises(cast_rs.CastError, match="not exactly 2:4"):
        cast_rs.lora(dense, r=4)
    sparsifying = transformers.LlamaForCausalLM(llama().config)
    cast_rs.sparsify(sparsifying, "2:4")
    with pytest.raises(cast_rs.CastError, match="finalize"):
        cast_rs.lora(sparsifying, r=4)
    with pytest.raises(cast_rs.CastError, match="DoRA"):
        cast_rs.lora(llama(), r=4, use_dora=True)
    with pytest.raises(cast_rs.CastError, match="init_lora_weights"):
        cast_rs.lora(llama(), r=4, init_lora_weights="pissa")
    with pytest.raises(TypeError, match="config"):
        cast_rs.lora(llama(), peft.LoraConfig(r=4), r=8)
    with pytest.warns(UserWarning, match="targets none"):
        cast_rs.lora(llama(), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(cast_rs.CastError, match="no layer of it is 2:4"):
        cast_rs.reproject(llama(), dense.state_dict())


def test_gpt2_conv1d_layers():
    """GPT-2's Conv1D stores [in, out] (groups along dim 0; peft sets fan_in_fan_out): the masked
    update is built in that layout, the merge stays 2:4 inside the old masks, and a merged layer
    computes what the adapted one did up to the rounding of two different length-in matmuls
    (F.linear on the transposed view against Conv1D's addmm)."""
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    cast_rs.sparsify(model, "2:4", scaling_groups=0).finalize()
    masks = {n: cast_rs.nm_mask(m.weight, "2:4", dim=0) for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "fan_in_fan_out is set to False but the target is Conv1D"
        pm = cast_rs.lora(model, r=4, lora_alpha=8)
    layers = masked_layers(pm)
    assert len(layers) == 4 and all(m.fan_in_fan_out for _, m in layers)
    randomize_b(pm)
    mlp = pm.base_model.model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32)
    with torch.no_grad():
        y_adapted = mlp(x)
    merged = cast_rs.merge_lora(pm)
    assert cast_rs.check_nm(merged, "2:4").ok
    for name, mod in merged.named_modules():
        if name in masks:
            assert not mod.weight.detach().masked_fill(masks[name], 0).any(), name
    c_fc = merged.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        y_merged = c_fc(x)
    bound = 2 * gamma(33) * (x.abs() @ c_fc.weight.abs() + c_fc.bias.abs())
    assert ((y_merged - y_adapted).abs() <= bound).all()
