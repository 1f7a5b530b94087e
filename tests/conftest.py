import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import cast_rs  # noqa: E402


@pytest.fixture(params=["fast", "generic"])
def kernel_path(request):
    """Run a test on the CPU fast path and again with the generic (tensor-op) path forced."""
    with cast_rs.force_generic_path(request.param == "generic"):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
