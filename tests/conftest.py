import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import cast_rs  # noqa: E402

try:  # the property tests (tests/test_hostile.py): the same examples on every run and machine
    from hypothesis import settings

    # "ci" (the default): derandomized and without the local example database, so a clean
    # clone runs exactly the examples this machine ran; `pytest --hypothesis-profile=explore`
    # searches with fresh random examples (and replays the failures it saved).
    settings.register_profile("ci", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


@pytest.fixture(params=["fast", "generic"])
def kernel_path(request):
    """Run a test on the CPU fast path and again with the generic (tensor-op) path forced."""
    with cast_rs.force_generic_path(request.param == "generic"):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
