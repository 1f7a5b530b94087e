"""torch.compile and torch.export on sparsified models: the weight-scaling kernels
are PyTorch operators (``torch.ops.cast_rs.scale_forward`` / ``scale_backward``) with fake
implementations and autograd, so a compiled forward has no graph break at the sparse layers,
and a compiled function that calls ``AdamS.step()`` runs it eagerly (one graph break) and
takes exactly the eager steps.

Backends: ``eager`` (dynamo only) and ``aot_eager`` (AOTAutograd: traces the operators' fake
implementations and their autograd formula); both run the same ATen kernels as eager mode in
the same order, so outputs and gradients must be bit-identical. ``inductor`` (C++ codegen,
minutes on this machine) is not run here."""

import copy

import pytest
import torch
from torch import nn

import cast_rs
from _tiny_hf import tiny_llama_config

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (./run test installs it)")


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def llama():
    cfg = tiny_llama_config(vocab_size=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {
    "mlp": (mlp, lambda: torch.randn(4, 16, generator=torch.Generator().manual_seed(1))),
    "llama": (llama, lambda: torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))),
    "gpt2": (gpt2, lambda: torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))),
}


def output(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def sparsified(name):
    torch.manual_seed(0)
    make, data = MODELS[name]
    model = make().eval()
    if hasattr(model, "config"):
        model.config.use_cache = False
    sp = cast_rs.sparsify(model, "2:4")
    assert len(sp.layers) >= 3
    with torch.no_grad():  # scales away from 1, so that their gradient path matters
        for s in sp.scale_parameters():
            s.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    return model, sp, data()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_forward_fullgraph_equals_eager(name, backend):
    torch._dynamo.reset()
    model, sp, x = sparsified(name)
    out = output(model, x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    cout = output(compiled, x)
    cout.square().mean().backward()
    assert torch.equal(cout, out)
    # The forward is bit-identical. The MLP's backward is too. A transformer's compiled
    # backward may sum float32 terms in another order (attention, the embedding gradient), and
    # the difference flows into every weight gradient upstream of it: each gradient entry is a
    # sum over the k = tokens × width terms that reach it, and reassociating such a sum moves
    # it by at most k·eps·max|g|.
    width = 1 if name == "mlp" else model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    for n, p in model.named_parameters():
        if name == "mlp":
            assert torch.equal(p.grad, grads[n]), n
        else:
            atol = x.numel() * width * torch.finfo(torch.float32).eps * float(grads[n].abs().max())
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_graph_break_in_the_forward(name):
    torch._dynamo.reset()
    model, _, x = sparsified(name)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_compressed_model_equals_eager(name, dtype, backend):
    """A finalized model compressed (NMLinear: torch.ops.cast_rs.nm_linear, with the row scales
    as an argument for int8 values) compiles into one graph and gives the eager outputs bit for
    bit (the same operator runs in both)."""
    torch._dynamo.reset()
    model, sp, x = sparsified(name)
    sp.finalize()
    cast_rs.compress(model, dtype=dtype)
    assert any(isinstance(m, cast_rs.NMLinear) and m.values.dtype == dtype for m in model.modules())
    with torch.no_grad():
        out = output(model, x)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert torch.equal(output(torch.compile(model, fullgraph=True, backend=backend), x), out)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_function_calling_adams_step_equals_eager(backend):
    """It used to fail in AdamS._init_group ("Cannot construct ConstantVariable for value of
    type Parameter"); the step now runs eagerly inside the compiled function."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    a = mlp()
    b = copy.deepcopy(a)
    runs = []
    for model in (a, b):
        cast_rs.sparsify(model, "2:4")
        runs.append((model, cast_rs.AdamS(model.parameters(), lr=1e-2, l1_decay=0.1, total_steps=6, mask_interval=2)))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))

    def train_step(model, opt):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    compiled_step = torch.compile(train_step, backend=backend)
    for _ in range(6):
        compiled_step(*runs[0])
        train_step(*runs[1])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = runs[0][1].state[p], runs[1][1].state[q]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


@pytest.mark.parametrize("finalized", [False, True])
def test_export_round_trip(finalized, tmp_path):
    """torch.export of a sparsified model (the scaling operator in the graph) and of a
    finalized one (plain layers): saved, loaded, and the same outputs."""
    model, sp, x = sparsified("mlp")
    if finalized:
        sp.finalize()
    ep = torch.export.export(model, (x,))
    if not finalized:
        assert any("cast_rs.scale_forward" in str(node.target) for node in ep.graph.nodes)
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), model(x))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_srste_forward_compiles_fullgraph(backend):
    """SR-STE recomputes its mask at every forward through cast_rs.nm_mask, an operator
    (torch.ops.cast_rs.nm_mask) with a fake implementation: no graph break, the same output and
    gradients as eager (the MLP's are bit-identical, as above)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = mlp()
    cast_rs.baselines.SRSTE(model, "2:4")
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    cout = torch.compile(model, fullgraph=True, backend=backend)(x)
    cout.square().mean().backward()
    assert torch.equal(cout, out)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_nm_mask_operator_traces_and_checks_shapes():
    x = torch.randn(8, 16)
    f = torch.compile(lambda t: cast_rs.nm_mask(t, "2:4"), fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), cast_rs.nm_mask(x, "2:4"))
    assert torch.equal(torch.ops.cast_rs.nm_mask(x, 2, 4, -1, False), cast_rs.nm_mask(x, "2:4"))
    with pytest.raises(Exception, match="not divisible by M=4"):
        f(torch.randn(8, 6))  # a new shape: traced again, through the fake implementation


def test_compiled_optimizer_step_after_finalize_keeps_nm():
    """finalize's mask guard runs as torch's global step post-hook, which a compiled function
    calling step() traces: the guard runs eagerly there and the model stays exactly 2:4."""
    torch._dynamo.reset()
    model, sp, x = sparsified("mlp")
    opt = cast_rs.AdamS(model.parameters(), lr=1e-2, total_steps=5)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    sp.finalize()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = torch.compile(lambda: adamw.step(), backend="aot_eager")
    for _ in range(5):
        adamw.zero_grad()
        model(x).square().mean().backward()
        step()
    assert cast_rs.check_nm(model, "2:4").ok
