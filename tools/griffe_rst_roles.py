"""Griffe extension for the API reference (mkdocs.yml: mkdocstrings ``extensions``).

rllama's docstrings are Google style with a few reStructuredText habits that Markdown does not
know; this rewrites them while the package is loaded:

- ``:class:`Name```, ``:meth:`~pkg.Class.method```, ``:func:``, ``:mod:``, ``:data:``, ``:attr:``,
  ``:exc:``, ``:obj:`` roles become code that links to the object's entry in the API reference
  when the reference documents it (an optional cross-reference: no link, no warning otherwise).
  A leading ``~`` shows the last component only, as in Sphinx.
- A paragraph ending in ``::`` (reST's literal-block marker) ends in ``:``, and a
  ``.. code-block:: lang`` line is dropped: the indented block after either is already a Markdown
  code block.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|exc|obj):`(?P<tilde>~?)(?P<name>[^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
CODE_BLOCK_DIRECTIVE = re.compile(r"^[ \t]*\.\. code-block::.*\n", re.MULTILINE)


class RSTRoles(griffe.Extension):
    """Rewrites reST roles and literal-block markers in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj)


def _walk(obj, seen=None):
    seen = set() if seen is None else seen
    if obj.path in seen:
        return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member, seen)


def rewrite(text: str, obj) -> str:
    def role(match: re.Match) -> str:
        name = match["name"].strip()
        shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
        shown = shown.rstrip("()") + ("()" if name.endswith("()") else "")
        identifier = _resolve(name.rstrip("()"), obj)
        code = f"<code>{html.escape(shown)}</code>"
        if identifier is None:
            return f"`{shown}`"
        return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'

    text = ROLE.sub(role, text)
    text = CODE_BLOCK_DIRECTIVE.sub("", text)
    return LITERAL_MARKER.sub(":", text)


def _resolve(name: str, obj) -> str | None:
    """The full path of ``name`` as seen from ``obj``'s scope, or ``None``."""
    if name.startswith("rllama"):
        return name
    head, _, rest = name.partition(".")
    scope = obj
    while scope is not None:
        try:
            base = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError, KeyError):
            base = None
        if base:
            return f"{base}.{rest}" if rest else base
        if head in getattr(scope, "members", {}):
            member = scope.members[head]
            return f"{member.path}.{rest}" if rest else member.path
        scope = scope.parent
    return None
