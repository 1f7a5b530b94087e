"""Packaging: the torch-version guard at import, and the build backend's pure-Python parts
(the wheel's torch pin, the lock file per torch). The builds themselves are exercised by
`./run dist` and `./run test-installed`."""

import base64
import hashlib
import importlib.util
import re
import zipfile
from pathlib import Path

import pytest
import torch

from cast_rs import _torch_compat

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "build_backend" / "cast_rs_build.py"


def load_backend():
    if not BACKEND.is_file():
        pytest.skip("build_backend/ is not next to these tests (an installed copy of tests/)")
    pytest.importorskip("maturin", reason="the build backend wraps maturin's (./run installs it)")
    spec = importlib.util.spec_from_file_location("cast_rs_build_under_test", BACKEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_torch_is_the_one_the_extension_was_built_for():
    built = _torch_compat.built_torch_version()
    assert built is not None, "python/cast_rs/_build_info.py is missing"
    assert _torch_compat._minor(built) == _torch_compat._minor(torch.__version__)


@pytest.mark.parametrize("installed", ["2.13.0", "2.13.1+cpu", "2.13.0+cu130"])
def test_same_minor_release_imports(installed):
    _torch_compat.check_torch(installed, "2.13.0")


@pytest.mark.parametrize("installed", ["2.11.0+cu130", "2.14.0", "3.13.0"])
def test_another_minor_release_is_refused_with_both_versions_and_a_fix(installed):
    with pytest.raises(ImportError) as info:
        _torch_compat.check_torch(installed, "2.13.0")
    message = str(info.value)
    assert "built for torch 2.13.0" in message and f"torch {installed} is installed" in message
    assert "pip install 'torch>=2.13,<2.14'" in message and "--no-build-isolation" in message


def test_unknown_build_version_defers_to_loading_the_extension():
    _torch_compat.check_torch("2.11.0", None)


def test_an_undefined_symbol_becomes_an_error_that_says_what_to_do():
    raw = ImportError("/x/_cast_rs.so: undefined symbol: _ZN3c1015SmallVectorBase")
    error = _torch_compat.load_error(raw, "2.11.0")
    assert "does not load under torch 2.11.0" in str(error) and "undefined symbol" in str(error)
    assert "--no-build-isolation" in str(error)
    other = ImportError("No module named 'cast_rs._cast_rs'")
    assert _torch_compat.load_error(other, "2.11.0") is other


def test_each_lock_file_binds_the_tch_release_for_its_torch():
    backend = load_backend()
    tch_for = {(2, 13): "0.26.0", (2, 11): "0.24.0", (2, 10): "0.23.0", (2, 9): "0.22.0"}
    assert set(backend.LOCKS) == set(tch_for)
    for minor, lock in backend.LOCKS.items():
        text = (lock or ROOT / "Cargo.lock").read_text()
        for crate in ("tch", "torch-sys", "pyo3-tch"):
            versions = re.findall(rf'name = "{crate}"\nversion = "([^"]+)"', text)
            assert versions == [tch_for[minor]], (minor, crate, versions)
    # Everything else is locked to the same versions as the default.
    default = (ROOT / "Cargo.lock").read_text()
    strip = re.compile(r'\[\[package\]\]\nname = "(?:tch|torch-sys|pyo3-tch)"\n[^\[]*')
    for lock in filter(None, backend.LOCKS.values()):
        assert strip.sub("", lock.read_text()) == strip.sub("", default), lock.name


def test_an_unsupported_torch_stops_the_build_naming_the_supported_ones():
    backend = load_backend()
    with pytest.raises(RuntimeError, match=r"builds against torch 2\.9, 2\.10, 2\.11, 2\.13; .* torch 2\.12\.0"):
        with backend._lock_for("2.12.0"):
            pass


def test_the_lock_swap_is_undone_after_the_build(tmp_path, monkeypatch):
    backend = load_backend()
    default, other = tmp_path / "Cargo.lock", tmp_path / "other.lock"
    default.write_text("default\n")
    other.write_text("torch 2.11\n")
    monkeypatch.setattr(backend, "ROOT", tmp_path)
    monkeypatch.setitem(backend.LOCKS, (2, 11), other)
    with pytest.raises(KeyError):
        with backend._lock_for("2.11.0+cpu"):
            assert default.read_text() == "torch 2.11\n"
            raise KeyError("the build failed")
    assert default.read_text() == "default\n"


def test_the_wheel_requires_the_torch_minor_it_was_built_for(tmp_path):
    backend = load_backend()
    wheel = tmp_path / "cast_rs-0.1.0-cp311-cp311-linux_x86_64.whl"
    metadata = (
        "Metadata-Version: 2.4\nName: cast-rs\nVersion: 0.1.0\n"
        "Requires-Dist: torch>=2.13,<2.14\nRequires-Dist: numpy>=1.24\n"
        "Requires-Dist: pytest>=7 ; extra == 'test'\n"
    ).encode()
    module = b"print('hi')\n"
    info = b"TORCH_VERSION = '2.13.0'\n"
    record = (
        f"cast_rs/__init__.py,{backend._record_hash(module)},{len(module)}\n"
        f"cast_rs/_build_info.py,{backend._record_hash(info)},{len(info)}\n"
        f"cast_rs-0.1.0.dist-info/METADATA,{backend._record_hash(metadata)},{len(metadata)}\n"
        "cast_rs-0.1.0.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("cast_rs/__init__.py", module)
        z.writestr("cast_rs/_build_info.py", info)
        z.writestr("cast_rs-0.1.0.dist-info/METADATA", metadata)
        z.writestr("cast_rs-0.1.0.dist-info/RECORD", record)
    backend._stamp_wheel(wheel, "2.11.0+cu130")
    with zipfile.ZipFile(wheel) as z:
        new_metadata = z.read("cast_rs-0.1.0.dist-info/METADATA")
        new_info = z.read("cast_rs/_build_info.py")
        rows = [line.split(",") for line in z.read("cast_rs-0.1.0.dist-info/RECORD").decode().splitlines()]
        assert z.read("cast_rs/__init__.py") == module
    namespace = {}
    exec(new_info.decode(), namespace)
    assert namespace["TORCH_VERSION"] == "2.11.0"
    requires = [line for line in new_metadata.decode().splitlines() if line.startswith("Requires-Dist")]
    assert requires == [
        "Requires-Dist: torch>=2.11.0,<2.12",
        "Requires-Dist: numpy>=1.24",
        "Requires-Dist: pytest>=7 ; extra == 'test'",
    ]
    # RECORD's hash and size of METADATA match the new file (pip verifies them on install).
    for name, data in (("cast_rs-0.1.0.dist-info/METADATA", new_metadata), ("cast_rs/_build_info.py", new_info)):
        digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert [name, digest, str(len(data))] in rows, name
    assert len(rows) == 4


def test_a_wheel_for_another_torch_builds_from_a_staging_copy_not_the_checkout(tmp_path, monkeypatch):
    backend = load_backend()
    tree = tmp_path / "tree"
    for rel, text in {
        "Cargo.lock": "default\n",
        "src/lib.rs": "// rust\n",
        "python/cast_rs/x.py": "x = 1\n",
        "target/release/big": "build product\n",
        ".venv/bin/python": "venv\n",
        "python/cast_rs/_cast_rs.so": "extension\n",
    }.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    lock = tmp_path / "torch-2.11.Cargo.lock"
    lock.write_text("torch 2.11\n")
    monkeypatch.setattr(backend, "ROOT", tree)
    staging = backend._staging_copy(tmp_path / "home", lock)
    assert (staging / "Cargo.lock").read_text() == "torch 2.11\n"
    assert (tree / "Cargo.lock").read_text() == "default\n"
    assert (staging / "src/lib.rs").read_text() == "// rust\n" and (staging / "python/cast_rs/x.py").is_file()
    assert not (staging / "target").exists() and not (staging / ".venv").exists()
    assert not (staging / "python/cast_rs/_cast_rs.so").exists()
    # Modification times survive the copy: Cargo's fingerprints see unchanged sources.
    assert (staging / "src/lib.rs").stat().st_mtime == (tree / "src/lib.rs").stat().st_mtime


def test_the_maturin_the_build_runs_is_the_imported_packages(tmp_path):
    """Not whichever `maturin` is first on PATH (a pyenv shim there rewrote PATH, and torch-sys
    then found a python without torch)."""
    import subprocess
    from importlib import metadata

    backend = load_backend()
    binary = backend._maturin_binary()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["maturin", metadata.version("maturin")]
    assert "/.pyenv/shims/" not in binary
