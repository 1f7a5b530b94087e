"""DDP and FSDP2 training with 2 processes (gloo, CPU), started with torchrun as a user would.

The worker is tests/_dist_worker.py; every distributed result is compared with a single process
training on the same global batch (``_dist_worker.reference``).
"""

import os
import subprocess
import sys

import pytest
import torch

import cast_rs
import _dist_worker as worker

if not torch.distributed.is_available():  # pragma: no cover - depends on the torch build
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def torchrun(scenario: str, out: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, scenario, out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"torchrun {scenario} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (torchrun sets OMP_NUM_THREADS=1)
    try:
        params, masks, model, sparse = worker.reference()
        stats_overall = sparse.stats().overall
        sparse.finalize()
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
    return {"params": params, "masks": masks, "final": final, "stats_overall": stats_overall}


def assert_matches_reference(params, masks, reference):
    ref_params, ref_masks = reference["params"], reference["masks"]
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-6, msg=name)
    assert masks.keys() == ref_masks.keys() and len(masks) == 4
    for name in ref_masks:
        assert torch.equal(masks[name], ref_masks[name]), name


def test_ddp_masks_identical_on_ranks_and_equal_to_single_process(tmp_path, reference):
    torchrun("ddp", str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["masks_equal_rank0"] and r1["masks_equal_rank0"]
    for name in r0["params"]:  # DDP: identical parameters on every rank
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    assert_matches_reference(r0["params"], r0["masks"], reference)
    assert r0["check_nm"] and r1["check_nm"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp", str(out))
    return out, torch.load(out / "fsdp.pt", weights_only=False)


def test_fsdp2_steps_local_shards_and_matches_single_process(fsdp_run, reference):
    _, r = fsdp_run
    info = r["info"]
    assert info["weight_is_dtensor"] and info["weight_local_shape"] == (16, 16)  # really sharded
    # The state is sharded like the parameter: moments and the packed mask are DTensors.
    assert info["state_types"]["exp_avg"] == "DTensor" and info["state_types"]["mask"] == "DTensor"
    assert info["mask_shape"] == (32, 2) and info["mask_local_bytes"] == 16 * 16 // 8
    assert_matches_reference(r["params"], r["masks"], reference)
    # stats() gathers the sharded weights: the same ratio as the single process.
    assert info["stats_overall"] == pytest.approx(reference["stats_overall"], rel=1e-5)
    assert all(0.0 <= f <= 1.0 for f in info["flip_rates"])


def test_fsdp2_finalize_check_nm_and_plain_state_dict(fsdp_run, reference):
    _, r = fsdp_run
    assert r["check_nm"] and r["finalize_rows"] == 4
    ref_final = reference["final"]
    plain = r["plain"]
    assert plain.keys() == ref_final.keys()
    for k in ref_final:
        torch.testing.assert_close(plain[k], ref_final[k], rtol=1e-5, atol=1e-6, msg=k)
    # The plain state dict loads strictly into the original (never sparsified) architecture.
    torch.manual_seed(0)
    dense = worker.Net()
    dense.load_state_dict(plain, strict=True)
    assert cast_rs.check_nm(dense.fc1.weight, "2:4").ok
    assert cast_rs.check_nm(dense.conv.weight, "2:4", dim=0).ok
    x, _ = worker.batch(0)
    torch.testing.assert_close(dense(x), r["logits"], rtol=1e-5, atol=1e-5)


def test_fsdp2_dcp_checkpoint_resumes_bit_identically(fsdp_run):
    out, r = fsdp_run
    torchrun("fsdp_resume", str(out))
    resumed = torch.load(out / "fsdp_resume.pt", weights_only=False)
    for name in r["params"]:
        assert torch.equal(resumed["params"][name], r["params"][name]), name
    for name in r["masks"]:
        assert torch.equal(resumed["masks"][name], r["masks"][name]), name


def test_fsdp2_sharding_that_splits_groups_is_refused(tmp_path):
    torchrun("fsdp_split", str(tmp_path))
    for rank in (0, 1):
        message = (tmp_path / f"split{rank}.txt").read_text()
        assert "splits 2:4 groups" in message and "dim 0" in message, message


def test_fsdp2_relative_l1_uses_the_whole_tensor(tmp_path):
    """l1_mode="relative" under FSDP2: each rank's λ is the RMS over the whole tensor (a
    collective), so training matches one process, λ included."""
    torchrun("fsdp_relative", str(tmp_path))
    r = torch.load(tmp_path / "relative.pt", weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, masks, l1 = worker.reference_relative()
    finally:
        torch.set_num_threads(threads)
    assert_matches_reference(r["params"], r["masks"], {"params": params, "masks": masks})
    assert r["l1"].keys() == l1.keys() and len(l1) == 4
    for name in l1:
        # float64 sums of float32 squares in another order: ~1e-7 relative, far below 1e-5.
        assert r["l1"][name] == pytest.approx(l1[name], rel=1e-5), name


def test_fsdp2_hugging_face_gpt2(tmp_path):
    """GPT-2's Conv1D layers (groups along dim 0, sharded along dim 0) under FSDP2, with its
    tied LM head: trains like one process, finalizes to exact 2:4, and the gathered state dict
    loads into a plain GPT2LMHeadModel that computes the same logits.

    The single-process reference computes the gradient FSDP2 computes (each rank's half-batch
    gradient, averaged; see `reference_gpt2`), so the trained weights must agree bit for bit.
    A tolerance would not be a safer choice: AdamS's steps are near-sign, so a last-bit
    difference in a gradient that is rounding noise (the key bias's gradient is exactly zero in
    exact arithmetic) becomes a ±lr step, and no tolerance below 2·lr·steps (0.036 here, the
    size of the weights themselves) covers that while still testing anything."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (./run test installs it)")
    torchrun("fsdp_gpt2", str(tmp_path))
    r = torch.load(tmp_path / "gpt2.pt", weights_only=False)
    assert r["check_nm"] and r["sparse_params"] == 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (torchrun sets OMP_NUM_THREADS=1)
    try:
        ref = worker.reference_gpt2(world=2)
    finally:
        torch.set_num_threads(threads)
    ref_sd = ref.state_dict()
    plain = r["plain"]
    assert set(plain) <= set(ref_sd) and "transformer.h.0.attn.c_attn.weight" in plain
    for k in plain:
        torch.testing.assert_close(plain[k], ref_sd[k], rtol=0, atol=0, msg=k)
    torch.manual_seed(0)
    fresh = transformers.GPT2LMHeadModel(ref.config)
    missing, unexpected = fresh.load_state_dict(plain, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte, not saved twice
    fresh.tie_weights()
    assert cast_rs.check_nm(fresh, "2:4").ok
    torch.testing.assert_close(fresh(worker.gpt2_batch(0)).logits, r["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_cli_distributed_example_under_torchrun(tmp_path, mode):
    """The documented command: torchrun --nproc-per-node 2 -m cast_rs distributed."""
    save = tmp_path / "plain.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cast_rs",
        "distributed",
        "--mode",
        mode,
        "--steps",
        "120",
        "--save",
        str(save),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"2 process(es), {mode.upper()}" in proc.stdout and "exact 2:4: yes" in proc.stdout, proc.stdout
    from cast_rs.example import _mlp

    model = _mlp(256)
    model.load_state_dict(torch.load(save), strict=True)
    assert cast_rs.check_nm(model[0].weight, "2:4").ok and cast_rs.check_nm(model[2].weight, "2:4").ok
