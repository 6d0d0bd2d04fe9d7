"""Safe names and text for generated Python.

User names (inputs, params, dims, lets) become Python identifiers in the
generated module. Any identifier the language accepts must work there, so
every name goes through a `Namer`: it keeps the user's name when it is free
and otherwise appends `_`, `_2`, ... The namer starts out knowing Python's
keywords and builtins and every name the module defines or imports, so a
user input called `torch`, `state` or `lambda` can neither break the module
nor silently read another value.

Text copied into the module (the mixer source, file names, messages) goes
through `comment_lines` or `repr`: never into a string literal or a comment
unescaped, so a `\"\"\"` or a newline in a mixer file cannot become code.
"""

from __future__ import annotations

import builtins
import keyword
import math
import re

# Python names that are not keywords but must not be rebound in generated code
_PYTHON = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))


class Namer:
    """Hands out identifiers that are unique within one generated module."""

    def __init__(self, reserved=()):
        self.taken: set = set(_PYTHON) | set(reserved)

    def claim(self, hint: str) -> str:
        """`hint` itself if free, else `hint_`, `hint_2`, `hint_3`, ..."""
        base = re.sub(r"\W", "_", hint) or "v"
        if base[0].isdigit():
            base = "v" + base
        name = base
        if name in self.taken:
            name = base + "_"
            n = 2
            while name in self.taken:
                name = f"{base}_{n}"
                n += 1
        self.taken.add(name)
        return name

    def reserve(self, *names: str) -> None:
        self.taken.update(names)


def printable(text: str) -> str:
    """text with every non-printable character (control characters, NUL,
    line and paragraph separators, lone surrogates) written as a backslash
    escape; ordinary characters, including non-ASCII letters, are kept."""
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch == "\t":
            out.append("    ")
        else:
            out.append(repr(ch)[1:-1])  # '\x00', '\u2028', '\ud800', ...
    return "".join(out)


def comment_lines(text: str, indent: str = "") -> list:
    """text as `# ...` comment lines: nothing in it can end the comment."""
    lines = text.split("\n")
    return [(indent + "# " + printable(line)).rstrip() for line in lines]


def comment(text: str) -> str:
    """One line of comment text (newlines and control characters escaped)."""
    return printable(text.replace("\n", " "))


def literal(value) -> str:
    """Python source for a number `number` returned (inf and nan included)."""
    if isinstance(value, bool):
        return repr(value)
    if math.isnan(value):
        return "math.nan"
    if math.isinf(value):
        return "math.inf" if value > 0 else "-math.inf"
    return repr(float(value))
