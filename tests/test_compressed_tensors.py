"""compressed-tensors' 2:4 checkpoints (``sparse-24-bitmask``) into NMLinear layers
(cast_rs.load_compressed_tensors) and back (cast_rs.export_compressed_tensors).

The fixtures are written by compressed-tensors' own compressor, release 0.13.0 (the last with
the sparse compressors; a test dependency), the way llm-compressor's ``save_pretrained`` does it:
``ModelCompressor.from_pretrained_model`` with a ``Sparse24BitMaskConfig``, ``compress_model``,
transformers' ``save_pretrained``, ``update_config``. The models are tiny random Llamas made
exactly 2:4 with cast_rs.sparsify + finalize; nothing is downloaded.

What is checked: the loaded model is bit for bit the model cast_rs.compress makes from the dense
weights (the loader adds no error of its own); against the dense-with-zeros model it came from,
each compressed layer is within the float32 summation bound of tests/test_inference.py and the
logits within that bound carried to the output (below), so greedy decoding gives the same tokens.

The logits bound. A compressed layer and the dense one sum the same k = in_features products in
different orders: each sum is within γ_k·Σ|w||x| of the exact one (γ_k = k·u / (1 - k·u), u the
float32 unit roundoff; Higham, "Accuracy and Stability of Numerical Algorithms", eq. 3.5), so
the two outputs differ by at most t = 2·γ_k·(|x|·|W|ᵀ) (plus, for bfloat16 outputs, each side's
rounding to bfloat16). Carried to the logits to first order: Σ_layers |J|·t, with J the Jacobian
of the logits with respect to that layer's output (computed in float64 at the dense model's
point). The rest of the network rounds in both runs; each run's rounding is of the size of the
dense run's own (measured against the same model in float64), counted twice.
"""

import copy
import json
import os

import pytest
import torch
from torch import nn

import cast_rs
from _tiny_hf import tiny_llama_config
from cast_rs import CastError, NMLinear
from cast_rs.compressed_tensors import export_compressed_tensors, load_compressed_tensors, nm_buffers, nm_slots

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (./run test installs it)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors comes with transformers")
pytest.importorskip(
    "compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask",
    reason="compressed-tensors 0.13.0 (the last release with the sparse compressors) is a test dependency "
    "(./run test installs it)",
)
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.config import SparsityCompressionConfig  # noqa: E402

U32 = 2.0**-24
U_BF16 = 2.0**-8
VOCAB = 96


def gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def llama(tied=False, dtype=torch.float32):
    """A tiny random Llama whose Linear layers (all but lm_head) are exactly 2:4."""
    cfg = tiny_llama_config(vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg)
    cast_rs.sparsify(model, "2:4", exclude=["lm_head"]).finalize()
    return model.to(dtype).eval()


def write_checkpoint(model, path, fmt="sparse-24-bitmask", max_shard_size=None):
    """Save ``model`` (a copy: compress_model replaces its weights) as llm-compressor does."""
    model = copy.deepcopy(model)
    config = SparsityCompressionConfig.load_from_registry(fmt, sparsity_structure="2:4", targets=["Linear"], ignore=["lm_head"])
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=config)
    compressor.compress_model(model)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    compressor.update_config(str(path))
    return path


def sparse_names(model):
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name != "lm_head"]


def ids(n=6):
    return torch.randint(0, VOCAB, (1, n))


# ------------------------------------------------------------------ the layout


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [40, 16, 3])
def test_nm_buffers_is_the_layout_nm_compress_writes(pattern, dtype, rows):
    """Built from kept values and positions (no dense weight), the buffers are nm_compress's bit
    for bit: 40 and 3 rows pad a 16-row block, 1:4 over 20 columns has an odd slot count (a
    plain last bfloat16 slot), 4:8 packs 4-bit positions. nm_slots reads them back."""
    n, m = cast_rs.parse_pattern(pattern)
    cols = 40
    w = torch.randn(rows, cols if pattern != "1:4" else 20)
    # Exactly n nonzeros in every group, so that the kept positions are the nonzeros.
    w = (w * cast_rs.nm_mask(w, pattern)).to(dtype)
    mask = w != 0
    kept = int(mask.sum()) // rows
    columns = torch.arange(w.shape[1]).expand_as(w)[mask].view(rows, -1)
    values, index = nm_buffers(w[mask].view(rows, -1), columns % m, n, m)
    layer = NMLinear(w.shape[1], rows, bias=False, pattern=pattern, dtype=dtype)
    want_values, want_index = torch.ops.cast_rs.nm_compress(w.contiguous(), n, m)
    assert values.dtype == dtype and torch.equal(values, want_values) and torch.equal(index, want_index)
    layer.values.copy_(values)
    layer.index.copy_(index)
    assert torch.equal(layer.dense_weight(), w)
    back_values, back_positions = nm_slots(layer)
    assert back_values.shape == (rows, kept) and torch.equal(back_values, w[mask].view(rows, -1))
    assert torch.equal(back_positions, columns % m)


