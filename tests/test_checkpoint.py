"""Save, load and keep N:M models (cast_rs.checkpoint): Hugging Face models through
save_pretrained / from_pretrained and the quantizer cast-rs registers, any nn.Module through
save_compressed / load_compressed; the record checked before anything is built; dtype changes
of a compressed layer re-lay it out. Models are random inits of small configs (nothing is
downloaded)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import cast_rs
from _tiny_hf import tiny_llama_config

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (./run test installs it)")


def llama():
    cfg = tiny_llama_config(tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():  # Conv1D layers and a head tied to the embedding
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, eos_token_id=0, bos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama": llama, "gpt2": gpt2}


def finalized(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).eval()
    cast_rs.sparsify(model, "2:4").finalize()
    return model


def greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)


def first_layer(model):
    return model.model.layers[0].self_attn.q_proj if hasattr(model, "model") else model.transformer.h[0].attn.c_attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compressed_hf_model_round_trips_through_save_and_from_pretrained(name, dtype, tmp_path):
    model = finalized(name, dtype)
    report = cast_rs.compress(model)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        logits = model(ids).logits
    tokens = greedy(model, ids)
    model.save_pretrained(tmp_path)

    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "cast_rs" and record["format"] == "cast_rs.nm" and record["format_version"] == 1
    assert record["pattern"] == "2:4" and record["compressed"] is True
    assert record["values_dtype"] == str(dtype).removeprefix("torch.")
    assert record["modules"] == [layer.name for layer in report.layers]

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    layer = first_layer(loaded)
    assert isinstance(layer, cast_rs.NMLinear) and layer.values.dtype == dtype and not hasattr(layer, "weight")
    assert sum(isinstance(m, cast_rs.NMLinear) for m in loaded.modules()) == len(report.layers)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)  # the same stored values, the same kernels
    assert torch.equal(greedy(loaded, ids), tokens)
    assert not loaded.hf_quantizer.is_trainable
    # The loaded model saves again with its record, and loads again.
    loaded.save_pretrained(tmp_path / "again")
    again = cast_rs.load_compressed(tmp_path / "again")
    assert torch.equal(greedy(again, ids), tokens)


def test_finalized_hf_model_reloads_with_its_mask_guarded(tmp_path):
    model = finalized("llama")
    assert model.config.quantization_config.compressed is False
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert cast_rs.check_nm(loaded, "2:4").ok
    # An ordinary model for transformers (trainable, dtype changes allowed), still N:M after
    # training: the guard keeps the masked weights at zero.
    assert not getattr(loaded, "is_quantized", False) and getattr(loaded, "hf_quantizer", None) is None
    plain = llama()  # the same weights, loaded without the record: nothing guards them
    plain.load_state_dict(loaded.state_dict())
    assert cast_rs.check_nm(plain.model, "2:4").ok
    for m in (loaded, plain):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        ids = torch.randint(0, 96, (2, 8))
        for _ in range(2):
            m(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert cast_rs.check_nm(loaded, "2:4").ok
    # The guard is what kept it: a plain copy of the same weights trained the same way is not N:M.
    assert not cast_rs.check_nm(plain.model, "2:4").ok
    loaded.float()  # allowed: not a quantized model for transformers
    # Saved again (the record kept), it still loads guarded.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["compressed"] is False


def test_release_mask_drops_the_record(tmp_path):
    torch.manual_seed(0)
    model = llama()
    sp = cast_rs.sparsify(model, "2:4")
    sp.finalize()
    sp.release_mask()
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_an_unmarked_model_saves_and_loads_as_before(tmp_path):
    torch.manual_seed(0)
    model = llama().eval()
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.model.layers[0].self_attn.q_proj) is nn.Linear and not getattr(loaded, "is_quantized", False)


def test_from_pretrained_knows_cast_rs_whatever_the_import_order(tmp_path):
    model = finalized("gpt2")
    cast_rs.compress(model)
    model.save_pretrained(tmp_path)
    # cast_rs first (transformers' registry imported later: the post-import hook), then the reverse.
    for first, second in (("cast_rs", "transformers"), ("transformers", "cast_rs")):
        code = (
            f"import {first}, {second}, sys\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "print(type(m.transformer.h[0].attn.c_attn).__name__)\n"
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "NMLinear", (first, out.stdout, out.stderr[-2000:])


class TinyLM(nn.Module):
    """A plain module with a head tied to its embedding and an untied Linear stack."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_module_save_compressed_and_load_into_a_meta_skeleton(dtype, tmp_path):
    torch.manual_seed(0)
    model = TinyLM().to(dtype).eval()
    cast_rs.sparsify(model, "2:4").finalize()
    report = cast_rs.compress(model)
    assert [layer.name for layer in report.layers] == ["body.0", "body.2"]
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want = model(ids)
    cast_rs.save_compressed(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules"] == ["body.0", "body.2"]
    with torch.device("meta"):
        skeleton = TinyLM().to(dtype)
    loaded = cast_rs.load_compressed(tmp_path, skeleton)
    assert loaded.head.weight is loaded.embed.weight  # the tie restored
    assert isinstance(loaded.body[0], cast_rs.NMLinear) and loaded.body[0].values.dtype == dtype
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)


