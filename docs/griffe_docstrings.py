"""A griffe extension for the API reference, in the documentation build only (the source files
are not touched).

* The docstrings of `python/cast_rs/` use a few reStructuredText constructs (Sphinx roles such
  as :func:`x`, a ``.. code-block::`` directive, a ``::`` literal-block marker), which Markdown
  would print verbatim. They become Markdown: a role a code span (a math role plain text); the
  directive line goes and the indented block under it stays a code block.
* Module constants are documented with Sphinx's ``#:`` comments above the assignment, which
  griffe does not read: such a comment becomes the attribute's docstring."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(func|class|meth|data|attr|mod|exc|obj):`~?([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. code-block::.*\n", re.M)
_LITERAL = re.compile(r"::\n(?=\s*\n)")
_GREEK = {
    r"\alpha": "α",
    r"\beta": "β",
    r"\gamma": "γ",
    r"\lambda": "λ",
    r"\mu": "μ",
    r"\theta": "θ",
    r"\eta": "η",
    r"\kappa": "κ",
    r"\epsilon": "ε",
}


def _math(match: re.Match) -> str:
    text = match.group(1)
    for tex, char in _GREEK.items():
        text = text.replace(tex, char)
    return f"*{text}*"


def markdown(text: str) -> str:
    """``text`` with its reStructuredText roles and code-block directives made Markdown."""
    text = _ROLE.sub(lambda m: f"`{m.group(2)}`", text)
    text = _MATH.sub(_math, text)
    text = _DIRECTIVE.sub("", text)
    return _LITERAL.sub(":\n", text)


def _comment_doc(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an attribute's assignment, or None."""
    path = obj.filepath
    lines = obj.lines_collection[path] if isinstance(path, Path) and path in obj.lines_collection else []
    i, found = (obj.lineno or 0) - 2, []
    while 0 <= i < len(lines) and lines[i].lstrip().startswith("#:"):
        found.append(lines[i].lstrip()[2:].strip())
        i -= 1
    return "\n".join(reversed(found)) or None


class SphinxToMarkdown(griffe.Extension):
    """Rewrites every docstring griffe loads (see the module docstring)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None and obj.is_attribute:
            doc = _comment_doc(obj)
            if doc:
                obj.docstring = griffe.Docstring(doc, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
