"""cast-rs's PEP 517 build backend: maturin's, plus what building against PyTorch needs.

The extension links libtorch through the `torch-sys` crate, whose build script asks a Python
interpreter where torch is (``LIBTORCH_USE_PYTORCH=1``) and runs whichever ``python3`` (or, in
a virtualenv, ``python``) it finds on ``PATH``. Under pip's build isolation that is not the
interpreter building the wheel, and torch is only importable from the isolated build
environment. So around every maturin hook this backend

1. sets ``LIBTORCH_USE_PYTORCH=1`` and puts a directory first on ``PATH`` whose ``python`` and
   ``python3`` run the building interpreter (``sys.executable``, with the environment pip gave
   it, so the build environment's torch is the one found);
2. builds in a Cargo target directory of its own per torch installation
   (``target/pep517/<hash of torch's path and version>``), unless ``CARGO_TARGET_DIR`` is set:
   torch-sys bakes torch's library path into its cached build output and does not rebuild when
   only ``PATH`` changes, so a shared target directory would link a later build against the
   torch of an earlier, possibly deleted, build environment. Target directories whose torch no
   longer exists are removed first;
3. writes ``python/cast_rs/_build_info.py`` (the torch version the extension is compiled for),
   which ``cast_rs`` reads before loading the extension to refuse a mismatched torch with a
   clear ``ImportError``. The file is tracked in git with the default torch (maturin leaves
   git-ignored files out of wheels); after a wheel build it is put back, after an editable
   build it stays, since the checkout is then what gets imported;
4. puts the Cargo lock file for that torch in place (``build_backend/locks/``; tch binds one
   torch per release) for the duration of the build, and builds ``--locked``;
5. rewrites the wheel's ``Requires-Dist: torch`` to the minor release it was built against
   (``torch>=2.13.0,<2.14``): libtorch has no stable C++ ABI across minor releases, so a wheel
   works with exactly that one.

torch is a build requirement (``[build-system] requires`` in pyproject.toml). An isolated build
uses the torch pinned there; to build against the torch already in your environment, use
``pip install --no-build-isolation .`` (``./run`` does).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import maturin

ROOT = Path(__file__).resolve().parent.parent
BUILD_INFO = ROOT / "python" / "cast_rs" / "_build_info.py"
STAMP = "torch_dir.txt"
# The Cargo lock file for each supported torch minor release: tch binds exactly one torch per
# release (see Cargo.toml). Cargo.lock itself is the default (torch 2.13).
LOCKS = {
    (2, 13): None,
    (2, 11): ROOT / "build_backend" / "locks" / "torch-2.11.Cargo.lock",
    (2, 10): ROOT / "build_backend" / "locks" / "torch-2.10.Cargo.lock",
    (2, 9): ROOT / "build_backend" / "locks" / "torch-2.9.Cargo.lock",
}


def _torch() -> tuple[Path, str]:
    """(torch's package directory, its version) without importing torch (seconds, and CUDA)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "cast-rs builds against PyTorch, and torch is not importable by the building "
            f"interpreter ({sys.executable}). With build isolation pip installs it from "
            "[build-system] requires; with --no-build-isolation install torch first.")
    directory = Path(next(iter(spec.submodule_search_locations))).resolve()
    text = (directory / "version.py").read_text()
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    if match is None:
        raise RuntimeError(f"cannot read torch's version from {directory / 'version.py'}")
    return directory, match.group(1)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _target_dir(torch_dir: Path, version: str) -> Path:
    base = ROOT / "target" / "pep517"
    if base.is_dir():
        for old in base.iterdir():
            recorded = old / STAMP
            if recorded.is_file() and not Path(recorded.read_text().strip()).is_dir():
                shutil.rmtree(old, ignore_errors=True)
    key = hashlib.sha256(f"{torch_dir}\n{version}".encode()).hexdigest()[:16]
    target = base / key
    target.mkdir(parents=True, exist_ok=True)
    (target / STAMP).write_text(f"{torch_dir}\n")
    return target


