"""Which layers can be N:M: the layer kinds, the ``include`` / ``exclude`` rules, the output
head, and the weight a layer computes with.

One place for the rules that :func:`cast_rs.sparsify`, the baselines, :func:`cast_rs.check_nm`
and :func:`cast_rs.compress` all apply, so that they agree on which layers they touch.

Which layers become N:M: ``nn.Linear`` (weight ``[out, in]``: groups along the last dim) and
Hugging Face GPT-2-style ``Conv1D`` (weight ``[in, out]``: groups along dim 0) whose input
dimension is divisible by M. Left dense, each with its reason: layers whose weight is tied to
an embedding (an LM head sharing the token embedding), the model's output head tied or not
(:func:`output_heads`; ``include_head=True`` takes it), layers not matched by ``include`` or
matched by ``exclude``, layers whose input dimension M does not divide, and a second module
sharing an already-chosen weight.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _dtensor
from ._markers import original_weight
from .nm import Pattern, parse_pattern
from .scaling import scale_weight

__all__ = [
    "SPARSE_MODULE_ATTR",
    "Rule",
    "Rules",
    "SkippedLayer",
    "effective_full_weight",
    "find_layers",
    "layer_kind",
    "output_heads",
    "parameter_aliases",
]

#: Module attribute left by ``finalize`` (and set while sparse) so that ``check_nm`` knows
#: which layers to check: the pattern string, e.g. ``"2:4"``.
SPARSE_MODULE_ATTR = "_cast_rs_sparse"

Rule = Union[str, "re.Pattern[str]", type]
Rules = Union[Rule, Sequence[Rule], None]


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D`` (a Linear with its weight stored ``[in, out]``).

    Matched by class name along the MRO: parametrize and FSDP2 subclass the module's class
    (``ParametrizedConv1D``, ``FSDPParametrizedConv1D``)."""
    if not any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) or not hasattr(module, "nf"):
        return False
    try:
        w = original_weight(module)  # not the parametrized weight: no computation, DTensors ok
    except AttributeError:
        return False
    return isinstance(w, torch.Tensor) and w.dim() == 2


def layer_kind(module: nn.Module) -> Optional[Tuple[str, int]]:
    """("Linear", -1) / ("Conv1D", 0) for sparsifiable layer types, else None."""
    if isinstance(module, nn.Linear):
        return "Linear", -1
    if _is_conv1d(module):
        return "Conv1D", 0
    return None


def _as_rules(rules: Rules, param: str) -> List[Rule]:
    if rules is None:
        return []
    if isinstance(rules, (str, re.Pattern, type)):
        return [rules]
    out = list(rules)
    for r in out:
        if not isinstance(r, (str, re.Pattern, type)):
            raise TypeError(f"{param}: expected names, globs, compiled regular expressions or module types, got {r!r}")
    return out


def _matches(rule: Rule, name: str, module: nn.Module) -> bool:
    if isinstance(rule, type):
        return isinstance(module, rule)
    if isinstance(rule, re.Pattern):
        return rule.search(name) is not None
    if rule.startswith("re:"):
        return re.search(rule[3:], name) is not None
    return name == rule or fnmatch.fnmatchcase(name, rule)


def _describe(rule: Rule) -> str:
    if isinstance(rule, type):
        return rule.__name__
    if isinstance(rule, re.Pattern):
        return f"re:{rule.pattern}"
    return rule


