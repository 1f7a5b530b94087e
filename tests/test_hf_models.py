"""Hugging Face models end to end (random init from small configs, nothing downloaded):
sparsify → AdamS with distillation → finalize → save_pretrained → from_pretrained gives the
same logits; and the Trainer resuming from a checkpoint restores the masks bit-identically.
(GPT-2, with its Conv1D layers, has its own file: test_hf_gpt2.py.)"""

import copy

import pytest
import torch

import cast_rs
from _tiny_hf import tiny_llama_config

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (./run test installs it)")


def llama(tied):
    cfg = tiny_llama_config(tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertForMaskedLM(cfg)


MODELS = {"llama_tied": lambda: llama(True), "llama_untied": lambda: llama(False), "bert": bert}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparsify_train_finalize_save_load(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    teacher = copy.deepcopy(model).eval()
    sp = cast_rs.sparsify(model, "2:4")
    names = [l.name for l in sp.layers]
    skipped = {s.name: s.reason for s in sp.skipped}
    if name == "llama_untied":
        # A Linear of its own, but the output head: dense by default, sparse on request.
        assert "lm_head" not in names and "output head" in skipped["lm_head"]
        assert "lm_head" in [l.name for l in cast_rs.sparsify(MODELS[name](), "2:4", include_head=True).layers]
    elif name == "llama_tied":
        assert skipped["lm_head"] == "weight tied to embedding 'model.embed_tokens'"
    else:
        assert "tied to embedding" in skipped["cls.predictions.decoder"]
    assert len(names) >= 12

    opt = cast_rs.AdamS(model.parameters(), lr=3e-3, total_steps=12)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        with torch.no_grad():
            t_logits = teacher(ids).logits
        loss = cast_rs.distill_loss(model(ids).logits, t_logits, ids)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    sp.finalize()
    assert cast_rs.check_nm(model, "2:4").ok
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    report = cast_rs.check_nm(loaded, "2:4")  # a fresh model: what sparsify would pick
    assert report.ok and len(report) == len(names), str(report)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_trainer_resume_from_checkpoint_is_bit_identical(tmp_path):
    """A Trainer run of 6 steps, and the same run resumed from its step-3 checkpoint, end with
    bit-identical weights, scales and AdamS masks."""
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (a pinned test dependency)")
    ids = torch.randint(0, 96, (24, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]

    def run(out, resume=None):
        torch.manual_seed(0)
        model = llama(False)
        cast_rs.sparsify(model, "2:4")
        args = transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=6,
            learning_rate=3e-3,
            per_device_train_batch_size=4,
            save_steps=3,
            save_strategy="steps",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
        )
        steps_run = []

        class Count(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                steps_run.append(state.global_step)

        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=data,
            callbacks=[Count()],
            optimizer_cls_and_kwargs=(cast_rs.AdamS, dict(total_steps=6, mask_interval=2)),
        )
        trainer.train(resume_from_checkpoint=resume)
        assert steps_run == ([4, 5, 6] if resume else [1, 2, 3, 4, 5, 6])  # resumed: only the last 3 steps ran
        opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        masks = {n: opt.state[p]["mask"].clone() for n, p in model.named_parameters() if "mask" in opt.state.get(p, {})}
        return {n: p.detach().clone() for n, p in model.named_parameters()}, masks

    full, full_masks = run(tmp_path / "full")
    resumed, resumed_masks = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    assert full_masks and full_masks.keys() == resumed_masks.keys()
    for n in full:
        assert torch.equal(full[n], resumed[n]), n
    for n in full_masks:
        assert torch.equal(full_masks[n], resumed_masks[n]), n