@contextmanager
def _build_info(version: str, keep: bool) -> Iterator[None]:
    major, minor = _minor(version)
    text = (
        '"""The torch the extension was compiled against: written by the build backend\n'
        '(build_backend/cast_rs_build.py). In git with the default torch."""\n'
        f"TORCH_VERSION = {version.split('+')[0]!r}\n"
        f"TORCH_MINOR = ({major}, {minor})\n"
    )
    saved = BUILD_INFO.read_text() if BUILD_INFO.is_file() else None
    if saved != text:
        BUILD_INFO.write_text(text)
    try:
        yield
    finally:
        if not keep and saved is not None and saved != text:
            BUILD_INFO.write_text(saved)


def supported() -> str:
    return ", ".join(f"{a}.{b}" for a, b in sorted(LOCKS))


@contextmanager
def _lock_for(version: str) -> Iterator[None]:
    """Put the lock file for this torch in place for the build (and the default one back)."""
    if _minor(version) not in LOCKS:
        raise RuntimeError(f"cast-rs builds against torch {supported()}; the building interpreter has "
                           f"torch {version}. Install one of those (or build with build isolation, "
                           "which installs the torch pinned in pyproject.toml).")
    lock = LOCKS[_minor(version)]
    if lock is None:
        yield
        return
    default = ROOT / "Cargo.lock"
    saved = default.read_bytes()
    try:
        default.write_bytes(lock.read_bytes())
        yield
    finally:
        default.write_bytes(saved)


@contextmanager
def _torch_build_env(editable: bool = False) -> Iterator[str]:
    torch_dir, version = _torch()
    saved = dict(os.environ)
    shims = tempfile.mkdtemp(prefix="cast_rs_python_")
    try:
        for name in ("python", "python3"):
            shim = Path(shims) / name
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
            shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.environ["PATH"] = shims + os.pathsep + os.environ.get("PATH", "")
        os.environ["LIBTORCH_USE_PYTORCH"] = "1"
        # The lock file is the dependency pin: never re-resolve it during a build.
        os.environ["MATURIN_PEP517_ARGS"] = (os.environ.get("MATURIN_PEP517_ARGS", "") + " --locked").strip()
        if not os.environ.get("CARGO_TARGET_DIR"):
            os.environ["CARGO_TARGET_DIR"] = str(_target_dir(torch_dir, version))
        print(f"cast-rs: building against torch {version} at {torch_dir} "
              f"(Cargo target directory {os.environ['CARGO_TARGET_DIR']})", flush=True)
        with _lock_for(version), _build_info(version, keep=editable):
            yield version
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(shims, ignore_errors=True)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _pin_torch(wheel: Path, version: str) -> None:
    """Rewrite the wheel's torch requirement to the minor release it was built against."""
    major, minor = _minor(version)
    requirement = f"Requires-Dist: torch>={version.split('+')[0]},<{major}.{minor + 1}"
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        metadata = src.read(metadata_name).decode()
        metadata, count = re.subn(r"^Requires-Dist: torch\b[^\n;]*", requirement, metadata, flags=re.M)
        if count != 1:
            raise RuntimeError(f"expected one torch requirement in {metadata_name}, found {count}")
        new_metadata = metadata.encode()
        record_lines = []
        for line in src.read(record_name).decode().splitlines():
            if line.startswith(metadata_name + ","):
                line = f"{metadata_name},{_record_hash(new_metadata)},{len(new_metadata)}"
            record_lines.append(line)
        for info in src.infolist():
            if info.filename == metadata_name:
                dst.writestr(info, new_metadata)
            elif info.filename == record_name:
                dst.writestr(info, ("\n".join(record_lines) + "\n").encode())
            else:
                dst.writestr(info, src.read(info.filename))
    tmp.replace(wheel)


def build_wheel(wheel_directory: str, config_settings: Mapping[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    with _torch_build_env() as version:
        name = maturin.build_wheel(wheel_directory, config_settings, None)
    _pin_torch(Path(wheel_directory) / name, version)
    return name


def build_editable(wheel_directory: str, config_settings: Mapping[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    with _torch_build_env(editable=True) as version:
        name = maturin.build_editable(wheel_directory, config_settings, None)
    _pin_torch(Path(wheel_directory) / name, version)
    return name


def build_sdist(sdist_directory: str, config_settings: Mapping[str, Any] | None = None) -> str:
    return maturin.build_sdist(sdist_directory, config_settings)


get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_editable = maturin.get_requires_for_build_editable
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
# No prepare_metadata_for_build_*: the torch requirement is only known once the wheel is built
# against a torch, so frontends take the metadata from the wheel itself.
