"""Read 2:4 checkpoints in compressed-tensors' ``sparse-24-bitmask`` format into
:class:`~cast_rs.NMLinear` layers for CPU decoding: :func:`load_compressed_tensors`, and write
one back: :func:`export_compressed_tensors`.

compressed-tensors (the format llm-compressor saves and vLLM reads) stored 2:4 models with its
``Sparse24BitMaskCompressor`` until release 0.13.0; later releases removed the sparse
compressors, so those checkpoints load nowhere else. The format, as that release writes it
(``compressed_tensors/compressors/sparse_compressors/sparse_24_bitmask.py`` and
``compressed_tensors/utils/helpers.py``), for each compressed layer ``<prefix>`` (an
``nn.Linear`` whose ``<prefix>.weight`` ``W`` is ``[rows, cols]``):

- ``<prefix>.compressed``: ``[rows, cols / 2]``, the weight's dtype: ``W[mask]`` in row-major
  order, so each row holds its groups' two kept values in increasing column order;
- ``<prefix>.bitmask``: ``uint8 [rows, ceil(cols / 8)]``: ``mask`` packed along each row with
  ``numpy.packbits(..., bitorder="little")`` (column ``8 b + j`` is bit ``j`` of byte ``b``);
- ``<prefix>.shape``: ``int64 [2, 1]``, ``[rows, cols]``.

``mask`` keeps exactly two of every four consecutive entries of each row (the two largest in
magnitude, ``topk``), zeros included, so every group has exactly two bits set. ``config.json``
describes it under ``quantization_config.sparsity_config``::

    {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
     "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": ..., ...}

Every other tensor (embeddings, norms, the layers in ``ignore``, biases) is stored as it is.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, contextmanager
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import torch
from torch import nn

from ._cast_rs import CastError
from .checking import count_violations
from .inference import NMLinear, compress, finish_compressed
from .layers import parameter_aliases

__all__ = ["load_compressed_tensors", "export_compressed_tensors"]

#: The compressed-tensors release whose format this module reads and writes (the last with the
#: sparse compressors).
FORMAT_RELEASE = "0.13.0"

_SPARSE_PARAMS = ("compressed", "bitmask", "shape")
_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_KEEP_DTYPES = (torch.float32, torch.bfloat16)
_READ_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- the NMLinear layout


def nm_buffers(values: torch.Tensor, positions: torch.Tensor, n: int, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values, index)`` buffers of an :class:`NMLinear` from the kept weights row by row:
    ``values[r, k * n + j]`` is the ``j``-th kept weight of group ``k`` of row ``r`` and
    ``positions[r, k * n + j]`` its column within the group (increasing with ``j``). The layout is
    the one ``torch.ops.cast_rs.nm_compress`` writes (``cast_rs.inference``'s module docstring):
    rows in blocks of 16 (padding rows: zero values at position 0), float32 values slot-major,
    bfloat16 values interleaved by pairs of slots, positions packed 2 bits each (4 for M > 4)."""
    rows, kept = values.shape
    blocks = -(-rows // 16)
    pad = blocks * 16 - rows
    v = torch.nn.functional.pad(values, (0, 0, 0, pad)).view(blocks, 16, kept)
    p = torch.nn.functional.pad(positions.to(torch.int64), (0, 0, 0, pad)).view(blocks, 16, kept)
    if values.dtype == torch.bfloat16:
        # Slots (2i, 2i + 1) lane by lane, so that one 32-bit word holds a lane's two values; an
        # odd last slot stays plain.
        paired = kept - kept % 2
        head = v[:, :, :paired].reshape(blocks, 16, paired // 2, 2).permute(0, 2, 1, 3).reshape(blocks, -1)
        tail = v[:, :, paired:].permute(0, 2, 1).reshape(blocks, -1)
        flat = torch.cat([head, tail], dim=1).reshape(-1)
    else:
        flat = v.permute(0, 2, 1).reshape(-1)
    bits = 2 if m <= 4 else 4
    lanes_per_word = 32 // bits
    shifts = torch.arange(lanes_per_word, dtype=torch.int64) * bits
    words = (p.permute(0, 2, 1).reshape(blocks, kept, 16 // lanes_per_word, lanes_per_word) << shifts).sum(-1)
    # The kernels read the words as u32; torch stores them as int32 (same bits).
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return flat.contiguous(), words.reshape(-1).contiguous()


def nm_slots(layer: NMLinear) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`nm_buffers`: ``(values, positions)``, each
    ``[out_features, kept]``, of a layer's stored slots (positions within their group)."""
    rows, n, m = layer.out_features, layer.n, layer.m
    kept = layer.in_features // m * n
    blocks = -(-rows // 16)
    v = layer.values
    if v.dtype == torch.bfloat16:
        paired = kept - kept % 2
        flat = v.view(blocks, kept * 16)
        head = flat[:, : paired * 16].reshape(blocks, paired // 2, 16, 2).permute(0, 2, 1, 3).reshape(blocks, 16, paired)
        tail = flat[:, paired * 16 :].reshape(blocks, kept - paired, 16).permute(0, 2, 1)
        values = torch.cat([head, tail], dim=2)
    else:
        values = v.view(blocks, kept, 16).permute(0, 2, 1)
    bits = 2 if m <= 4 else 4
    lanes_per_word = 32 // bits
    words = layer.index.to(torch.int64).view(blocks, kept, 16 // lanes_per_word, 1) & 0xFFFFFFFF
    shifts = torch.arange(lanes_per_word, dtype=torch.int64) * bits
    positions = ((words >> shifts) & ((1 << bits) - 1)).reshape(blocks, kept, 16).permute(0, 2, 1)
    return values.reshape(blocks * 16, kept)[:rows], positions.reshape(blocks * 16, kept)[:rows]


# ----------------------------------------------------------------------------- the checkpoint's config


def _describe(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def _quantization_config(config: Dict[str, Any], where: str) -> Tuple[str, Dict[str, Any]]:
    # compressed-tensors writes "quantization_config"; older releases (0.4.0 for one) wrote the
    # same entry as "compression_config".
    for key in ("quantization_config", "compression_config"):
        qc = config.get(key)
        if qc is not None:
            if not isinstance(qc, dict):
                raise CastError(f"{where}: {key}: expected an object, got {_describe(qc)}")
            return key, qc
    raise CastError(
        f"{where}: no quantization_config: this is not a compressed-tensors checkpoint (a dense Hugging Face "
        "checkpoint loads with from_pretrained; then cast_rs.compress(model))"
    )


def _refuse_quantization(qc: Dict[str, Any], key: str) -> None:
    """compressed-tensors treats whatever its config holds besides the sparsity and transform
    configs and the method/version fields as a quantization config; the ones that change the
    stored weights are refused by name."""
    if qc.get("quant_method", "compressed-tensors") != "compressed-tensors":
        raise CastError(f"{key}.quant_method: {qc['quant_method']!r} is not compressed-tensors; cast-rs reads only that method")
    groups = qc.get("config_groups")
    if groups:
        name, group = next(iter(groups.items()))
        weights = group.get("weights") if isinstance(group, dict) else None
        what = (
            f"{weights.get('type', '?')} {weights.get('num_bits', '?')}-bit weights"
            if isinstance(weights, dict)
            else "quantized activations"
        )
        fmt = (group.get("format") if isinstance(group, dict) else None) or qc.get("format")
        raise CastError(
            f"{key}.config_groups: {name!r} quantizes ({what}, format {fmt!r}); sparse and quantized checkpoints "
            "(marlin-24, int-quantized or float-quantized with sparsity) are not supported: cast-rs reads "
            "unquantized 2:4 checkpoints (sparse-24-bitmask or dense)"
        )
    fmt = qc.get("format")
    if fmt not in (None, "dense"):
        raise CastError(
            f"{key}.format: {fmt!r} is a quantized format; cast-rs reads unquantized 2:4 checkpoints (sparse-24-bitmask or dense)"
        )
    if qc.get("kv_cache_scheme"):
        raise CastError(f"{key}.kv_cache_scheme: {_describe(qc['kv_cache_scheme'])}: a quantized KV cache is not supported")
    if qc.get("transform_config"):
        raise CastError(
            f"{key}.transform_config: {_describe(qc['transform_config'])}: transforms (rotations applied to the "
            "weights and activations) are not supported"
        )


def _sparsity_format(qc: Dict[str, Any], key: str) -> str:
    """``"sparse-24-bitmask"`` or ``"dense"`` (with ``sparsity_structure`` 2:4); anything else
    is refused, naming the field and its value."""
    sc = qc.get("sparsity_config")
    if not sc:
        raise CastError(
            f"{key}.sparsity_config: {_describe(sc)}: the checkpoint records no sparsity (a quantized-only or dense "
            "model); cast-rs reads 2:4 checkpoints"
        )
    if not isinstance(sc, dict):
        raise CastError(f"{key}.sparsity_config: expected an object, got {_describe(sc)}")
    fmt = sc.get("format")
    structure = sc.get("sparsity_structure")
    if fmt == "sparse-bitmask":
        raise CastError(
            f"{key}.sparsity_config.format: 'sparse-bitmask' (unstructured sparsity: any number of zeros per "
            "group) is not supported; cast-rs reads 'sparse-24-bitmask' and 'dense' with sparsity_structure '2:4'"
        )
    if fmt not in ("sparse-24-bitmask", "dense"):
        raise CastError(
            f"{key}.sparsity_config.format: {fmt!r} is not supported; cast-rs reads 'sparse-24-bitmask' and 'dense' "
            "with sparsity_structure '2:4'"
        )
    if not isinstance(structure, str) or structure.lower() != "2:4":
        raise CastError(
            f"{key}.sparsity_config.sparsity_structure: {structure!r}, expected '2:4' (format {fmt!r}); "
            "other structures have no 2:4 layers to compress"
        )
    return fmt


# ----------------------------------------------------------------------------- the checkpoint's tensors


def _weight_files(directory: str) -> Dict[str, str]:
    """Tensor name -> file: from ``model.safetensors.index.json`` when there is one (sharded
    checkpoints), else from every ``*.safetensors`` file of the directory."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CastError(f"{index}: weight_map: expected an object naming each tensor's file, got {_describe(weight_map)}")
        files = {}
        for name, file in weight_map.items():
            path = os.path.join(directory, file)
            if not os.path.exists(path):
                raise CastError(f"{index}: weight_map[{name!r}]: the file {file!r} is not in {directory}")
            files[name] = path
        return files
    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not paths:
        raise CastError(f"path: no *.safetensors file in {directory} (compressed-tensors checkpoints are safetensors)")
    files = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name in files:
                    raise CastError(f"path: tensor {name!r} is in both {files[name]} and {path}")
                files[name] = path
    return files


class _Reader:
    """Tensors by name from their safetensors files, each file opened once."""

    def __init__(self, files: Dict[str, str], stack: ExitStack) -> None:
        self.files = files
        self.stack = stack
        self.handles: Dict[str, Any] = {}

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self.handles[path]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors code ("F32", "BF16", "F16", ...), from the header."""
        return str(self._handle(name).get_slice(name).get_dtype())


def _split_keys(files: Dict[str, str]) -> Tuple[Dict[str, Dict[str, str]], List[str]]:
    """``({prefix: {"compressed"|"bitmask"|"shape": name}}, dense names)``."""
    sparse: Dict[str, Dict[str, str]] = {}
    dense = []
    for name in files:
        prefix, _, leaf = name.rpartition(".")
        if leaf in _SPARSE_PARAMS and prefix:
            sparse.setdefault(prefix, {})[leaf] = name
        else:
            dense.append(name)
    return sparse, dense


# ----------------------------------------------------------------------------- one compressed layer


def _unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """``numpy.unpackbits(bitmask, axis=-1, count=cols, bitorder="little")`` as a bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def _read_layer(prefix: str, tensors: Dict[str, torch.Tensor], module: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values [rows, cols / 2], positions [rows, cols / 2])`` of one compressed layer, every
    tensor checked against the format and the model's layer."""
    if not isinstance(module, nn.Linear):
        raise CastError(
            f"layer {prefix!r}: the checkpoint holds it compressed but the model's module is a {type(module).__name__}; "
            "sparse-24-bitmask compresses nn.Linear weights (along their input dimension)"
        )
    shape = tensors["shape"]
    if shape.dtype.is_floating_point or shape.dtype == torch.bool or shape.numel() != 2:
        raise CastError(f"{prefix}.shape: expected 2 integers [rows, cols], got {shape.dtype} {tuple(shape.shape)}")
    rows, cols = (int(v) for v in shape.reshape(-1).tolist())
    want = (module.out_features, module.in_features)
    if (rows, cols) != want:
        raise CastError(
            f"{prefix}.shape: the checkpoint's weight is {rows}x{cols}, the model's layer is {want[0]}x{want[1]} (out x in)"
        )
    if cols % 4:
        raise CastError(f"{prefix}.shape: {cols} columns are not a multiple of 4 (2:4 groups run along each row)")
    compressed, bitmask = tensors["compressed"], tensors["bitmask"]
    if compressed.dtype not in _READ_DTYPES:
        raise CastError(
            f"{prefix}.compressed: values of dtype {compressed.dtype} (quantized?) are not supported; expected "
            "float32, bfloat16 or float16"
        )
    if tuple(compressed.shape) != (rows, cols // 2):
        raise CastError(
            f"{prefix}.compressed: shape {tuple(compressed.shape)}, expected {(rows, cols // 2)} for a {rows}x{cols} 2:4 weight"
        )
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise CastError(
            f"{prefix}.bitmask: {bitmask.dtype} {tuple(bitmask.shape)}, expected torch.uint8 {(rows, -(-cols // 8))} "
            f"(one bit per weight of a {rows}x{cols} weight)"
        )
    mask = _unpack_bitmask(bitmask, cols)
    per_group = mask.view(rows, cols // 4, 4).sum(-1)
    bad = (per_group != 2).nonzero()
    if len(bad):
        r, g = (int(v) for v in bad[0])
        raise CastError(
            f"{prefix}.bitmask: row {r}, group {g} (columns {4 * g}..{4 * g + 4}) has {int(per_group[r, g])} bits set; "
            "sparse-24-bitmask keeps exactly 2 of every 4"
        )
    # Row-major order of the set bits is the order of the values: per row, group by group,
    # increasing column within a group.
    columns = torch.arange(cols).expand(rows, cols)[mask].view(rows, cols // 2)
    return compressed, columns % 4


def _build_layer(
    prefix: str, tensors: Dict[str, torch.Tensor], module: nn.Module, bias: Optional[torch.Tensor], dtype: torch.dtype
) -> NMLinear:
    values, positions = _read_layer(prefix, tensors, module)
    if (bias is not None) != (module.bias is not None):
        raise CastError(
            f"{prefix}.bias: the checkpoint {'holds' if bias is not None else 'lacks'} one, the model's layer "
            f"{'has' if module.bias is not None else 'has none'}"
        )
    if bias is not None and tuple(bias.shape) != (module.out_features,):
        raise CastError(f"{prefix}.bias: shape {tuple(bias.shape)}, expected {(module.out_features,)}")
    # The bias is created on the CPU, whatever the default device is (a model built on meta).
    with torch.device("cpu"):
        layer = NMLinear(module.in_features, module.out_features, bias=bias is not None, pattern=(2, 4), dtype=dtype)
    flat, index = nm_buffers(values.to(dtype), positions, 2, 4)
    with torch.no_grad():
        layer.values.copy_(flat)
        layer.index.copy_(index)
        if bias is not None:
            layer.bias.copy_(bias.float())
    return layer


# ----------------------------------------------------------------------------- the model


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, and their
    random initialisation costs nothing) and their buffers as usual: non-persistent buffers
    that the checkpoint does not hold (rotary frequencies) are computed at construction and must
    be real. ``torch.empty`` allocates a parameter untouched before it moves, so no dense weight
    is ever written."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _skeleton(directory: str) -> nn.Module:
    """The Hugging Face model of ``config.json`` (``architectures[0]``), parameters on meta."""
    try:
        import transformers
    except ImportError as error:
        raise CastError(
            "model: building the model from config.json needs transformers (pip install transformers), or pass model="
        ) from error
    config = transformers.AutoConfig.from_pretrained(directory)
    # The skeleton is a plain model; the compressed layers are put in by this module, not by
    # transformers' quantizer.
    for key in ("quantization_config", "compression_config"):
        if hasattr(config, key):
            delattr(config, key)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CastError(
            f"config.json: architectures: {names!r} names no transformers model class; build the model yourself and "
            "pass it as model="
        )
    with _parameters_on_meta():
        model = cls(config)
    return model


def _persistent_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in model.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


def _non_persistent_buffers(model: nn.Module) -> Set[str]:
    out = set()
    for mod_name, mod in model.named_modules():
        for name in mod._non_persistent_buffers_set:
            out.add(f"{mod_name}.{name}" if mod_name else name)
    return out


def _plan_dense(model: nn.Module, dense: Dict[str, torch.Tensor], replaced: Set[str]) -> Dict[str, torch.Tensor]:
    """Check every dense tensor against the model (name and shape) and every parameter of the
    model against the checkpoint (nothing may stay on meta or keep a value the checkpoint does
    not set); returns the tensors to put in, by name. Reads only."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = _persistent_buffers(model)
    targets = {**params, **buffers}
    ignored = _non_persistent_buffers(model)
    unexpected = [name for name in dense if name not in targets and name not in ignored]
    if unexpected:
        raise CastError(
            f"checkpoint: {len(unexpected)} tensors name nothing in the model, e.g. {unexpected[:3]} "
            "(a checkpoint of another architecture?)"
        )
    for name, tensor in dense.items():
        if name in targets and tuple(tensor.shape) != tuple(targets[name].shape):
            raise CastError(f"{name}: the checkpoint's shape is {tuple(tensor.shape)}, the model's {tuple(targets[name].shape)}")
    aliases = parameter_aliases(model)
    missing = []
    for name in params:
        layer = name.rpartition(".")[0]
        if layer in replaced:
            continue
        if not any(alias in dense for alias in aliases[name]):
            missing.append(name)
    for name, buf in model.named_buffers():
        if name not in dense and name.rpartition(".")[0] not in replaced and buf.device.type == "meta":
            missing.append(name)  # (a non-persistent buffer of a model built on meta, e.g.)
    if missing:
        raise CastError(f"checkpoint: {len(missing)} tensors of the model are not in it, e.g. {missing[:3]}")
    for name in params:
        if name.rpartition(".")[0] in replaced and len(aliases[name]) > 1:
            raise CastError(
                f"{name}: a compressed layer's weight is tied to {[a for a in aliases[name] if a != name]}; a tied "
                "weight cannot be stored compressed"
            )
    return {name: tensor for name, tensor in dense.items() if name in targets}


def _put_dense(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Put the tensors in as the model's parameters and buffers (tied names get one shared
    parameter). Every name was checked by :func:`_plan_dense`."""
    aliases = parameter_aliases(model)
    modules = dict(model.named_modules())
    done: Set[str] = set()
    for name, tensor in tensors.items():
        if name in done:
            continue
        owner, _, leaf = name.rpartition(".")
        mod = modules[owner]
        if leaf in mod._parameters:
            param = nn.Parameter(tensor, requires_grad=False)
            for alias in aliases[name]:
                a_owner, _, a_leaf = alias.rpartition(".")
                modules[a_owner]._parameters[a_leaf] = param
                done.add(alias)
        else:
            mod._buffers[leaf] = tensor
            done.add(name)


def _target_dtype(dtype: Optional[torch.dtype], found: Set[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype every floating tensor is converted to (None: kept as stored)."""
    if dtype is not None:
        if dtype not in _KEEP_DTYPES:
            raise CastError(f"dtype: expected torch.float32 or torch.bfloat16 (the compressed kernels' values), got {dtype}")
        return dtype
    if torch.float16 in found:
        raise CastError(
            "dtype: the checkpoint is float16, which the compressed kernels do not run (their activations are float32 "
            "or bfloat16); pass dtype=torch.bfloat16 (same size, 3 fewer mantissa bits) or dtype=torch.float32 (exact, "
            "twice the size) to convert it"
        )
    odd = sorted(str(d) for d in found if d not in _KEEP_DTYPES)
    if odd:
        raise CastError(
            f"dtype: the checkpoint holds {odd[0]} tensors; pass dtype=torch.float32 or torch.bfloat16 to convert them"
        )
    return None


def load_compressed_tensors(
    path: _PathLike,
    model: Optional[nn.Module] = None,
    *,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Load a compressed-tensors 2:4 checkpoint (``sparse-24-bitmask``, or ``dense`` with
    ``sparsity_structure`` 2:4) as a model whose 2:4 layers are :class:`~cast_rs.NMLinear`, for
    CPU decoding.

    Args:
        path: the checkpoint's directory: ``config.json`` and ``*.safetensors`` (sharded with
            ``model.safetensors.index.json`` or not), as llm-compressor's ``save_pretrained``
            writes it. Nothing is downloaded: fetch a Hub checkpoint first
            (``huggingface_hub.snapshot_download``).
        model: the model to load into (its parameter names must be the checkpoint's; its
            parameters may be on the meta device). ``None``: the Hugging Face model of
            ``config.json``'s ``architectures`` is built with transformers, its parameters on
            the meta device (no dense weight is allocated for any layer).
        dtype: ``torch.float32`` or ``torch.bfloat16``: every floating tensor of the checkpoint
            is converted to it (the compressed values included). ``None`` keeps the stored
            dtype, which must be float32 or bfloat16: a float16 checkpoint is refused (the
            kernels take float32 or bfloat16 activations; pass ``dtype``).

    Each compressed layer becomes an :class:`~cast_rs.NMLinear` straight from its stored values
    and bitmask (never through a dense weight), computing exactly what the dense-with-zeros
    weight computes up to the order of float32 sums; the other tensors (embeddings, norms, the
    ``ignore``-d layers such as ``lm_head``) are put in as stored. A ``dense`` checkpoint holds
    the 2:4 weights with their zeros: it is loaded whole, then :func:`~cast_rs.compress`
    converts every exactly 2:4 ``nn.Linear``.

    Everything is read and checked before the model is touched: on any error a given ``model``
    is left as it was.

    Returns:
        The model, in eval mode (inference only: :class:`~cast_rs.NMLinear` has no backward).

    Raises:
        CastError: naming the field or tensor and its value: a checkpoint that is quantized as
            well as sparse (``quantization_config.config_groups``, formats such as
            ``marlin-24``), another sparsity format (``sparse-bitmask``) or structure, a
            quantized KV cache or transforms, a tensor missing or of the wrong shape or dtype, a
            bitmask group without exactly 2 bits set, a checkpoint that does not fit the model.

    Example::

        import cast_rs
        from huggingface_hub import snapshot_download
        from transformers import AutoTokenizer
        path = snapshot_download("RedHatAI/Sparse-Llama-3.1-8B-2of4")    # cast-rs never downloads
        model = cast_rs.load_compressed_tensors(path)                    # bfloat16 NMLinear layers
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    """
    directory = os.fspath(path)
    key, fmt = _read_config(directory)
    files = _weight_files(directory)
    sparse, dense_names = _split_keys(files)
    _check_names(files, sparse, key, fmt)
    built = model is None
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        dense = {name: reader.get(name) for name in dense_names}
        target = _target_dtype(dtype, _stored_dtypes(reader, dense, sparse))
        if target is not None:
            dense = {k: (v.to(target) if v.dtype.is_floating_point else v) for k, v in dense.items()}
        if model is None:
            model = _skeleton(directory)
        modules = dict(model.named_modules())
        for prefix in sparse:
            if prefix not in modules:
                raise CastError(f"layer {prefix!r}: the checkpoint holds it compressed, the model has no module of that name")
        biases = {prefix: dense.pop(prefix + ".bias", None) for prefix in sparse}
        plan = _plan_dense(model, dense, set(sparse))
        if fmt == "dense":
            _check_dense_is_24(model, plan)
        # One layer at a time: its compressed tensors are read, converted and dropped.
        layers = {}
        for prefix, parts in sparse.items():
            tensors = {leaf: reader.get(name) for leaf, name in parts.items()}
            values_dtype = target or tensors["compressed"].dtype
            layers[prefix] = _build_layer(prefix, tensors, modules[prefix], biases[prefix], values_dtype)

    # Everything is read and checked: from here on nothing fails.
    for prefix, layer in layers.items():
        parent, _, child = prefix.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer)
    _put_dense(model, plan)
    if fmt == "dense":
        compress(model, "2:4")
    else:
        finish_compressed(model)  # as compress does: the checkpoint record and the load checks
    model.eval()
    if built and hasattr(model, "generation_config"):
        _load_generation_config(model, directory)
    return model


def _read_config(directory: str) -> Tuple[str, str]:
    """``(the config entry's name, the sparsity format)`` of a checkpoint directory, refusing
    what is not supported."""
    if not os.path.isdir(directory):
        raise CastError(f"path: {directory!r} is not a directory (expected a checkpoint's directory with config.json)")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CastError(f"path: no config.json in {directory}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    key, qc = _quantization_config(config, "config.json")
    _refuse_quantization(qc, key)
    fmt = _sparsity_format(qc, key)
    try:
        import safetensors  # noqa: F401
    except ImportError as error:
        raise CastError("path: reading the checkpoint needs safetensors (pip install safetensors)") from error
    return key, fmt


def _check_names(files: Dict[str, str], sparse: Dict[str, Dict[str, str]], key: str, fmt: str) -> None:
    """The tensor names agree with the format: every compressed layer complete, and alone."""
    if fmt == "dense" and sparse:
        raise CastError(
            f"{key}.sparsity_config.format: 'dense', but the checkpoint holds compressed tensors, e.g. {next(iter(sparse))!r}"
        )
    if fmt == "sparse-24-bitmask" and not sparse:
        raise CastError(f"{key}.sparsity_config.format: 'sparse-24-bitmask', but the checkpoint holds no compressed layer")
    for prefix, parts in sparse.items():
        absent = [p for p in _SPARSE_PARAMS if p not in parts]
        if absent:
            raise CastError(f"layer {prefix!r}: the checkpoint holds {sorted(parts)} but not {absent} (a truncated checkpoint?)")
        if prefix + ".weight" in files:
            raise CastError(f"layer {prefix!r}: the checkpoint holds both a dense weight and a compressed one")


def _stored_dtypes(reader: _Reader, dense: Dict[str, torch.Tensor], sparse: Dict[str, Dict[str, str]]) -> Set[torch.dtype]:
    """The floating dtypes of the checkpoint. The compressed values are read layer by layer
    later (never all at once): their dtype comes from the files' headers."""
    found = {t.dtype for t in dense.values() if t.dtype.is_floating_point}
    for parts in sparse.values():
        code = reader.dtype(parts["compressed"])
        if code not in _SAFETENSORS_FLOATS:
            raise CastError(
                f"{parts['compressed']}: values stored as {code} (quantized?) are not supported; expected float32, "
                "bfloat16 or float16"
            )
        found.add(_SAFETENSORS_FLOATS[code])
    return found


def _check_dense_is_24(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """A ``dense`` checkpoint must hold at least one exactly 2:4 ``nn.Linear`` weight (checked
    before the model is touched, so that :func:`compress` cannot refuse it after)."""
    modules = dict(model.named_modules())
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        mod = modules.get(owner)
        if leaf == "weight" and owner and isinstance(mod, nn.Linear) and tensor.shape[-1] % 4 == 0:
            if not count_violations(tensor, 2, 4, -1)[0]:
                return
    raise CastError(
        "sparsity_config: format 'dense' with sparsity_structure '2:4', but no nn.Linear weight of the checkpoint is "
        "exactly 2:4 (at most 2 nonzeros in every 4)"
    )


def _load_generation_config(model: nn.Module, directory: str) -> None:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return
    import transformers

    model.generation_config = transformers.GenerationConfig.from_pretrained(directory)


# ----------------------------------------------------------------------------- export


def export_compressed_tensors(model: nn.Module, directory: _PathLike) -> List[str]:
    """Write a model whose 2:4 layers are :class:`~cast_rs.NMLinear` (after
    :func:`~cast_rs.compress` or :func:`load_compressed_tensors`) as a compressed-tensors
    ``sparse-24-bitmask`` checkpoint: ``model.safetensors`` and ``config.json`` (the model's
    Hugging Face config, when it has one, with ``quantization_config.sparsity_config``). Each
    NMLinear's stored slots become ``<prefix>.compressed`` / ``.bitmask`` / ``.shape`` exactly
    as compressed-tensors 0.13.0 writes them; every other tensor is written as it is. Returns the
    names of the compressed layers.

    Only 2:4 layers are written compressed (the format has no other pattern); a model with an
    NMLinear of another pattern, or with int8 values, is refused with a ``CastError``, as is one
    without any.
    """
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, NMLinear)}
    if not layers:
        raise CastError("model: no NMLinear layer to write compressed (cast_rs.compress(model) first)")
    for name, layer in layers.items():
        if (layer.n, layer.m) != (2, 4):
            raise CastError(f"layer {name!r}: pattern {layer.n}:{layer.m}; sparse-24-bitmask stores 2:4 only")
        if layer.values.dtype == torch.int8:
            # The format's int8 weights need a quantization config of compressed-tensors' own,
            # which cast-rs does not write.
            raise CastError(
                f"layer {name!r}: int8 values; sparse-24-bitmask here holds float32 or bfloat16 weights (compress the "
                "model with dtype=torch.float32 or torch.bfloat16 to export it)"
            )
    tensors: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        values, positions = nm_slots(layer)
        rows, cols = layer.out_features, layer.in_features
        columns = positions + torch.arange(0, cols, 4).repeat_interleave(2)
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        mask.scatter_(1, columns, True)
        tensors[f"{name}.compressed"] = values.contiguous()
        tensors[f"{name}.bitmask"] = _pack_bitmask(mask)
        tensors[f"{name}.shape"] = torch.tensor([rows, cols]).reshape(-1, 1)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().clone()
    seen: Dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers:
            continue
        if id(tensor) in seen:  # a tied weight is stored once, under its first name
            continue
        seen[id(tensor)] = name
        tensors[name] = tensor.detach().contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config_obj = getattr(model, "config", None)
    config = config_obj.to_dict() if hasattr(config_obj, "to_dict") else {}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": FORMAT_RELEASE,
        "sparsity_config": {
            "format": "sparse-24-bitmask",
            "sparsity_structure": "2:4",
            "targets": sorted(layers),
            "ignore": [],
            "global_sparsity": 0.5,
            "registry_requires_subclass": False,
        },
        "transform_config": {},
    }
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
    return sorted(layers)


def _pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """``numpy.packbits(mask, axis=-1, bitorder="little")``: ``uint8 [rows, ceil(cols / 8)]``."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % 8)).view(rows, -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (padded * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
