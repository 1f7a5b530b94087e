"""The sparsity-tax study's runs resume bit-identically after an interruption.

benchmarks/study_tax.py saves a run's whole state every ``CKPT_EVERY`` steps so that
large-model runs of thousands of steps can span sessions; docs/sparsity_tax.md records such
runs as if they had run straight through. This checks that claim on a tiny model: a run
interrupted after a checkpoint and started again by the same call records the same curve and
final perplexity, bit for bit, as one that was never interrupted, for the methods whose state
differs (AdamS with the sparsity parametrization, SR-STE's masked forward, dense AdamW).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import study_tax  # noqa: E402
from cast_rs.demo import GPTConfig, TinyGPT, evaluate  # noqa: E402

STEPS = 30
TINY = GPTConfig(context=16, width=32, layers=1, heads=2)


class Interrupted(Exception):
    pass


def _run(spec: str, state, tr, va, points: int = 3):
    torch.manual_seed(0)
    return study_tax.run_method(spec, state, TINY, tr, va, STEPS, 4, 1e-3, "2:4", points, 0, state_key="tiny")


@pytest.mark.parametrize("spec", ["cast:l1=0.1,lr=5e-4,mlr=2", "srste", "dense_continued"])
def test_an_interrupted_study_run_resumes_bit_identically(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(study_tax, "OUT", tmp_path)
    monkeypatch.setattr(study_tax, "CKPT_EVERY", 10)
    # The study's evaluate() over 8 validation windows instead of 192 keeps the test fast.
    monkeypatch.setattr(study_tax, "evaluate", lambda m, va, windows, ctx: evaluate(m, va, 8, ctx))
    torch.manual_seed(1)
    state = TinyGPT(TINY).state_dict()
    data = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    tr, va = data[:3072], data[3072:]

    whole = _run(spec, state, tr, va)
    assert not list(tmp_path.glob("run_*.ckpt")), "a finished run leaves no checkpoint"
    assert "resumed_at" not in whole

    calls = {"n": 0}
    real = study_tax.distill_loss

    def dies_at_step_25(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(study_tax, "distill_loss", dies_at_step_25)
    with pytest.raises(Interrupted):
        _run(spec, state, tr, va)
    assert len(list(tmp_path.glob("run_*.ckpt"))) == 1, "the run saved its state before dying"
    monkeypatch.setattr(study_tax, "distill_loss", real)
    # Resuming with other curve points would record a curve no uninterrupted run has.
    with pytest.raises(SystemExit, match="--points 3, not 5"):
        _run(spec, state, tr, va, points=5)

    resumed = _run(spec, state, tr, va)
    assert resumed["resumed_at"] == 20  # the last checkpoint before step 25
    assert resumed["ppl"] == whole["ppl"]
    assert resumed["curve"] == whole["curve"]
    assert resumed.get("projected_curve") == whole.get("projected_curve")
    assert not list(tmp_path.glob("run_*.ckpt"))
    # A different command does not pick up another run's checkpoint: the key includes the spec.
    assert study_tax._run_ckpt_path(whole, "tiny", 1e-3, 4, 0, 1 / 3) != study_tax._run_ckpt_path(
        dict(whole, method=spec + ",eta=1"), "tiny", 1e-3, 4, 0, 1 / 3
    )


def test_run_skips_a_method_already_recorded_with_the_same_arguments(tmp_path):
    import argparse
    import json

    args = dict(
        model="small",
        corpus="stdlib",
        pretrain_steps=3000,
        steps=400,
        pattern="2:4",
        lr=1e-3,
        batch=32,
        seed=0,
        tag="x",
        loop="user",
    )
    runs = tmp_path / "runs.jsonl"
    assert study_tax.recorded_run(argparse.Namespace(**args), "srste", runs) is None  # no file yet
    rec = {k: v for k, v in args.items() if k not in ("lr", "loop")}
    rec.update(method="srste", lr_default=1e-3, loop="user", ppl=3.5)
    runs.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "method": "dense_continued", "loop": None}) + "\n")
    assert study_tax.recorded_run(argparse.Namespace(**args), "srste", runs)["ppl"] == 3.5
    # Any argument that changes the run makes it a different one.
    for key, other in [("steps", 1000), ("seed", 1), ("loop", "study"), ("tag", ""), ("lr", 5e-4), ("model", "large")]:
        assert study_tax.recorded_run(argparse.Namespace(**{**args, key: other}), "srste", runs) is None, key
    assert study_tax.recorded_run(argparse.Namespace(**args), "cast:suggest=1", runs) is None
    # A record without a loop (made before --loop existed) is a study-loop run.
    rec_old = {k: v for k, v in rec.items() if k != "loop"}
    runs.write_text(json.dumps(rec_old) + "\n")
    assert study_tax.recorded_run(argparse.Namespace(**{**args, "loop": "study"}), "srste", runs) is not None
    assert study_tax.recorded_run(argparse.Namespace(**args), "srste", runs) is None