# ------------------------------------------------------------------ loading what compressed-tensors wrote


def logit_bound(dense, token_ids, names, out_rounding=0.0):
    """The bound of the module docstring for ``dense``'s logits on ``token_ids``."""
    modules = dict(dense.named_modules())
    seen = {}
    hooks = [
        modules[n].register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0].detach(), out.detach())))
        for n in names
    ]
    with torch.no_grad():
        logits = dense(token_ids).logits[0].double()
    for h in hooks:
        h.remove()
    tols = {}
    for n in names:
        x, y = seen[n]
        w = modules[n].weight.detach().double().abs()
        g = gamma(w.shape[1]) * (x.double().abs() @ w.t())
        tols[n] = 2 * g + 2 * out_rounding * (y.double().abs() + 2 * g)
    d64 = copy.deepcopy(dense).double()
    m64 = dict(d64.named_modules())

    def perturbed(*eps):
        hs = [m64[n].register_forward_hook(lambda mod, args, out, e=e: out + e) for n, e in zip(names, eps)]
        try:
            return d64(token_ids).logits[0]
        finally:
            for h in hs:
                h.remove()

    jac = torch.autograd.functional.jacobian(perturbed, tuple(torch.zeros_like(tols[n]) for n in names), vectorize=True)
    first_order = sum(
        (j.abs().reshape(logits.numel(), -1) @ tols[n].reshape(-1)).reshape(logits.shape) for j, n in zip(jac, names)
    )
    with torch.no_grad():
        rounding = (logits - d64(token_ids).logits[0]).abs().max()
    return logits, first_order + 2 * rounding


def assert_same_model_as_compress(dense, loaded, token_ids):
    """The loaded model computes exactly what cast_rs.compress makes of the dense one."""
    reference = copy.deepcopy(dense)
    cast_rs.compress(reference)
    for name in sparse_names(dense):
        got, want = dict(loaded.named_modules())[name], dict(reference.named_modules())[name]
        assert isinstance(got, NMLinear), name
        assert torch.equal(got.values, want.values) and torch.equal(got.index, want.index), name
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, reference(token_ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_float32_checkpoint_loads_and_decodes_like_the_dense_model(tmp_path, tied):
    dense = llama(tied)
    # Sharded (several files and model.safetensors.index.json), as large checkpoints are.
    path = write_checkpoint(dense, tmp_path / "ckpt", max_shard_size="20KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    loaded = load_compressed_tensors(path)
    names = sparse_names(dense)
    assert len(names) == 14 and isinstance(loaded.lm_head, nn.Linear) and not isinstance(loaded.lm_head, NMLinear)
    assert all(p.device.type == "cpu" for p in loaded.parameters()) and all(b.device.type == "cpu" for b in loaded.buffers())
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert not loaded.training
    for name in names:
        layer = dict(loaded.named_modules())[name]
        assert layer.values.dtype == torch.float32
        assert torch.equal(layer.dense_weight(), dict(dense.named_modules())[name].weight.detach()), name

    prompt = ids()
    assert_same_model_as_compress(dense, loaded, prompt)
    with torch.no_grad():
        want_tokens = dense.generate(prompt, max_new_tokens=8, do_sample=False)
        got_tokens = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    # Each compressed layer on the inputs the dense run gave it: within the summation bound.
    modules, loaded_modules = dict(dense.named_modules()), dict(loaded.named_modules())
    inputs = {}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, (a[0], o))) for n in names]
    with torch.no_grad():
        dense(want_tokens)
        for h in hooks:
            h.remove()
        for n in names:
            x, y = inputs[n]
            bound = 2 * gamma(x.shape[-1]) * (x.double().abs() @ modules[n].weight.double().abs().t())
            assert ((loaded_modules[n](x).double() - y.double()).abs() <= bound).all(), n
        got_logits = loaded(want_tokens).logits[0].double()
    # The logits over the generated sequence within the bound, and every greedy choice decided by
    # a margin larger than it: the same tokens follow from the bound (and are checked too).
    want_logits, bound = logit_bound(dense, want_tokens, names)
    assert ((got_logits - want_logits).abs() <= bound).all()
    top2 = want_logits[prompt.shape[1] - 1 : -1].topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) > 2 * bound[prompt.shape[1] - 1 : -1].max(-1).values).all()
    assert torch.equal(got_tokens, want_tokens)


