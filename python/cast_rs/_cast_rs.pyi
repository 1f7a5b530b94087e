"""Type stubs of the Rust extension ``cast_rs._cast_rs`` (private: use the ``cast_rs`` API).

The kernels themselves are PyTorch operators, ``torch.ops.cast_rs.*`` (``csrc/``); this module
holds the exception type, the constants and the rules asked without a tensor (AdamS's scalar
hyperparameters, whether a shape holds an N:M pattern)."""

# pyo3 appends every name the module init adds to the module's __all__.
from typing import Dict, Sequence, Tuple

__all__ = [
    "OPERATORS",
    "CastError",
    "num_threads",
    "check_adams_hyper",
    "check_nm_shape",
    "nm_linear_kernels",
    "MAX_M",
    "ADAMS_HYPER",
    "__version__",
]

__version__: str
#: Largest supported group size M (the Rust core's ``nm::MAX_M``).
MAX_M: int
#: The names of AdamS's scalar hyperparameters in the order ``torch.ops.cast_rs.adams_step_``
#: takes them (its ``hyper`` list) and :func:`check_adams_hyper` checks them.
ADAMS_HYPER: Tuple[str, ...]
#: True: the C++ operators ``torch.ops.cast_rs.*`` (``csrc/``) are linked in and registered.
OPERATORS: bool

class CastError(Exception):
    """Errors from cast-rs that are neither ValueError nor TypeError (libtorch failures,
    internal errors)."""

# Every exception raised by this module and by the operators torch.ops.cast_rs.* in a Python
# process (CastError, and the ValueError / TypeError they raise) carries the failing argument
# as data:
#   param: Optional[str]        the argument ("grads", "lr"), None for errors about no argument
#   index: Optional[int]        the entry of a per-parameter list argument, else None
#   detail: str                 the message after "param: " ("{other}" marks the second buffer)
#   other_param, other_index    the second buffer of a "shares memory" error, else None

def num_threads() -> int: ...
def check_adams_hyper(values: Sequence[float]) -> None:
    """Raise (ValueError naming the hyperparameter) unless ``values``, in the order of
    :data:`ADAMS_HYPER`, are in the ranges AdamS's kernel takes."""

def check_nm_shape(shape: Sequence[int], n: int, m: int, dim: int) -> None:
    """Raise (ValueError naming ``shape``) unless a tensor of ``shape`` holds ``n:m`` groups along ``dim``."""

def nm_linear_kernels(n: int = 2, m: int = 4) -> Dict[str, str]:
    """The compressed N:M linear kernel each kind of call runs on this CPU, for layers whose
    inputs are a multiple of 32·M (``{call: kernel}``; AVX-512, AVX2 or portable, and
    ``vdpbf16ps`` for bfloat16 values with bfloat16 inputs where the CPU has AVX-512 BF16 and
    N is even, with AMX tiles from a few batch rows on for 2:4 where the CPU has AMX)."""
