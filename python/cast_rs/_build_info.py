"""The torch the extension was compiled against: written by the build backend
(build_backend/cast_rs_build.py). In git with the default torch."""

TORCH_VERSION = "2.13.0"