def test_bfloat16_checkpoint_keeps_bfloat16(tmp_path):
    dense = llama(dtype=torch.bfloat16)
    loaded = load_compressed_tensors(write_checkpoint(dense, tmp_path / "bf16"))
    names = sparse_names(dense)
    assert all(dict(loaded.named_modules())[n].values.dtype == torch.bfloat16 for n in names)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    prompt = ids()
    assert_same_model_as_compress(dense, loaded, prompt)
    with torch.no_grad():
        got = loaded(prompt).logits[0].double()
    # bfloat16 outputs: each side rounds each layer's float32 sum to bfloat16 once (the dense
    # CPU bfloat16 matmul accumulates in float32 too).
    want, bound = logit_bound(dense, prompt, names, out_rounding=U_BF16)
    assert ((got - want).abs() <= bound).all()
    # float32 on request: every tensor converted (bfloat16 -> float32 is exact).
    as_f32 = load_compressed_tensors(tmp_path / "bf16", dtype=torch.float32)
    assert all(dict(as_f32.named_modules())[n].values.dtype == torch.float32 for n in names)
    assert as_f32.model.norm.weight.dtype == torch.float32
    assert torch.equal(
        as_f32.model.layers[0].mlp.up_proj.dense_weight(), loaded.model.layers[0].mlp.up_proj.dense_weight().float()
    )


def test_float16_is_refused_unless_a_dtype_is_given(tmp_path):
    dense = llama(dtype=torch.float16)
    path = write_checkpoint(dense, tmp_path / "f16")
    with pytest.raises(CastError, match=r"dtype: the checkpoint is float16.*dtype=torch.bfloat16.*dtype=torch.float32"):
        load_compressed_tensors(path)
    loaded = load_compressed_tensors(path, dtype=torch.float32)  # float16 -> float32: exact
    layer = loaded.model.layers[1].self_attn.o_proj
    assert layer.values.dtype == torch.float32
    assert torch.equal(layer.dense_weight(), dense.model.layers[1].self_attn.o_proj.weight.float())
    with pytest.raises(CastError, match="dtype: expected torch.float32 or torch.bfloat16.*got torch.float16"):
        load_compressed_tensors(path, dtype=torch.float16)


def test_dense_format_is_compressed_after_loading(tmp_path):
    """format "dense" with sparsity_structure "2:4": the weights are stored with their zeros;
    the loader loads them and converts every exactly 2:4 Linear."""
    dense = llama()
    path = write_checkpoint(dense, tmp_path / "dense", fmt="dense")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"] == "dense"
    loaded = load_compressed_tensors(path)
    assert_same_model_as_compress(dense, loaded, ids())


