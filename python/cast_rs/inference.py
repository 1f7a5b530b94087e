"""CPU inference with compressed N:M weights: :class:`NMLinear` and :func:`compress`.

A finalized N:M model computes exactly like a dense one and is as large. :func:`compress`
swaps its N:M ``nn.Linear`` (and Hugging Face ``Conv1D``) layers for :class:`NMLinear`, which
stores only the kept weights and their positions (2:4 in float32: 2.125 bytes per dense
weight instead of 4; bfloat16: 1.125 instead of 2; int8 with a float32 scale per output row:
0.625 + 4 / in_features) and multiplies with Rust kernels that read
that format directly (AVX-512 / AVX2, on torch's threads). Token-by-token decoding reads every
weight once per token, so it is memory-bound and the smaller weights are faster to read.

The layout (``src/nm_linear/``): output rows in blocks of 16; for each block and kept slot
(group ``k``, ``j``-th kept weight) the 16 rows' values are contiguous (``values``), and their
positions in the group are packed 2 bits each (4 for M > 4) into ``index`` (int32 words)::

    values[(block * kept + k * N + j) * 16 + lane] = W[16 * block + lane, M * k + pos]    # float32

bfloat16 values interleave each pair of slots ``(2i, 2i + 1)`` of a block lane by lane, so that one
32-bit word holds a lane's two values (the kernel widens both with a shift and a mask)::

    values[(block * kept + 2i) * 16 + 2 * lane + (t % 2)]  for slot t in {2i, 2i + 1}

(an odd last slot of a block stays plain). int8 values take the float32 order, one byte each,
with one float32 scale per output row (``scales``): symmetric per-row quantization of the kept
weights, ``scale_r = max |W[r]| / 127`` (1 for a row whose scale would be 0: all its weights
zero), ``q = round_half_even(W / scale_r)`` in [-127, 127]; the kernels sum ``q · x`` in float32
and multiply each output by its row's scale once (``y = scale_r · Σ q·x + b``).

Inference only: ``nm_linear`` has no backward (use the dense model to train).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _memory
from ._record import dtype_name, is_hf_model, make_record, set_record
from ._registrations import layout_sizes
from .checking import count_violations
from .nm import format_pattern, parse_pattern
from .layers import layer_kind

__all__ = ["NMLinear", "CompressReport", "compress"]

_nm_linear_op = torch.ops.cast_rs.nm_linear


class NMLinear(nn.Module):
    r"""``y = x Wᵀ + b`` with an N:M weight ``W`` (``[out_features, in_features]``) stored
    compressed: the drop-in inference replacement of an N:M ``nn.Linear``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: whether the layer has a bias (float32).
        pattern: ``"N:M"`` or ``(N, M)`` with ``1 <= N < M <= 8`` (groups of M along the
            input dimension).
        dtype: of the stored values, ``torch.float32``, ``torch.bfloat16`` or ``torch.int8``
            (with a float32 ``scales`` buffer, one per output row: the weight is
            ``values · scales[row]``). The input may be float32 or bfloat16 (products and sums
            are float32); the output has the input's dtype.

    A new layer holds zeros (int8: unit scales); :meth:`from_dense` converts an ``nn.Linear``
    and ``load_state_dict`` fills one from a saved ``state_dict`` (buffers ``values``,
    ``index``, ``scales`` for int8, the ``bias`` and ``_extra_state``: the layout, ``[format
    version, in_features, out_features, N, M, values dtype]`` as an int64 tensor), so a model
    can be rebuilt and loaded without any dense weight.

    Loading checks the entries before it copies anything into the layer: the recorded layout
    must be this layer's (shape and pattern), the values' dtype this layer's (a float32
    checkpoint is refused by a bfloat16 layer and the reverse, never reinterpreted: build the
    layer with the checkpoint's ``dtype``), the buffers' lengths the layout's, and every stored
    position below M. An error names the layer and both values. :func:`compress` also checks
    every compressed layer of the model before any of them is loaded, so a failed
    ``model.load_state_dict`` leaves the whole model as it was.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        pattern: Union[str, Tuple[int, int]] = "2:4",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if dtype not in self._DTYPE_CODES:
            raise TypeError(f"dtype: expected torch.float32, torch.bfloat16 or torch.int8, got {dtype}")
        n, m = parse_pattern(pattern)
        values_len, index_len = layout_sizes(out_features, in_features, n, m)
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        # In 2 MiB pages where Linux allows (_memory: decoding streams these buffers, and 4 KiB
        # pages cost a TLB miss every 4 KiB of that stream); every way of filling a layer
        # (from_dense, load_state_dict, from_pretrained) copies into them.
        self.register_buffer("values", _memory.zeros(values_len, dtype))
        self.register_buffer("index", _memory.zeros(index_len, torch.int32))
        # int8 only (float values hold their scale): float32 whatever the default dtype, as the
        # bias below.
        self.scales: Optional[torch.Tensor]
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32) if dtype == torch.int8 else None)
        if bias:
            # float32 whatever the default dtype (a from_pretrained skeleton is built under the
            # checkpoint's dtype): the kernels add a float32 bias.
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_features, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._register_load_state_dict_pre_hook(NMLinear._check_entries, with_module=True)

    #: Version of the layout recorded in ``_extra_state`` (bump when the layout changes).
    LAYOUT_VERSION = 1
    _DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}

    def get_extra_state(self) -> torch.Tensor:
        """The layout as saved with the buffers (an int64 tensor, so safetensors can hold it)."""
        code = self._DTYPE_CODES[self.values.dtype]
        return torch.tensor([self.LAYOUT_VERSION, self.in_features, self.out_features, self.n, self.m, code], dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        # load_state_dict checked it (with everything else) before copying anything
        # (_check_entries); loaders that set entries one by one (transformers' from_pretrained)
        # skip that hook, so the layout is kept for cast_rs.checkpoint to compare after loading.
        self._loaded_layout = [int(v) for v in state.reshape(-1).tolist()] if isinstance(state, torch.Tensor) else state

    def check_loaded_layout(self, name: str) -> None:
        """Raise ``ValueError`` naming the layer unless the layout a loader passed to
        :meth:`set_extra_state` is this layer's (its shape, pattern and values dtype)."""
        got = getattr(self, "_loaded_layout", None)
        want = [int(v) for v in self.get_extra_state().tolist()]
        if got is None:
            raise ValueError(f"NMLinear {name!r}: the checkpoint has no layout record ({name}._extra_state) for it")
        if got != want:
            raise ValueError(
                f"NMLinear {name!r}: the checkpoint's layout [version, in, out, N, M, dtype code] is {got}, this "
                f"layer's is {want} (the file does not hold this model's layer)"
            )

    def _check_entries(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        check_nm_linear_entries(self, state_dict, prefix)

    @classmethod
    def from_dense(
        cls, linear: nn.Module, pattern: Union[str, Tuple[int, int]] = "2:4", dtype: Optional[torch.dtype] = None
    ) -> "NMLinear":
        """An :class:`NMLinear` computing what ``linear`` computes. ``linear`` is an
        ``nn.Linear`` or a Hugging Face ``Conv1D`` whose weight is exactly N:M along its input
        dimension (at most N nonzeros per group: finalize the model first); ``dtype`` defaults
        to the weight's (float32 or bfloat16); ``torch.int8`` quantizes the kept weights per
        output row (the module docstring; then the layer computes with the dequantized weight,
        :meth:`dense_weight`). Raises ``ValueError`` naming the first group that is not N:M
        (or, for int8, a weight that is not finite)."""
        kind = layer_kind(linear)
        if kind is None:
            raise TypeError(f"linear: expected an nn.Linear or a Hugging Face Conv1D, got {type(linear).__name__}")
        n, m = parse_pattern(pattern)
        w = linear.weight.detach()
        if kind[0] == "Conv1D":  # stored [in, out]: x @ W + b
            w = w.t()
        if w.device.type != "cpu":
            raise ValueError(f"linear: NMLinear runs on the CPU; the weight is on {w.device} (move the model to the CPU)")
        _refuse_half(w.dtype, "linear")
        dtype = dtype or (w.dtype if w.dtype in (torch.float32, torch.bfloat16) else torch.float32)
        out_features, in_features = w.shape
        layer = cls(in_features, out_features, bias=linear.bias is not None, pattern=(n, m), dtype=dtype)
        if dtype == torch.int8:
            values, index, scales = torch.ops.cast_rs.nm_compress_int8(w.contiguous(), n, m)
        else:
            values, index = torch.ops.cast_rs.nm_compress(w.to(dtype).contiguous(), n, m)
        with torch.no_grad():
            layer.values.copy_(values)
            layer.index.copy_(index)
            if dtype == torch.int8:
                layer.scales.copy_(scales)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    def _apply(self, fn: Any, recurse: bool = True) -> "NMLinear":
        # model.to(dtype) / .float() / .bfloat16() convert buffers element by element, but the
        # float32 and bfloat16 layouts order the values differently: converting in place would
        # give a layer that silently computes something else. A dtype change re-lays the weight
        # out instead (through one dense copy of this layer), and the bias stays float32.
        if self.values.dtype == torch.int8:
            return self._apply_int8(fn, recurse)
        old = self.values.dtype
        new = fn(torch.empty(0, dtype=old)).dtype
        if new == old:
            return super()._apply(fn, recurse)
        if new not in (torch.float32, torch.bfloat16):
            raise TypeError(
                f"NMLinear: cannot convert its values to {new}; the compressed kernels hold float32, bfloat16 or int8 "
                "(convert the model before cast_rs.compress, or to torch.bfloat16 / torch.float32)"
            )
        dense = self.dense_weight()
        super()._apply(fn, recurse)
        values, index = torch.ops.cast_rs.nm_compress(fn(dense).contiguous(), self.n, self.m)
        # The new buffers in the pages __init__ gives them.
        self._buffers["values"] = _memory.copy_of(values)
        self._buffers["index"] = _memory.copy_of(index.to(self.index.device))
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = nn.Parameter(self.bias.detach().float(), requires_grad=False)
        return self

    def _apply_int8(self, fn: Any, recurse: bool) -> "NMLinear":
        # An int8 layer's values, positions and scales are its encoding, not weights in the
        # model's dtype: model.to(torch.bfloat16) leaves them as they are (bit for bit; the layer
        # then takes bfloat16 activations and returns bfloat16). The bias is treated as in the
        # float layers: converted with the model, kept as float32. float16 (or float64)
        # activations are refused, as for the float layers.
        new = fn(torch.empty(0, dtype=torch.float32)).dtype
        if new not in (torch.float32, torch.bfloat16):
            raise TypeError(
                f"NMLinear: cannot run with {new} activations; an int8 layer takes float32 or bfloat16 ones (its "
                "values stay int8): convert the model to torch.bfloat16 or torch.float32"
            )
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales is not None and self.scales.dtype != torch.float32:
            self._buffers["scales"] = scales.to(self.scales.device)
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = nn.Parameter(self.bias.detach().float(), requires_grad=False)
        return self

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The buffers straight from their dicts: through nn.Module.__getattr__ the four
        # lookups cost about as much as the operator's own dispatch (a decoding step calls
        # every layer once per token).
        buffers = self._buffers
        return _nm_linear_op(
            input,
            buffers["values"],
            buffers["index"],
            self._parameters["bias"],
            self.out_features,
            self.in_features,
            self.n,
            self.m,
            buffers["scales"],
        )

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (a new tensor, the values' dtype; for
        int8 values the dequantized float32 weight ``values · scales[row]``)."""
        return torch.ops.cast_rs.nm_decompress(
            self.values, self.index, self.out_features, self.in_features, self.n, self.m, self.scales
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as stored (values, positions and, for int8, the row scales; the
        bias not included)."""
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.values.numel() * self.values.element_size() + self.index.numel() * 4 + scales

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={format_pattern((self.n, self.m))}, dtype={self.values.dtype}"
        )


def check_nm_linear_entries(layer: NMLinear, state_dict: Dict[str, Any], prefix: str) -> None:
    """Raise if ``state_dict``'s entries under ``prefix`` cannot be loaded into ``layer`` as
    they are (see :class:`NMLinear`); reads only, copies nothing. Missing entries are left to
    ``load_state_dict``'s own ``strict`` handling."""
    who = f"NMLinear {prefix[:-1]!r}" if prefix else "NMLinear"
    layout = state_dict.get(prefix + "_extra_state")
    if isinstance(layout, torch.Tensor):
        got = [int(v) for v in layout.reshape(-1).tolist()]
        want = [int(v) for v in layer.get_extra_state().tolist()]
        if len(got) != len(want) or got[0] != want[0]:
            raise ValueError(f"{who}: the checkpoint's layout record {got} is not format version {want[0]} ({want})")
        if got[1:5] != want[1:5]:
            raise ValueError(
                f"{who}: the checkpoint holds a {got[2]}x{got[1]} (out x in) {got[3]}:{got[4]} weight, this layer is "
                f"{want[2]}x{want[1]} {want[3]}:{want[4]}"
            )
    values = state_dict.get(prefix + "values")
    if isinstance(values, torch.Tensor):
        if values.dtype != layer.values.dtype:
            raise TypeError(
                f"{who}: the checkpoint's values are {values.dtype}, this layer stores {layer.values.dtype}; build the "
                f"layer with dtype={values.dtype} (values are never reinterpreted)"
            )
        if values.shape != layer.values.shape:
            raise ValueError(
                f"{who}: the checkpoint's values have shape {tuple(values.shape)}, this layer's layout needs "
                f"{tuple(layer.values.shape)}"
            )
    index = state_dict.get(prefix + "index")
    if isinstance(index, torch.Tensor):
        if index.dtype != torch.int32 or index.shape != layer.index.shape:
            raise ValueError(
                f"{who}: the checkpoint's index is {index.dtype} {tuple(index.shape)}, expected torch.int32 "
                f"{tuple(layer.index.shape)}"
            )
        _check_positions(index, layer.m, who)
    scales = state_dict.get(prefix + "scales")
    if isinstance(scales, torch.Tensor) and layer.scales is not None:
        if scales.dtype != torch.float32 or scales.shape != layer.scales.shape:
            raise ValueError(
                f"{who}: the checkpoint's scales are {scales.dtype} {tuple(scales.shape)}, expected torch.float32 "
                f"{tuple(layer.scales.shape)} (one per output row)"
            )
    bias = state_dict.get(prefix + "bias")
    if isinstance(bias, torch.Tensor) and layer.bias is not None and bias.shape != layer.bias.shape:
        raise ValueError(f"{who}: the checkpoint's bias has shape {tuple(bias.shape)}, expected {tuple(layer.bias.shape)}")


def _check_positions(index: torch.Tensor, m: int, who: str) -> None:
    """Stored positions must be below M: with M a power of two every bit pattern is one;
    otherwise (M = 3, 5, 6, 7) a corrupt file could point past a group, which the kernels would
    read as the wrong input."""
    if m & (m - 1) == 0:
        return
    bits = 2 if m <= 4 else 4
    words = index.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    positions = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if bool((positions >= m).any()):
        raise ValueError(f"{who}: index positions must be below M = {m}; this state_dict's index is corrupt")


def _check_all_entries(model: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """A model-level load pre-hook (installed by :func:`compress`): every compressed layer's
    entries are checked before any module of the model copies anything."""
    for name, mod in model.named_modules():
        if isinstance(mod, NMLinear):
            check_nm_linear_entries(mod, state_dict, prefix + (name + "." if name else ""))


def _refuse_mixed_record(model: nn.Module, planned: List[torch.dtype]) -> None:
    # A Hugging Face model's checkpoint record holds one values dtype, so that from_pretrained
    # can build every layer before reading the file.
    if not is_hf_model(model):
        return
    dtypes = set(planned) | {mod.values.dtype for mod in model.modules() if isinstance(mod, NMLinear)}
    if len(dtypes) > 1:
        raise ValueError(
            f"dtype: the compressed layers would hold values of {sorted(map(dtype_name, dtypes))}, and a saved "
            "Hugging Face model records one values dtype; pass dtype=torch.bfloat16 or dtype=torch.float32"
        )


def compressed_record(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The checkpoint record (cast_rs.checkpoint) of ``model``'s NMLinear layers, None if it has
    none. Raises ``ValueError`` if they mix patterns or value dtypes: a record holds one of each,
    so that from_pretrained can build every layer before reading the file."""
    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, NMLinear)]
    if not layers:
        return None
    patterns = {(mod.n, mod.m) for _, mod in layers}
    dtypes = {mod.values.dtype for _, mod in layers}
    if len(patterns) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"model: its NMLinear layers mix patterns {sorted(map(format_pattern, patterns))} or value dtypes "
            f"{sorted(map(dtype_name, dtypes))}; a checkpoint records one of each"
        )
    return make_record(format_pattern(patterns.pop()), True, dtype_name(dtypes.pop()), [name for name, _ in layers])


def finish_compressed(model: nn.Module) -> None:
    """What a model whose layers just became NMLinear gets (``compress`` and
    ``load_compressed_tensors``): a Hugging Face model records them in its config, so that
    save_pretrained writes the record and from_pretrained rebuilds them; and a model-level load
    pre-hook checks every NMLinear's entries before any module copies anything."""
    if is_hf_model(model):
        try:
            set_record(model, compressed_record(model))
        except ValueError:
            # Layers of two value dtypes: compress refuses them up front on a Hugging Face
            # model; a compressed-tensors checkpoint that mixes them is loaded unrecorded.
            pass
    if not getattr(model, "_cast_rs_load_checks", False):
        model.register_load_state_dict_pre_hook(_check_all_entries)
        model._cast_rs_load_checks = True


def _refuse_half(dtype: torch.dtype, where: str) -> None:
    # A float16 model would feed float16 activations, which the compressed kernels do not take
    # (float32 or bfloat16 inputs); storing its weights as float32 would also make it larger.
    if dtype == torch.float16:
        raise TypeError(
            f"{where}: the weight is float16, which the compressed N:M kernels do not run (their activations are "
            "float32 or bfloat16); convert the model first, model.to(torch.bfloat16) or model.float()"
        )


@dataclass
class CompressedLayer:
    name: str
    shape: Tuple[int, int]  # (out_features, in_features)
    dense_bytes: int  # the weight as it was (its dtype)
    compressed_bytes: int


@dataclass
class CompressReport:
    """What :func:`compress` did: the converted layers (bytes before and after) and the
    layers it left dense, with the reason."""

    pattern: Tuple[int, int]
    layers: List[CompressedLayer] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.compressed_bytes for layer in self.layers)

    @property
    def bytes_per_weight(self) -> float:
        """Stored bytes per dense weight of the converted layers (2:4 float32: 2.125, bfloat16:
        1.125, int8: 0.625 + 4 / in_features for the row scales; dense float32: 4)."""
        weights = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        return self.compressed_bytes / max(1, weights)

    def __str__(self) -> str:
        lines = [
            f"compress({format_pattern(self.pattern)}): {len(self.layers)} layers converted, "
            f"{self.dense_bytes / 2**20:.2f} MiB -> {self.compressed_bytes / 2**20:.2f} MiB "
            f"({self.compressed_bytes / max(1, self.dense_bytes):.3f}x, "
            f"{self.bytes_per_weight:.3f} bytes per weight)"
        ]
        width = max([len(layer.name) for layer in self.layers] + [5])
        for layer in self.layers:
            lines.append(
                f"  {layer.name:<{width}}  {str(layer.shape):>14}  {layer.dense_bytes:>11,d} B -> "
                f"{layer.compressed_bytes:>11,d} B"
            )
        for name, why in self.skipped:
            lines.append(f"  {name:<{width}}  left dense: {why}")
        return "\n".join(lines)


def compress(
    model: nn.Module,
    pattern: Union[str, Tuple[int, int]] = "2:4",
    *,
    include: Optional[Iterable[str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> CompressReport:
    """Replace, in place, the N:M ``nn.Linear`` / Hugging Face ``Conv1D`` layers of a finalized
    model by :class:`NMLinear` and return a :class:`CompressReport`.

    By default every such layer whose weight is exactly N:M along its input dimension is
    converted, and the others (a head tied to the embedding, layers ``sparsify`` skipped) are
    left dense and listed in ``report.skipped`` with the reason. ``include`` names the layers
    to convert (module names as in ``model.named_modules()``); then each of them must be N:M,
    and a ``ValueError`` names the first that is not (nothing is converted). ``dtype``:
    ``torch.float32``, ``torch.bfloat16`` or ``torch.int8`` for the stored values (default:
    each weight's own dtype when it is one of those, else float32). ``torch.int8`` quantizes
    each layer's kept weights per output row (one float32 scale per row, see the module
    docstring): 2:4 costs 0.625 bytes per dense weight plus 4 bytes per row, and the
    activations stay float32 or bfloat16 (the model's). The model must be on the CPU.

    Raises:
        TypeError: a float16 layer (convert the model to bfloat16 or float32 first: the kernels
            take float32 or bfloat16 activations); nothing is converted.
        ValueError: an ``include`` name that is not a module or a layer that cannot be
            converted, or a model with no exact N:M layer at all (finalize it first); nothing is
            converted.
    """
    n, m = parse_pattern(pattern)
    wanted = None if include is None else list(include)
    modules = dict(model.named_modules())
    if wanted is not None:
        missing = [name for name in wanted if name not in modules]
        if missing:
            raise ValueError(f"include: no module named {missing[0]!r} in the model")
    report = CompressReport((n, m))
    plan = []
    for name, mod in modules.items():
        kind = layer_kind(mod)
        if kind is None or (wanted is not None and name not in wanted):
            continue
        w = mod.weight.detach()
        w2 = w.t() if kind[0] == "Conv1D" else w
        why = None
        if name == "":
            why = "the model itself is the layer (use NMLinear.from_dense)"
        elif w2.shape[1] % m:
            why = f"in_features {w2.shape[1]} is not a multiple of M = {m}"
        elif w.device.type != "cpu":
            why = f"on {w.device} (NMLinear runs on the CPU)"
        elif count_violations(w2, n, m, -1)[0]:
            why = f"not {n}:{m} (finalize the model first)"
        if why is not None:
            if wanted is not None:
                raise ValueError(f"compress: layer {name!r} cannot be converted: {why}")
            report.skipped.append((name, why))
            continue
        plan.append((name, mod))
    for name, mod in plan:
        _refuse_half(mod.weight.dtype, f"compress: layer {name!r}")
    if not plan:
        left = "; ".join(f"{name}: {why}" for name, why in report.skipped[:4]) or "no nn.Linear / Conv1D layer"
        raise ValueError(
            f"compress: no layer of the model is exactly {n}:{m}, so nothing would be converted "
            f"(finalize the model first: sparse.finalize()); {left}"
        )
    if dtype is not None and dtype not in NMLinear._DTYPE_CODES:
        raise TypeError(f"dtype: expected torch.float32, torch.bfloat16 or torch.int8, got {dtype}")
    _refuse_mixed_record(model, [dtype or mod.weight.dtype for _, mod in plan])
    for name, mod in plan:
        new = NMLinear.from_dense(mod, (n, m), dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
        w = mod.weight
        report.layers.append(CompressedLayer(name, (new.out_features, new.in_features), w.numel() * w.element_size(), new.nbytes))
    finish_compressed(model)
    return report
