"""cast-rs's PEP 517 build backend: maturin's, plus what building against PyTorch needs.

The extension links libtorch through the `torch-sys` crate, whose build script asks a Python
interpreter where torch is (``LIBTORCH_USE_PYTORCH=1``) and runs whichever ``python3`` (or, in
a virtualenv, ``python``) it finds on ``PATH``. Under pip's build isolation that is not the
interpreter building the wheel, and torch is only importable from the isolated build
environment. So around every maturin hook this backend

1. sets ``LIBTORCH_USE_PYTORCH=1`` and puts a directory first on ``PATH`` whose ``python`` and
   ``python3`` run the building interpreter (``sys.executable``, with the environment pip gave
   it, so the build environment's torch is the one found) and whose ``maturin`` is the one
   installed with the imported maturin package (see ``_maturin_binary``);
2. builds in a Cargo target directory of its own per torch installation
   (``target/pep517/<hash of torch's path and version>``), unless ``CARGO_TARGET_DIR`` is set:
   torch-sys bakes torch's library path into its cached build output and does not rebuild when
   only ``PATH`` changes, so a shared target directory would link a later build against the
   torch of an earlier, possibly deleted, build environment. Target directories whose torch no
   longer exists are removed first;
3. uses the Cargo lock file for that torch (tch binds one torch per release): Cargo.lock for
   the default torch, ``build_backend/locks/torch-<X.Y>.Cargo.lock`` otherwise, and builds
   ``--locked``. A wheel for a non-default torch is built from a staging copy of the tree
   (``target/pep517/<key>/source``) with that lock as its Cargo.lock, so the checkout is never
   edited by a wheel build; an editable build swaps the lock in place for its duration;
4. stamps the wheel with the torch it was built against: ``Requires-Dist: torch`` becomes that
   minor release (``torch>=2.13.0,<2.14``; libtorch has no stable C++ ABI across minor
   releases, so a wheel works with exactly that one), and ``cast_rs/_build_info.py`` its
   version, which ``cast_rs`` reads before loading the extension to refuse a mismatched torch
   with a clear ``ImportError``. (The file is tracked in git with the default torch, since
   maturin leaves git-ignored files out of wheels; an editable build rewrites it in place,
   the checkout being what gets imported.)

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
            "[build-system] requires; with --no-build-isolation install torch first."
        )
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


def _build_info_text(version: str) -> str:
    return (
        '"""The torch the extension was compiled against: written by the build backend\n'
        '(build_backend/cast_rs_build.py). In git with the default torch."""\n'
        "\n"
        # Double quotes, as `ruff format` writes it: a rebuild leaves the checked-in file as it is.
        f'TORCH_VERSION = "{version.split("+")[0]}"\n'
    )


def supported() -> str:
    return ", ".join(f"{a}.{b}" for a, b in sorted(LOCKS))


def _lock(version: str) -> Path | None:
    """This torch's Cargo lock file (None: Cargo.lock, the default torch)."""
    if _minor(version) not in LOCKS:
        raise RuntimeError(
            f"cast-rs builds against torch {supported()}; the building interpreter has "
            f"torch {version}. Install one of those (or build with build isolation, "
            "which installs the torch pinned in pyproject.toml)."
        )
    return LOCKS[_minor(version)]


@contextmanager
def _lock_for(version: str) -> Iterator[None]:
    """Put this torch's lock file in place as Cargo.lock for an in-place build, and the
    default one back afterwards."""
    lock = _lock(version)
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


# What a staging copy of the source tree leaves out: build products and environments.
_NOT_SOURCE = shutil.ignore_patterns(
    "target", ".git", ".venv", "dist", "results", "__pycache__", "*.so", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints"
)


def _staging_copy(home: Path, lock: Path) -> Path:
    """A copy of the source tree under `home`, with `lock` as its Cargo.lock. Wheels for a
    non-default torch are built there, so a build never edits the checkout (which someone may
    be importing from meanwhile). copytree keeps modification times and the path is stable
    per torch, so Cargo's fingerprints still make the next build incremental."""
    staging = home / "source"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(ROOT, staging, ignore=_NOT_SOURCE, symlinks=True)
    (staging / "Cargo.lock").write_bytes(lock.read_bytes())
    return staging


