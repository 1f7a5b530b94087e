"""A Hugging Face GPT-2 (random init from a small config, nothing downloaded) end to end."""

import copy

import pytest
import torch

import cast_rs

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (./run test installs it)")


def small_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval(), cfg


def test_gpt2_sparsify_train_finalize_reload(kernel_path):
    model, cfg = small_gpt2()
    model.train()
    teacher = copy.deepcopy(model).eval()
    sp = cast_rs.sparsify(model, "2:4")
    names = [l.name for l in sp.layers]
    assert len(names) == 8 and all(l.kind == "Conv1D" and l.dim == 0 for l in sp.layers)
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    assert {s.name: s.reason for s in sp.skipped} == {"lm_head": "weight tied to embedding 'transformer.wte'"}

    opt = cast_rs.AdamS(model.parameters(), lr=3e-3, l1_decay=1e-2, total_steps=20)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (4, 24))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        logits = model(ids).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher(ids).logits[:, :-1]
        loss = cast_rs.distill_loss(logits, t_logits, ids[:, 1:])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # The Conv1D weights were stepped as sparse along dim 0.
    c_attn = model.transformer.h[0].attn.c_attn
    assert "mask" in opt.state[c_attn.parametrizations.weight.original]

    sp.finalize()
    report = cast_rs.check_nm(model, "2:4")
    assert report.ok, str(report)
    assert len(report) == 8 and all(r.dim == 0 for r in report)

    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    # A fresh (never sparsified) model: check_nm checks what sparsify would pick (not the tied head).
    report = cast_rs.check_nm(fresh, "2:4")
    assert report.ok and len(report) == 8, str(report)