def effective_full_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with (scaled, if still parametrized), whole: DTensor
    (FSDP2) weights and scales are gathered, one layer at a time."""
    if parametrize.is_parametrized(module, "weight"):
        w = module.parametrizations.weight.original
        if _dtensor.is_dtensor(w):
            ws = module.parametrizations.weight[0]
            return scale_weight(_dtensor.full(w.detach()), _dtensor.full(ws.scale.detach()), ws.groups, ws.dim)
    return _dtensor.full(module.weight.detach())


@dataclass
class SkippedLayer:
    name: str
    kind: str
    shape: Tuple[int, ...]
    reason: str


def parameter_aliases(model: nn.Module) -> Dict[str, List[str]]:
    """Parameter name -> every name of the same tensor in ``model`` (a tied weight has several;
    any other parameter only its own)."""
    by_id: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def output_heads(model: nn.Module) -> List[str]:
    """The names of ``model``'s output head(s): the layers :func:`find_layers` keeps dense
    unless ``include_head=True``.

    The head is the module ``model.get_output_embeddings()`` returns (Hugging Face models, tied
    to the input embedding or not); for other models, the last ``Linear`` / ``Conv1D`` outside
    the repeated blocks (not inside an ``nn.ModuleList``) whose output size is the vocabulary
    size of an ``nn.Embedding`` of the model. A model with neither has no head here (exclude
    its last layer by name if it should stay dense).

    Why dense by default: the head is the layer most sensitive to pruning and a small share of
    a language model's weights, so SparseGPT, Wanda, MaskLLM, ModelOpt and the CAST reference
    all leave it dense.
    """
    names = {id(mod): name for name, mod in model.named_modules()}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError, TypeError):
            head = None
        if isinstance(head, nn.Module) and id(head) in names:
            return [names[id(head)]]
    vocab = {mod.num_embeddings for mod in model.modules() if isinstance(mod, nn.Embedding)}
    in_list = set()
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList):
            in_list.update(id(sub) for sub in mod.modules())
    found = None
    for name, mod in model.named_modules():
        kind_dim = layer_kind(mod)
        if kind_dim is None or id(mod) in in_list:
            continue
        w = original_weight(mod)
        out_dim = w.shape[0] if kind_dim[1] == -1 else w.shape[-1]
        if out_dim in vocab:
            found = name
    return [found] if found is not None else []


def find_layers(
    model: nn.Module,
    pattern: Pattern = "2:4",
    *,
    include: Rules = None,
    exclude: Rules = None,
    include_head: bool = False,
) -> Tuple[List[Tuple[str, nn.Module, str, int]], List[SkippedLayer]]:
    """The layers ``sparsify`` (and the baselines) would make N:M, and those it leaves dense.

    ``include`` / ``exclude`` take names, globs (``"*.attn.*"``), compiled regular expressions,
    strings ``"re:<regex>"``, or module types. The output head (:func:`output_heads`) stays
    dense unless ``include_head`` is true. Returns ``([(name, module, kind, dim)], skipped)``.

    Raises:
        ValueError: an ``include`` rule that selects no layer: it matches no module, or only
            layers left dense (each listed with its reason). Nothing is changed.
    """
    n, m = parse_pattern(pattern)
    inc, exc = _as_rules(include, "include"), _as_rules(exclude, "exclude")
    if not isinstance(include_head, bool):
        raise TypeError(f"include_head: expected a bool, got {include_head!r}")
    tied: Dict[int, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            tied.setdefault(id(mod.weight), name)
    heads = set() if include_head else set(output_heads(model))
    chosen: Dict[int, str] = {}
    picked: List[Tuple[str, nn.Module, str, int]] = []
    skipped: List[SkippedLayer] = []
    for name, mod in model.named_modules():
        kind_dim = layer_kind(mod)
        if kind_dim is None:
            continue
        kind, dim = kind_dim
        w = original_weight(mod)
        shape = tuple(w.shape)

        def skip(reason: str, name: str = name, kind: str = kind, shape: Tuple[int, ...] = shape) -> None:
            skipped.append(SkippedLayer(name, kind, shape, reason))

        if inc and not any(_matches(r, name, mod) for r in inc):
            skip("not matched by include")
            continue
        hit = next((r for r in exc if _matches(r, name, mod)), None)
        if hit is not None:
            skip(f"excluded by {_describe(hit)!r}")
            continue
        if id(w) in tied:
            skip(f"weight tied to embedding {tied[id(w)]!r}")
            continue
        if name in heads:
            skip("output head (kept dense; include_head=True sparsifies it)")
            continue
        if id(w) in chosen:
            skip(f"shares its weight with {chosen[id(w)]!r}")
            continue
        if not w.is_floating_point():
            skip(f"weight dtype {w.dtype} is not floating-point")
            continue
        size = shape[-1] if dim == -1 else shape[0]
        if size % m:
            skip(f"input dimension {size} not divisible by M={m}")
            continue
        chosen[id(w)] = name
        picked.append((name, mod, kind, dim))
    _check_include(model, inc, picked, skipped, (n, m))
    return picked, skipped


def _check_include(
    model: nn.Module,
    inc: List[Rule],
    picked: List[Tuple[str, nn.Module, str, int]],
    skipped: List[SkippedLayer],
    pattern: Tuple[int, int],
) -> None:
    """Raise if an ``include`` rule selects no layer: a misspelt name would otherwise leave the
    model silently dense."""
    for rule in inc:
        if any(_matches(rule, name, mod) for name, mod, _, _ in picked):
            continue
        matched = [name for name, mod in model.named_modules() if name and _matches(rule, name, mod)]
        if not matched:
            raise ValueError(f"include: {_describe(rule)!r} matches no module of the model")
        reasons = {s.name: s.reason for s in skipped}
        listed = [f"{name} ({reasons.get(name, 'not a Linear / Conv1D layer')})" for name in matched[:5]]
        more = f" and {len(matched) - 5} more" if len(matched) > 5 else ""
        raise ValueError(
            f"include: {_describe(rule)!r} selects no layer that can take {pattern[0]}:{pattern[1]}: " + ", ".join(listed) + more
        )
