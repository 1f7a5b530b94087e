"""Refuse, with a clear ImportError, a torch the extension was not compiled against.

The extension links libtorch's C++ API, which is not stable across minor releases: loaded under
another torch it fails with an undefined symbol at best and corrupts memory at worst. The build
backend (build_backend/cast_rs_build.py) records the torch it compiled against in
``_build_info.py``; this check runs before the extension is loaded.
"""

from __future__ import annotations

from typing import Optional


def _minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def _advice(built: str, installed: str) -> str:
    major, minor = _minor(built)
    return (
        f"Either install the torch it was built for (pip install 'torch>={major}.{minor},<{major}.{minor + 1}'), "
        f"or rebuild cast-rs against torch {installed}: from a checkout, "
        "`pip install --no-build-isolation .`; from PyPI, "
        "`pip install --no-build-isolation --no-binary cast-rs --force-reinstall --no-deps cast-rs` "
        "(needs a Rust toolchain; see the README's Install section for the torch versions a "
        "source build supports)."
    )


def check_torch(installed: str, built: Optional[str]) -> None:
    """Raise ImportError unless `installed` (torch.__version__) has the minor release `built`
    (the torch the extension was compiled against; None when unknown, e.g. a build that did
    not go through the backend, in which case loading the extension is the only check)."""
    if built is None:
        return
    if _minor(installed) != _minor(built):
        raise ImportError(
            f"cast-rs was built for torch {built}, but torch {installed} is installed. " + _advice(built, installed)
        )


def built_torch_version() -> Optional[str]:
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


def load_error(error: ImportError, installed: str) -> ImportError:
    """The ImportError to raise when the extension itself fails to load (an undefined symbol
    means it was compiled against another libtorch)."""
    if "undefined symbol" not in str(error):
        return error
    built = built_torch_version()
    return ImportError(
        f"cast-rs's extension does not load under torch {installed} ({error}); it was built "
        f"for torch {built or 'another torch version'}. " + _advice(built or installed, installed)
    )
