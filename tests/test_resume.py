"""Crash and resume: a CAST run SIGKILLed mid-training and restarted from its last checkpoint
ends bit-identical to an uninterrupted run (weights, scales, Adam moments, packed masks, LR
schedule), on both kernel paths.

The training runs in child processes (tests/_resume_worker.py): 60 steps, masks refreshed
every 3 steps (1, 4, 7, ..., 58), a checkpoint every 7 steps. The killed run is stopped after
step 18, so it resumes from the step-14 checkpoint: step 15 steps with the mask restored from
the checkpoint (last refreshed at step 13) and step 16 refreshes it, counting flips against it.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import cast_rs
from _resume_worker import build

WORKER = os.path.join(os.path.dirname(__file__), "_resume_worker.py")
STEPS, CKPT_EVERY, KILL_AFTER = 60, 7, 18
RESUME_FROM = KILL_AFTER // CKPT_EVERY * CKPT_EVERY  # 14


def _env(path: str) -> dict:
    env = dict(os.environ)
    env["CAST_RS_FORCE_GENERIC"] = "1" if path == "generic" else "0"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cmd(run_dir, *extra):
    return [sys.executable, WORKER, str(run_dir), "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), *extra]


def _start(run_dir, path: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run_dir), env=_env(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reap(proc: subprocess.Popen) -> None:
    """Kill a child left running by a failed assertion."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == "done"
    return out


def _assert_identical(a, b, where: str = "") -> None:
    """Exact equality of nested containers; tensors with torch.equal (same dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if not torch.equal(a, b):  # pytest.fail: a short message instead of two tensor reprs
            d = a.double() - b.double()
            pytest.fail(f"{where}: {int((d != 0).sum())} of {a.numel()} elements differ, max |diff| {d.abs().max().item():.3g}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_sigkilled_run_resumes_bit_identically(tmp_path, path):
    # The uninterrupted reference run, in its own directory, alongside (to save wall time).
    clean = tmp_path / "clean"
    clean.mkdir()
    reference_run = _start(clean, path)

    with contextlib.ExitStack() as stack:
        stack.callback(_reap, reference_run)
        # 1. Start a run and SIGKILL it mid-training, a few steps after its step-14 checkpoint.
        killed = tmp_path / "killed"
        killed.mkdir()
        err = stack.enter_context(open(tmp_path / "killed.stderr", "w+"))
        proc = subprocess.Popen(
            _cmd(killed, "--hang-after", str(KILL_AFTER)), env=_env(path), stdout=subprocess.PIPE, stderr=err, text=True
        )
        watchdog = threading.Timer(120, proc.kill)  # never hang the suite if the worker misbehaves
        watchdog.start()
        seen = []
        try:
            for line in proc.stdout:
                seen.append(line.strip())
                if line.strip() == f"step {KILL_AFTER}":
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            rc = proc.wait(timeout=60)
        finally:
            watchdog.cancel()
            proc.stdout.close()
        err.seek(0)
        assert seen and seen[-1] == f"step {KILL_AFTER}", f"worker stopped early: {seen[-5:]}\n{err.read()[-3000:]}"
        assert rc == -signal.SIGKILL
        assert not (killed / "final.pt").exists()
        assert not (killed / "ckpt.pt.tmp").exists()
        ckpt = torch.load(killed / "ckpt.pt", weights_only=False)
        assert ckpt["step"] == RESUME_FROM

        # 2. Restart it: it resumes from the checkpoint and runs to the end.
        out = _finish(_start(killed, path))
        lines = out.splitlines()
        assert lines[0] == f"resumed from step {RESUME_FROM}"
        assert lines[1] == f"step {RESUME_FROM + 1}"
        assert lines.count("step 1") == 0 and f"step {STEPS}" in lines

        # 3. The same run without interruption.
        out = _finish(reference_run)
        assert "resumed" not in out and "step 1" in out.splitlines()

    resumed = torch.load(killed / "final.pt", weights_only=False)
    reference = torch.load(clean / "final.pt", weights_only=False)

    # The kernel path was the one asked for (the counters count the resumed part only).
    for r in (resumed, reference):
        assert r["generic_forced"] == (path == "generic")
        fast, generic = r["kernel_calls"]
        assert (generic if path == "generic" else fast) > 0
        assert (fast if path == "generic" else generic) == 0

    # The run actually trained and was sparse: masks present, weights moved, exact 2:4 at the end.
    opt_state = reference["optimizer"]["state"]
    masks = {i: st["mask"] for i, st in opt_state.items() if "mask" in st}
    assert len(masks) == 3 and all(m.dtype == torch.uint8 for m in masks.values())
    assert all(float(st["step"]) == STEPS for st in opt_state.values())
    initial, _, _ = build()
    for name, w in initial.state_dict().items():
        assert not torch.equal(w, reference["model_before_finalize"][name]), name
    for name in ("0.weight", "3.weight", "5.weight"):
        assert cast_rs.check_nm(reference["model"][name], "2:4").ok

    # Bit-identical: every tensor and number, packed masks and flip rates included.
    for key in ("model_before_finalize", "optimizer", "model", "scheduler", "lr", "rng"):
        _assert_identical(resumed[key], reference[key], key)
    for i in masks:
        assert torch.equal(resumed["optimizer"]["state"][i]["mask"], masks[i])