def test_the_loaded_model_saves_and_reloads_with_transformers(tmp_path):
    """The loaded model records its NMLinear layers as cast_rs.compress does, so transformers'
    save_pretrained / from_pretrained round-trip it (cast_rs.checkpoint), without dense weights."""
    dense = llama(dtype=torch.bfloat16)
    loaded = load_compressed_tensors(write_checkpoint(dense, tmp_path / "ckpt"))
    loaded.save_pretrained(str(tmp_path / "saved"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert isinstance(again.model.layers[1].mlp.gate_proj, NMLinear)
    assert again.model.layers[1].mlp.gate_proj.values.dtype == torch.bfloat16
    prompt = ids()
    with torch.no_grad():
        assert torch.equal(again(prompt).logits, loaded(prompt).logits)


def test_loading_into_a_given_model(tmp_path):
    dense = llama()
    path = write_checkpoint(dense, tmp_path / "ckpt")
    target = transformers.LlamaForCausalLM(dense.config)
    out = load_compressed_tensors(path, target)
    assert out is target and isinstance(target.model.layers[0].mlp.down_proj, NMLinear)
    assert_same_model_as_compress(dense, target, ids())


# ------------------------------------------------------------------ refusals, and nothing half-built


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, change):
    """Rewrite a single-file checkpoint's tensors."""
    file = str(path / "model.safetensors")
    tensors = safetensors_torch.load_file(file)
    change(tensors)
    safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(llama(), tmp_path / "ckpt")


MARLIN_24 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True},
        "input_activations": None,
        "format": "marlin-24",
    }
}
CONFIG_REFUSALS = {
    "sparse and quantized": (
        lambda qc: qc.update(config_groups=MARLIN_24, format="marlin-24"),
        r"quantization_config.config_groups: 'group_0' quantizes \(int 4-bit weights, format 'marlin-24'\)",
    ),
    "quantized format": (lambda qc: qc.update(format="int-quantized"), r"quantization_config.format: 'int-quantized'"),
    "unstructured bitmask": (
        lambda qc: qc["sparsity_config"].update(format="sparse-bitmask"),
        r"sparsity_config.format: 'sparse-bitmask' \(unstructured",
    ),
    "another format": (lambda qc: qc["sparsity_config"].update(format="sparse-24"), r"sparsity_config.format: 'sparse-24'"),
    "another structure": (
        lambda qc: qc["sparsity_config"].update(sparsity_structure="unstructured"),
        r"sparsity_config.sparsity_structure: 'unstructured', expected '2:4'",
    ),
    "no sparsity": (lambda qc: qc.update(sparsity_config={}), r"quantization_config.sparsity_config: \{\}"),
    "kv cache": (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), r"kv_cache_scheme: .*quantized KV"),
    "transforms": (lambda qc: qc.update(transform_config={"config_groups": {"R1": {}}}), r"transform_config: .*not supported"),
    "another method": (lambda qc: qc.update(quant_method="gptq"), r"quant_method: 'gptq'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSALS))
def test_unsupported_configs_are_refused_by_name(checkpoint, case):
    change, message = CONFIG_REFUSALS[case]
    edit_config(checkpoint, change)
    with pytest.raises(CastError, match=message):
        load_compressed_tensors(checkpoint)


def test_not_a_compressed_tensors_checkpoint(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["quantization_config"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CastError, match="config.json: no quantization_config"):
        load_compressed_tensors(checkpoint)
    with pytest.raises(CastError, match="path: .* is not a directory"):
        load_compressed_tensors(tmp_path / "nothing")


PREFIX = "model.layers.1.mlp.down_proj"  # 32 x 64: compressed [32, 32], bitmask [32, 8]


def _bad_group(t):
    bitmask = t[f"{PREFIX}.bitmask"].clone()
    bitmask[5, 2] = 0b0111_0111  # two groups of 3 bits (columns 16..24 of row 5)
    t[f"{PREFIX}.bitmask"] = bitmask


TENSOR_REFUSALS = {
    "missing bitmask": (lambda t: t.pop(f"{PREFIX}.bitmask"), r"layer 'model.layers.1.mlp.down_proj': .* but not \['bitmask'\]"),
    "missing shape": (lambda t: t.pop(f"{PREFIX}.shape"), r"but not \['shape'\]"),
    "shape mismatch": (
        lambda t: t.update({f"{PREFIX}.shape": torch.tensor([[32], [128]])}),
        r"down_proj.shape: the checkpoint's weight is 32x128, the model's layer is 32x64",
    ),
    "compressed shape": (
        lambda t: t.update({f"{PREFIX}.compressed": t[f"{PREFIX}.compressed"][:, :16].contiguous()}),
        r"down_proj.compressed: shape \(32, 16\), expected \(32, 32\)",
    ),
    "bitmask dtype": (
        lambda t: t.update({f"{PREFIX}.bitmask": t[f"{PREFIX}.bitmask"].to(torch.int32)}),
        r"down_proj.bitmask: torch.int32 \(32, 8\), expected torch.uint8 \(32, 8\)",
    ),
    "three of four": (_bad_group, r"down_proj.bitmask: row 5, group 4 \(columns 16..20\) has 3 bits set"),
    "quantized values": (
        lambda t: t.update({f"{PREFIX}.compressed": t[f"{PREFIX}.compressed"].to(torch.float8_e4m3fn)}),
        r"down_proj.compressed: values stored as F8_E4M3 \(quantized\?\)",
    ),
    "a dense tensor missing": (lambda t: t.pop("model.norm.weight"), r"1 tensors of the model are not in it.*model.norm.weight"),
    "a dense tensor of another shape": (
        lambda t: t.update({"model.norm.weight": torch.ones(16)}),
        r"model.norm.weight: the checkpoint's shape is \(16,\), the model's \(32,\)",
    ),
    "an unknown tensor": (
        lambda t: t.update({"model.extra.weight": torch.ones(2)}),
        r"name nothing in the model.*model.extra.weight",
    ),
    "a layer the model lacks": (
        lambda t: t.update({k.replace("layers.1", "layers.7"): v.clone() for k, v in t.items() if k.startswith(PREFIX)}),
        r"layer 'model.layers.7.mlp.down_proj': the checkpoint holds it compressed, the model has no module",
    ),
    "dense and compressed": (
        lambda t: t.update({f"{PREFIX}.weight": torch.zeros(32, 64)}),
        r"holds both a dense weight and a compressed one",
    ),
}


@pytest.mark.parametrize("case", sorted(TENSOR_REFUSALS))
def test_bad_tensors_are_refused_and_the_model_is_left_as_it_was(checkpoint, case):
    change, message = TENSOR_REFUSALS[case]
    edit_tensors(checkpoint, change)
    with pytest.raises(CastError, match=message):
        load_compressed_tensors(checkpoint)
    # Into a given model: the same error, and the model untouched (every check runs before it
    # is changed; the bad layer is the last one read).
    target = llama()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CastError, match=message):
        load_compressed_tensors(checkpoint, target)
    assert not any(isinstance(mod, NMLinear) for mod in target.modules())
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_of_another_size_is_refused(checkpoint):
    other = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, intermediate_size=128))
    with pytest.raises(CastError, match=r"mlp\.\w+_proj.shape: the checkpoint's weight is \d+x\d+, the model's layer is"):
        load_compressed_tensors(checkpoint, other)
    assert not any(isinstance(mod, NMLinear) for mod in other.modules())


