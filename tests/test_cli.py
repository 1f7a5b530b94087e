"""The command line checks every value and output path before any work starts: a bad one is
an error naming the flag, with exit status 2, and nothing is trained (it used to fail only
after most of the run, writing nothing)."""

import pytest

import cast_rs.demo
import cast_rs.distributed_example
import cast_rs.example
from cast_rs import cli


@pytest.fixture
def no_work(monkeypatch):
    """Any run reaching the work itself fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run started despite a bad argument")

    monkeypatch.setattr(cast_rs.demo, "main", refuse)
    monkeypatch.setattr(cast_rs.example, "main", refuse)
    monkeypatch.setattr(cast_rs.distributed_example, "main", refuse)


BAD = [
    (["demo", "--quick", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["demo", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["demo", "--cast-lr", "0"], "--cast-lr must be a finite number > 0"),
    (["demo", "--quick", "--cast-lr", "inf"], "--cast-lr must be a finite number > 0"),
    (["demo", "--warmup", "1"], "--warmup must be a fraction in [0, 1)"),
    (["demo", "--quick", "--warmup", "-0.1"], "--warmup must be a fraction in [0, 1)"),
    (["demo", "--l1-decay", "-1"], "--l1-decay must be a finite number >= 0"),
    (["demo", "--l1-decay", "inf"], "--l1-decay must be a finite number >= 0"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--batch", "-3"], "--batch must be >= 1"),
    (["demo", "--pretrain-steps", "0"], "--pretrain-steps must be >= 1"),
    (["demo", "--seed", "-1"], "--seed must be in"),
    (
        ["demo", "--json", "/nonexistent_dir/r.json"],
        "--json /nonexistent_dir/r.json: directory '/nonexistent_dir' does not exist",
    ),
    (["demo", "--plot", "{tmp}/x.jpgx"], "matplotlib cannot write '.jpgx' files"),
    (["demo", "--plot", "{tmp}"], "is a directory"),
    (["demo", "--data", "{tmp}/missing.txt"], "--data {tmp}/missing.txt: no such file or directory"),
    (["example", "--pattern", "4:4"], "--pattern: N must satisfy 1 <= N < M"),
    (["example", "--steps", "0"], "--steps must be >= 1"),
    (["distributed", "--pattern", "2-4"], '--pattern: expected a string like "2:4"'),
    (["distributed", "--save", "/nonexistent_dir/w.pt"], "--save /nonexistent_dir/w.pt: directory"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_fail_before_any_work(argv, message, tmp_path, capsys, no_work):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_good_output_paths_pass_the_checks(tmp_path, monkeypatch):
    """The checks refuse only what would fail: writable paths and known formats go through."""
    seen = {}
    monkeypatch.setattr(cast_rs.demo, "main", lambda args: seen.setdefault("args", args) and 0)
    for plot in ("c.png", "c.PDF", "c.svg", "c"):
        seen.clear()
        argv = [
            "demo",
            "--quick",
            "--lr",
            "1e-3",
            "--l1-decay",
            "0",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / plot),
            "--data",
            str(tmp_path),
        ]
        assert cli.main(argv) == 0
        assert seen["args"].plot == str(tmp_path / plot) and seen["args"].l1_decay == 0.0