def test_plain_module_saved_finalized_reloads_guarded(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    cast_rs.sparsify(model, "2:4").finalize()
    cast_rs.save_compressed(model, tmp_path)
    loaded = cast_rs.load_compressed(tmp_path, TinyLM())
    opt = torch.optim.SGD(loaded.parameters(), lr=0.5)
    loaded(torch.randint(0, 50, (2, 5))).square().mean().backward()
    opt.step()
    assert cast_rs.check_nm(loaded, "2:4").ok


def test_records_are_checked_before_anything_is_built(tmp_path):
    model = finalized("llama")
    cast_rs.compress(model)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    good = json.loads(config_path.read_text())

    def with_record(**changes):
        cfg = json.loads(json.dumps(good))
        cfg["quantization_config"].update(changes)
        config_path.write_text(json.dumps(cfg))

    for changes, field in (
        ({"format_version": 2}, "format_version"),
        ({"pattern": "5:4"}, "pattern"),
        ({"values_dtype": "float16"}, "values_dtype"),
        ({"modules": ["model.layers.9.mlp.up_proj"]}, "modules"),
        ({"modules": ["model.norm"]}, "modules"),
    ):
        with_record(**changes)
        with pytest.raises(ValueError, match=f"quantization_config.{field}"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    # A checkpoint of another shape under the same record: NMLinear's own entry check names it.
    with_record()
    cfg = json.loads(config_path.read_text())
    cfg["intermediate_size"] = 128
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own size check
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    # Told to ignore sizes, transformers would leave those layers re-initialised: the recorded
    # layout (set_extra_state) names the first one.
    with pytest.raises(ValueError, match="NMLinear .model.layers.0.mlp.gate_proj.: the checkpoint.s layout"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_save_and_load_refusals(tmp_path):
    with pytest.raises(ValueError, match="nothing N:M to record"):
        cast_rs.save_compressed(TinyLM(), tmp_path / "a")
    torch.manual_seed(0)
    sp = cast_rs.sparsify(TinyLM(), "2:4")
    with pytest.raises(ValueError, match="not exactly 2:4"):
        cast_rs.save_compressed(sp.model, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no cast-rs checkpoint"):
        cast_rs.load_compressed(tmp_path / "c")
    with pytest.raises(ValueError, match="no config.json"):
        cast_rs.load_compressed(tmp_path / "missing")
    # A skeleton of another model: named, nothing loaded.
    model = TinyLM()
    cast_rs.sparsify(model, "2:4").finalize()
    cast_rs.compress(model)
    cast_rs.save_compressed(model, tmp_path / "d")
    with pytest.raises(ValueError, match="no module 'body.0'"):
        cast_rs.load_compressed(tmp_path / "d", nn.Sequential(nn.Linear(4, 4)))


def test_compressed_model_dtype_changes_relayout_or_refuse(tmp_path):
    model = finalized("llama")
    dense_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the same N:M weights, rounded to bf16
    cast_rs.compress(model)
    cast_rs.compress(dense_bf16)
    model.to(torch.bfloat16)  # f32 values -> bf16, re-laid out: exactly what compressing bf16 weights stores
    for a, b in zip(model.modules(), dense_bf16.modules()):
        if isinstance(a, cast_rs.NMLinear):
            assert torch.equal(a.values, b.values) and torch.equal(a.index, b.index) and a.bias is None
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_bf16(ids).logits)
    model.save_pretrained(tmp_path)  # the record follows the layers' dtype
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["values_dtype"] == "bfloat16"
    with pytest.raises(TypeError, match="float16"):
        model.half()
    with pytest.raises(TypeError, match="float16"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)


def test_compress_refuses_a_mix_of_value_dtypes_on_a_hf_model():
    model = finalized("llama")
    model.model.layers[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match="one values dtype"):
        cast_rs.compress(model)
    assert not any(isinstance(m, cast_rs.NMLinear) for m in model.modules())  # nothing converted
    assert cast_rs.compress(model, dtype=torch.bfloat16).layers


def test_a_plain_lora_merged_into_a_finalized_model_does_not_load_as_finalized(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency (./run test installs it)")
    model = finalized("llama")
    adapter = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    merged = peft.get_peft_model(model, adapter).merge_and_unload()  # plain LoRA: dense updates
    merged.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="recorded as finalized 2:4, but its layers are not.*merge_and_unload"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