# ------------------------------------------------------------------ export, read by compressed-tensors


def test_export_is_what_compressed_tensors_writes_and_decompresses(tmp_path):
    dense = llama()
    checkpoint = write_checkpoint(dense, tmp_path / "ckpt")
    loaded = load_compressed_tensors(checkpoint)
    out = tmp_path / "exported"
    written = export_compressed_tensors(loaded, out)
    assert written == sorted(sparse_names(dense))
    theirs = safetensors_torch.load_file(str(checkpoint / "model.safetensors"))
    ours = safetensors_torch.load_file(str(out / "model.safetensors"))
    # Every group has exactly two nonzeros, so compressed-tensors' top-2 mask is the layer's
    # kept positions: the files hold the same tensors.
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    # compressed-tensors' own decompressor gives the dense weights back.
    compressor = ModelCompressor.from_pretrained(str(out))
    target = transformers.LlamaForCausalLM(dense.config)
    compressor.decompress(str(out), target)
    for name in sparse_names(dense):
        want = dict(dense.named_modules())[name].weight
        assert torch.equal(dict(target.named_modules())[name].weight.detach(), want.detach()), name
    # And it loads again.
    assert_same_model_as_compress(dense, load_compressed_tensors(out), ids())


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(CastError, match="model: no NMLinear layer"):
        export_compressed_tensors(nn.Sequential(nn.Linear(8, 8)), tmp_path / "x")
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.mul_(cast_rs.nm_mask(lin.weight, "4:8"))
    with pytest.raises(CastError, match="layer '0': pattern 4:8; sparse-24-bitmask stores 2:4 only"):
        export_compressed_tensors(nn.Sequential(NMLinear.from_dense(lin, "4:8")), tmp_path / "x")
