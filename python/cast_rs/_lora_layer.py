"""The masked LoRA layer: peft's LoRA ``Linear`` whose update is ``(B·A)⊙M`` on an N:M weight.

Imported by :mod:`cast_rs.lora` only when a masked adapter is made or loaded, so that
``import cast_rs`` does not need peft.

The layer is peft's own ``lora.Linear`` (same parameters, state-dict keys, adapters, merging,
enabling and disabling), registered through ``LoraConfig._register_custom_module``; only the
update differs. On a base layer whose weight is exactly N:M it computes::

    y = x (W + s·(B·A)⊙M)ᵀ + b        M: the weight's N:M mask, taken once when the layer is made

so training sees exactly the weight a merge writes (the same function computes both), and a
merged layer keeps W's support: still exactly N:M, with the same mask. A base layer that is not
N:M (a dense output head the config also targets) gets peft's plain LoRA.

Cost. The forward pass forms the effective weight once and runs one matmul (peft's plain LoRA
runs the base matmul and two thin ones). The backward pass needs ``G = gᵀx`` (``[out, in]``)
to mask the update's gradient: ``dA = s·Bᵀ(G⊙M)``, ``dB = s·(G⊙M)Aᵀ``. That is one more
``tokens × out × in`` matmul than plain LoRA, whose adapter gradients go through the rank-r
factors only: a masked update has no such shortcut (``G⊙M`` does not factor); for a bfloat16
model it runs in bfloat16 (``G`` rounded to bfloat16, 2^-8 relative). Nothing
weight-sized is kept between the forward and the backward pass: the effective weight is
recomputed in the backward pass (``out × in × r``, small next to the matmuls).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ._cast_rs import CastError
from ._markers import module_spec
from .checking import count_violations
from .layers import SPARSE_MODULE_ATTR, layer_kind
from .nm import format_pattern, nm_mask_packed, parse_pattern, unpack_mask

#: Attribute of a ``LoraConfig`` (not a dataclass field: never saved) holding the N:M pattern.
PATTERN_ATTR = "_cast_rs_nm_pattern"

#: ``init_lora_weights`` values that leave the base weight alone (PiSSA, OLoRA, CorDA, LoftQ, ...
#: rewrite it with a dense residual, which would break N:M before training starts).
SAFE_INITS = (True, False, "gaussian")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapter products in at least float32 (peft does the same for half adapters on the CPU)."""
    return torch.promote_types(dtype, torch.float32)


def masked_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, mask: torch.Tensor) -> torch.Tensor:
    """``(s·B·A)⊙M`` as ``[out, in]`` in the compute dtype (a new tensor)."""
    cdt = _compute_dtype(lora_a.dtype)
    return torch.mm(lora_b.to(cdt) * scaling, lora_a.to(cdt)).mul_(mask)


def effective_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, mask: torch.Tensor
) -> torch.Tensor:
    """``W + (s·B·A)⊙M`` in ``weight``'s dtype, all ``[out, in]``: what the layer computes with
    and, bit for bit, what a merge writes."""
    delta = masked_delta(lora_a, lora_b, scaling, mask)
    return delta.add_(weight).to(weight.dtype)


class _MaskedLoraLinear(torch.autograd.Function):
    """``F.linear(x, W + (s·B·A)⊙M, bias)`` with the gradients of A and B masked; W is ``[out,
    in]`` (a transposed view for a Conv1D), ``bits`` its packed mask in the stored layout."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bits: torch.Tensor,
        scaling: float,
        transposed: bool,
    ) -> torch.Tensor:
        mask = _unpack_oi(bits, weight, transposed)
        w_eff = effective_weight(weight, lora_a, lora_b, scaling, mask)
        ctx.save_for_backward(x, weight, lora_a, lora_b, bits)
        ctx.scaling, ctx.transposed = scaling, transposed
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight, lora_a, lora_b, bits = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        mask = _unpack_oi(bits, weight, ctx.transposed)
        gx = gw = gbias = ga = gb = None
        if need_x:
            gx = grad_out @ effective_weight(weight, lora_a, lora_b, s, mask)
        if need_w or need_a or need_b:
            cdt = _compute_dtype(lora_a.dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            # [out, in]: the gradient of the effective weight. With bfloat16 activations and
            # gradients it is a bfloat16 GEMM (products exact, f32 accumulation, the result
            # rounded to bfloat16, as autocast computes weight gradients), about twice as fast
            # as the float32 one on CPUs with bf16 dot products; this is the matmul plain LoRA
            # does not run. Otherwise float32 or wider.
            if g2.dtype == torch.bfloat16 and x2.dtype == torch.bfloat16:
                g_w = (g2.t() @ x2).to(cdt)
            else:
                g_w = g2.to(cdt).t() @ x2.to(cdt)
            if need_w:
                gw = g_w.to(weight.dtype)
            g_w = g_w.mul_(mask) if not need_w else g_w * mask
            if need_a:
                ga = (lora_b.to(cdt).t() @ g_w).mul_(s).to(lora_a.dtype)
            if need_b:
                gb = (g_w @ lora_a.to(cdt).t()).mul_(s).to(lora_b.dtype)
        if need_bias:
            gbias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return gx, gw, gbias, ga, gb, None, None, None


def _unpack_oi(bits: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The bool mask as ``[out, in]`` (``weight`` is the ``[out, in]`` view)."""
    if transposed:
        return unpack_mask(bits, (weight.shape[1], weight.shape[0])).t()
    return unpack_mask(bits, tuple(weight.shape))


class NMLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` with the update masked to the base weight's N:M pattern.

    Made by peft (``cast_rs.lora`` / ``cast_rs.lora_config`` register it for ``nn.Linear`` and
    Hugging Face ``Conv1D``); everything but the update is peft's. ``nm_masked`` says whether
    this layer's base weight is N:M (masked update) or dense (plain LoRA).
    """

    nm_masked: bool = False
    nm_pattern: Optional[Tuple[int, int]] = None

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # peft's default dispatcher, which a custom module bypasses, sets this from the layer type
        # (a Conv1D stores its weight [in, out]) whatever the config says; so do we.
        kind = layer_kind(self.get_base_layer())
        self.fan_in_fan_out = kind is not None and kind[0] == "Conv1D"

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        if "nm_mask_bits" not in self._buffers:
            self._setup_mask(config, kwargs.get("target_name", ""))
        if self.nm_masked and config.init_lora_weights not in SAFE_INITS:
            raise CastError(
                f"init_lora_weights: {config.init_lora_weights!r} rewrites the base weight with a dense residual, "
                f"which breaks N:M (layer {kwargs.get('target_name', '')!r}); use one of {SAFE_INITS}"
            )
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        if self.nm_masked and adapter_name in self.lora_variant:
            variant = type(self.lora_variant.pop(adapter_name)).__name__
            raise CastError(
                f"config: the masked N:M adapter is plain LoRA (B·A)⊙M; the LoRA variant {variant} (DoRA, ...) is not "
                f"supported on N:M layer {kwargs.get('target_name', '')!r}"
            )

    def _setup_mask(self, config: Any, name: str) -> None:
        base = self.get_base_layer()
        kind = layer_kind(base)
        pattern = getattr(config, PATTERN_ATTR, None) or (2, 4)
        n, m = parse_pattern(pattern)
        if kind is None:
            raise CastError(f"layer {name!r}: masked LoRA takes nn.Linear and Conv1D layers, got {type(base).__name__}")
        if module_spec(base) is not None:
            raise CastError(
                f"layer {name!r} is still being sparsified (sparsify without finalize): finalize the model first, "
                "then add adapters"
            )
        dim = kind[1]
        w = base.weight.detach()
        size = w.shape[-1] if dim == -1 else w.shape[0]
        nm = size % m == 0 and count_violations(w, n, m, dim)[0] == 0 and bool(torch.isfinite(w).all())
        marked = getattr(base, SPARSE_MODULE_ATTR, None)
        if marked is not None and marked != format_pattern((n, m)):
            raise CastError(f"pattern: layer {name!r} was finalized {marked}, the adapter asks for {format_pattern((n, m))}")
        if marked is not None and not nm:
            raise CastError(
                f"layer {name!r} was finalized {marked} but its weight is not exactly {format_pattern((n, m))} now "
                "(a plain LoRA merge, or an edit, made it dense): cast_rs.reproject restores it"
            )
        self.nm_masked = nm
        self.nm_pattern = (n, m) if nm else None
        # The mask, one bit per weight, in the weight's stored layout; not saved (a function of
        # the base weight, which the base model's checkpoint holds). A buffer, so .to() moves it.
        bits = nm_mask_packed(w, (n, m), dim) if nm else torch.zeros(0, dtype=torch.uint8, device=w.device)
        self.register_buffer("nm_mask_bits", bits, persistent=False)

    # ------------------------------------------------------------------ the masked update

    def nm_mask(self) -> torch.Tensor:
        """The bool N:M mask in the base weight's stored layout (``[out, in]``, or ``[in, out]``
        for a Conv1D)."""
        if not self.nm_masked:
            raise CastError("nm_mask: this layer's base weight is not N:M (it takes plain LoRA)")
        return unpack_mask(self.nm_mask_bits, tuple(self.get_base_layer().weight.shape))

    def _weight_oi(self) -> torch.Tensor:
        w = self.get_base_layer().weight
        return w.t() if self.fan_in_fan_out else w

    def _delta_oi(self, adapter: str) -> torch.Tensor:
        w = self._weight_oi()
        mask = _unpack_oi(self.nm_mask_bits, w, self.fan_in_fan_out)
        return masked_delta(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], mask)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's update as merged: ``(s·B·A)⊙M`` on an N:M layer (stored layout, the
        adapter's dtype), peft's ``s·B·A`` otherwise."""
        if not self.nm_masked:
            return super().get_delta_weight(adapter)
        delta = self._delta_oi(adapter)
        delta = delta.t() if self.fan_in_fan_out else delta
        return delta.to(self.lora_B[adapter].weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Merge into the base weight with :func:`effective_weight`, the function the forward pass
        uses, so the merged layer computes bit for bit what the adapted one did (``nn.Linear``)."""
        if not self.nm_masked:
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            base = self.get_base_layer()
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            with torch.no_grad():
                w = self._weight_oi()
                mask = _unpack_oi(self.nm_mask_bits, w, self.fan_in_fan_out)
                merged = effective_weight(w.detach(), a.detach(), b.detach(), self.scaling[adapter], mask)
                if safe_merge and not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                w.copy_(merged)  # in place: the Parameter (and anything holding it) stays the same
                if self.lora_bias[adapter]:
                    base.bias.add_(self.lora_B[adapter].bias * self.scaling[adapter])
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged updates again (up to rounding, as peft's unmerge)."""
        if not self.nm_masked:
            return super().unmerge()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            with torch.no_grad():
                w = self._weight_oi()
                delta = self._delta_oi(adapter)
                w.copy_((w.to(delta.dtype) - delta).to(w.dtype))
                if self.lora_bias[adapter]:
                    self.get_base_layer().bias.sub_(self.lora_B[adapter].bias * self.scaling[adapter])

    def _fused_ok(self, adapters: List[str], args: Tuple[Any, ...], kwargs: dict) -> bool:
        """One active adapter, no dropout, no LoRA bias, a plain base layer without hooks: one
        matmul with the effective weight (else the two-term form)."""
        if len(adapters) != 1 or args or kwargs:
            return False
        adapter = adapters[0]
        drop = self.lora_dropout[adapter]
        if not (isinstance(drop, nn.Identity) or not drop.training) or self.lora_bias[adapter]:
            return False
        base = self.get_base_layer()
        if base._forward_hooks or base._forward_pre_hooks:
            return False
        return type(base).forward is nn.Linear.forward or (layer_kind(base) or ("",))[0] == "Conv1D"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.nm_masked:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in ("alora_offsets",):  # peft's variant-only arguments: not the base layer's
            kwargs.pop(key, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self._fused_ok(active, args, kwargs):
            adapter = active[0]
            base = self.get_base_layer()
            return _MaskedLoraLinear.apply(
                x,
                self._weight_oi(),
                base.bias,
                self.lora_A[adapter].weight,
                self.lora_B[adapter].weight,
                self.nm_mask_bits,
                float(self.scaling[adapter]),
                bool(self.fan_in_fan_out),
            )
        result = self.base_layer(x, *args, **kwargs)
        for adapter in active:
            result = result + self._adapter_term(adapter, x, result.dtype)
        return result

    def _adapter_term(self, adapter: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``dropout(x) ((s·B·A)⊙M)ᵀ`` (+ the LoRA bias): the general form, a dense masked update."""
        delta = self._delta_oi(adapter)
        h = self.lora_dropout[adapter](x.to(delta.dtype))
        out = F.linear(h, delta)
        if self.lora_bias[adapter]:
            out = out + self.lora_B[adapter].bias * self.scaling[adapter]
        return out.to(dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: List[str], **kwargs: Any) -> torch.Tensor:
        if not self.nm_masked:
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_A:
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            result[rows] = result[rows] + self._adapter_term(adapter, x[rows], result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # A masked update is not a rank-r product: converting it to plain LoRA would unmask it.
        return not self.nm_masked and super().supports_lora_conversion(adapter_name)

    def __repr__(self) -> str:
        tag = f"masked {format_pattern(self.nm_pattern)}" if self.nm_pattern else "dense base"
        return f"cast_rs.NMLoraLinear[{tag}]({super().__repr__()})"
