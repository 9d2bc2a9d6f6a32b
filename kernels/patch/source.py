"""How the patch tells a script's method it knows from an edited one: a digest of the method's source.

A swap replaces a script's forward with ours only where the script's code is the version whose math we
reimplement; any edit (another SmearGate, a different skip rule, a new head) changes the digest and the
swap is left out, with the reason in the report. The digest is taken over the method's tokens without
comments, blank lines and line breaks inside brackets, so reformatting or commenting a method keeps it
known; any change to what it computes does not.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import io
import textwrap
import tokenize

_LAYOUT_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                  tokenize.ENCODING, tokenize.ENDMARKER)


def method_source(fn) -> str | None:
    """fn's source, dedented; None where Python cannot find it (code built from a string, say)."""
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None


def source_digest(source: str) -> str:
    """16 hex digits of sha256 over the source's tokens (comments, blank lines and layout dropped)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    text = " ".join(tok.string for tok in tokens if tok.type not in _LAYOUT_TOKENS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def self_attributes(source: str) -> set[str]:
    """The names `x` of every `self.x` the function in `source` reads or writes."""
    tree = ast.parse(source)
    function = tree.body[0]
    first = function.args.args[0].arg if function.args.args else "self"
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == first}
