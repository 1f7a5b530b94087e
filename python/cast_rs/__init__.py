"""cast-rs: CAST (Continuous Adaptive Sparse Trainer) for PyTorch, with a Rust core.

Turn a dense model into an N:M (2:4) semi-structured sparse one inside your own training loop::

    import copy, cast_rs
    teacher = copy.deepcopy(model).eval()
    sparse = cast_rs.sparsify(model, pattern="2:4")
    optimizer = cast_rs.AdamS(model.parameters(), lr=2e-4, total_steps=T)
    ...  loss = cast_rs.distill_loss(model(x), teacher(x), labels)  ...
    report = sparse.finalize()              # exact 2:4 weights, scaling folded in
    assert cast_rs.check_nm(model, "2:4").ok

See ``cast_rs.AdamS`` for the algorithm and ``cast_rs.nm_mask`` for the N:M rule.
"""

# libtorch must be loaded (by importing torch) before the extension that links against it.
import torch  # noqa: F401

from ._torch_compat import built_torch_version, check_torch, load_error

check_torch(torch.__version__, built_torch_version())
try:
    from . import _cast_rs
except ImportError as error:
    raise load_error(error, torch.__version__) from error
from ._cast_rs import CastError
from ._config import force_generic_path, generic_path_forced
from .nm import nm_mask, nm_mask_packed, parse_pattern, unpack_mask
from .optim import DEFAULT_L1_DECAY, AdamS
from .distill import distill_loss
from .scaling import WeightScale, scale_weight
from ._mask_guard import MaskGuard
from .sparsity import SparseModel, find_layers, sparsify
from .checking import NMReport, check_nm, keep_nm
from .export import export_semi_structured, plain_state_dict
from . import baselines
from .inference import CompressReport, NMLinear, compress
from .checkpoint import load_compressed, save_compressed, install_transformers_hook as _install_transformers_hook
from .lora import check_lora, load_lora, lora, lora_config, merge_lora, reproject
from .compressed_tensors import export_compressed_tensors, load_compressed_tensors

__version__: str = _cast_rs.__version__

_install_transformers_hook()

__all__ = [
    "AdamS",
    "CompressReport",
    "NMLinear",
    "compress",
    "load_compressed",
    "save_compressed",
    "MaskGuard",
    "NMReport",
    "SparseModel",
    "WeightScale",
    "baselines",
    "check_nm",
    "distill_loss",
    "export_semi_structured",
    "find_layers",
    "keep_nm",
    "plain_state_dict",
    "scale_weight",
    "sparsify",
    "CastError",
    "DEFAULT_L1_DECAY",
    "force_generic_path",
    "generic_path_forced",
    "nm_mask",
    "nm_mask_packed",
    "parse_pattern",
    "unpack_mask",
    "check_lora",
    "load_lora",
    "lora",
    "lora_config",
    "merge_lora",
    "reproject",
    "export_compressed_tensors",
    "load_compressed_tensors",
    "__version__",
]
