"""Threads, the thread pool size, and fork (DataLoader workers)."""

import os
import signal
import threading
import time

import pytest
import torch

import cast_rs
from cast_rs import _cast_rs


def make(seed):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(256, 512)) for _ in range(3)]
    opt = cast_rs.AdamS(ps, lr=1e-2, pattern="2:4", total_steps=20, l1_decay=1e-2)
    return ps, opt


def run(ps, opt, steps=10):
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_two_threads_match_sequential_runs():
    seq = [make(1), make(2)]
    for ps, opt in seq:
        run(ps, opt)
    par = [make(1), make(2)]
    threads = [threading.Thread(target=run, args=po) for po in par]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (a, _), (b, _) in zip(seq, par):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_pool_size_follows_torch_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _cast_rs.num_threads() == 1
        torch.set_num_threads(2)
        assert _cast_rs.num_threads() == min(2, os.cpu_count() or 2) or _cast_rs.num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rayon_backend_pool_follows_torch_threads_and_matches():
    """CAST_RS_THREADING=rayon: the pool is sized by torch.set_num_threads and steps give the
    same results as the default (OpenMP) backend. In a subprocess: the backend is per process."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch, cast_rs
        from cast_rs import _cast_rs
        torch.set_num_threads(1); assert _cast_rs.num_threads() == 1
        torch.set_num_threads(2); assert _cast_rs.num_threads() == 2
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(512, 512))
        opt = cast_rs.AdamS([p], lr=1e-2, pattern="2:4", total_steps=20)
        for s in range(4):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s))
            opt.step()
            torch.set_num_threads(1 + s % 2)  # the pool is rebuilt between steps
        torch.save(p.detach(), __import__("sys").argv[1])
        """
    )
    import tempfile

    outs = []
    with tempfile.TemporaryDirectory() as d:
        for backend in ("rayon", "openmp"):
            out = os.path.join(d, backend + ".pt")
            env = dict(os.environ, CAST_RS_THREADING=backend)
            proc = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=120, env=env)
            assert proc.returncode == 0, proc.stderr[-2000:]
            outs.append(torch.load(out))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_kernels_work_in_a_forked_child():
    ps, opt = make(3)
    run(ps, opt, 3)  # the parent has used the thread pool
    torch.randn(512, 512) @ torch.randn(512, 512)  # and so has torch
    pid = os.fork()
    if pid == 0:  # child: must not deadlock on the parent's (absent) pool threads
        code = 1
        try:
            run(ps, opt, 2)
            keep = cast_rs.nm_mask(torch.randn(64, 64), "2:4")
            code = 0 if int(keep.sum()) == 64 * 32 else 2
        finally:
            os._exit(code)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in a cast-rs kernel")