def _maturin_binary() -> str:
    """The maturin executable installed with the maturin package this backend imported.

    maturin's backend runs ``maturin`` from ``PATH``. In a --no-build-isolation build from a
    virtualenv whose ``bin`` is not on ``PATH``, that can be another installation's, e.g. a
    pyenv shim, which prepends pyenv's directories to ``PATH``: cargo, and torch-sys's build
    script, then run pyenv's ``python3`` (no torch) instead of the shims above."""
    from importlib import metadata

    dist = metadata.distribution("maturin")
    for file in dist.files or ():
        if file.name == "maturin" and file.parent.name in ("bin", "Scripts"):
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    found = shutil.which("maturin")
    if found is None:
        raise RuntimeError("the maturin executable is missing: install maturin (a build requirement)")
    return found


@contextmanager
def _torch_build_env() -> Iterator[tuple[str, Path]]:
    """Environment for a build against the importable torch; yields (torch version, the
    directory this torch's build state lives in)."""
    torch_dir, version = _torch()
    _lock(version)  # an unsupported torch stops here, before any work
    saved = dict(os.environ)
    shims = tempfile.mkdtemp(prefix="cast_rs_python_")
    try:
        for name, target in (("python", sys.executable), ("python3", sys.executable), ("maturin", _maturin_binary())):
            shim = Path(shims) / name
            shim.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
            shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.environ["PATH"] = shims + os.pathsep + os.environ.get("PATH", "")
        os.environ["LIBTORCH_USE_PYTORCH"] = "1"
        # torch-sys accepts only the exact release its tch binds (2.9.0 for tch 0.22), but
        # patch releases keep libtorch's ABI: `_lock` has checked the minor release, so a
        # 2.9.1 builds with tch 0.22 too.
        os.environ["LIBTORCH_BYPASS_VERSION_CHECK"] = "1"
        # The lock file is the dependency pin: never re-resolve it during a build.
        os.environ["MATURIN_PEP517_ARGS"] = (os.environ.get("MATURIN_PEP517_ARGS", "") + " --locked").strip()
        home = _target_dir(torch_dir, version)
        if not os.environ.get("CARGO_TARGET_DIR"):
            os.environ["CARGO_TARGET_DIR"] = str(home)
        print(
            f"cast-rs: building against torch {version} at {torch_dir} (Cargo target directory {os.environ['CARGO_TARGET_DIR']})",
            flush=True,
        )
        yield version, home
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(shims, ignore_errors=True)


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _stamp_wheel(wheel: Path, version: str) -> None:
    """Make the wheel say which torch it was built against: its ``Requires-Dist: torch``
    becomes that minor release, and ``cast_rs/_build_info.py`` that version (RECORD updated)."""
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
        replaced = {metadata_name: metadata.encode()}
        if "cast_rs/_build_info.py" in names:  # an editable wheel points at the checkout instead
            replaced["cast_rs/_build_info.py"] = _build_info_text(version).encode()
        record_lines = []
        for line in src.read(record_name).decode().splitlines():
            name = line.rsplit(",", 2)[0]
            if name in replaced:
                line = f"{name},{_record_hash(replaced[name])},{len(replaced[name])}"
            record_lines.append(line)
        for info in src.infolist():
            if info.filename in replaced:
                dst.writestr(info, replaced[info.filename])
            elif info.filename == record_name:
                dst.writestr(info, ("\n".join(record_lines) + "\n").encode())
            else:
                dst.writestr(info, src.read(info.filename))
    tmp.replace(wheel)


def build_wheel(
    wheel_directory: str, config_settings: Mapping[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    wheel_directory = os.path.abspath(wheel_directory)
    with _torch_build_env() as (version, home):
        lock = _lock(version)
        source = ROOT if lock is None else _staging_copy(home, lock)
        with _cwd(source):
            name = maturin.build_wheel(wheel_directory, config_settings, None)
    _stamp_wheel(Path(wheel_directory) / name, version)
    return name


def build_editable(
    wheel_directory: str, config_settings: Mapping[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    """An editable install imports the checkout itself, so this builds in place: the torch's
    lock file is swapped in for the build, and _build_info.py keeps the torch it names."""
    with _torch_build_env() as (version, _home), _lock_for(version):
        text = _build_info_text(version)
        if not BUILD_INFO.is_file() or BUILD_INFO.read_text() != text:
            BUILD_INFO.write_text(text)
        name = maturin.build_editable(wheel_directory, config_settings, None)
    _stamp_wheel(Path(wheel_directory) / name, version)
    return name


def build_sdist(sdist_directory: str, config_settings: Mapping[str, Any] | None = None) -> str:
    return maturin.build_sdist(sdist_directory, config_settings)


get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_editable = maturin.get_requires_for_build_editable
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
# No prepare_metadata_for_build_*: the torch requirement is only known once the wheel is built
# against a torch, so frontends take the metadata from the wheel itself.
