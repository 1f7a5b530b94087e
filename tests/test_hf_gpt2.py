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


@pytest.mark.parametrize("built_by", ["trainer", "user"])
def test_trainer_with_weight_decay_does_not_decay_the_scales(tmp_path, built_by):
    """The Trainer builds AdamS itself (optimizer_cls_and_kwargs) with its default grouping,
    which puts the weight-scale parameters in the decay group; or the user builds it with
    their own groups (every parameter decayed) and hands it over with ``optimizers=``. With
    lr·wd = 0.5 a decayed parameter halves at every step; the scales stay within Adam's
    per-step move (about lr) of 1 while the embeddings, decayed, shrink."""
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (a pinned test dependency)")
    model, cfg = small_gpt2()
    sp = cast_rs.sparsify(model, "2:4")
    steps, lr = 3, 1e-3
    ids = torch.randint(0, cfg.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        learning_rate=lr,
        weight_decay=500.0,
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    if built_by == "trainer":
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(cast_rs.AdamS, dict(total_steps=steps))
        )
    else:
        own = cast_rs.AdamS([{"params": list(model.parameters()), "weight_decay": 500.0}], lr=lr, total_steps=steps)
        sched = torch.optim.lr_scheduler.ConstantLR(own, factor=1.0, total_iters=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(own, sched))
    wte = model.transformer.wte.weight.detach().clone()
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    scales = {id(s) for s in sp.scale_parameters()}
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert decayed and any(id(p) in scales for g in decayed for p in g["params"]), "the Trainer's decay group holds the scales"
    for s in sp.scale_parameters():
        # Adam's bias-corrected step is at most ~1.004·lr in each of the first 3 steps
        # (Cauchy–Schwarz on m̂/√v̂ with betas (0.9, 0.999)); decayed, 1 would become 0.125.
        assert float((s.detach() - 1).abs().max()) <= 2 * steps * lr
    assert float(model.transformer.wte.weight.detach().norm()) < 0.2 * float(wte.norm())  # the decay did act


def test_mid_run_checkpoint_becomes_a_plain_model(tmp_path):
    """A checkpoint saved before finalize (a Trainer's mid-run save_pretrained) has the keys
    '...parametrizations.weight.original/scale', which from_pretrained does not know. The
    documented way back (docs/guides/checkpoints.md): the same sparsify call on a fresh model,
    load the checkpoint, finalize, save_pretrained; from_pretrained then gives the same model."""
    model, cfg = small_gpt2()
    sp = cast_rs.sparsify(model, "2:4")
    opt = cast_rs.AdamS(model.parameters(), lr=3e-3, total_steps=10)
    ids = torch.randint(0, cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(5):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "checkpoint-5")  # mid-run: parametrized keys
    keys = set(model.state_dict())
    assert any(k.endswith("parametrizations.weight.original") for k in keys)

    fresh = transformers.GPT2LMHeadModel(cfg)
    fresh_sp = cast_rs.sparsify(fresh, "2:4")
    from safetensors.torch import load_file

    result = fresh.load_state_dict(load_file(tmp_path / "checkpoint-5" / "model.safetensors"), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied to wte, saved once
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    fresh_sp.finalize()
    fresh.save_pretrained(tmp_path / "final")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "final").eval()
    sp.finalize()
    model.eval()
    assert cast_rs.check_nm(loaded, "2:4").ok
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
