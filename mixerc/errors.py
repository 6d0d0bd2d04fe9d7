"""Errors mixerc raises on purpose.

Every error a user can cause is a `MixerError`. Errors about the source text
carry a `Loc` and render like a compiler diagnostic:

    examples/bad.mx:5:15: error: unknown name 'kk'
        let M = q @ kk^T
                    ^^
      hint: did you mean 'k'?

Errors about run-time tensors (shapes, NaN, state) name the offending tensor
instead of a source position.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loc:
    """A span in a source file (1-based lines and columns, end exclusive)."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class MixerError(Exception):
    """Base class of every error mixerc raises about user input."""

    def __init__(self, message: str, loc: Loc | None = None, hint: str | None = None,
                 source: str | None = None):
        self.message = message
        self.loc = loc
        self.hint = hint
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        if self.loc is None:
            text = f"error: {self.message}"
        else:
            text = f"{self.loc}: error: {self.message}"
            excerpt = _excerpt(self.source, self.loc)
            if excerpt:
                text += "\n" + excerpt
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class MixerSyntaxError(MixerError):
    """The text does not follow grammar/mixer.lark."""


class MixerNameError(MixerError):
    """An unknown, reserved or duplicated name."""


class MixerTypeError(MixerError):
    """Kinds or dims do not fit: a matrix where a token tensor is expected,
    a contraction over mismatched dims, a dim that does not divide, ..."""


class MixerShapeError(MixerError):
    """A run-time tensor does not have the shape the mixer declares."""


class MixerValueError(MixerError):
    """A run-time value is unusable: NaN/Inf, wrong dtype, bad state."""


class MixerDecodeError(MixerError):
    """The mixer cannot run token by token (it is not causal)."""


class MixerUnsupportedError(MixerError, NotImplementedError):
    """A feature that is declared but not implemented yet for this path."""


class MixerCacheError(MixerError):
    """An autotune cache command cannot do what was asked: an unknown key, a
    file that is not a bundle, a bad MIXERC_AUTOTUNE value."""


class CacheWarning(UserWarning):
    """A cache (generated modules, autotune results) could not be used as
    asked; the job goes on without it."""


class MixerPerformanceWarning(UserWarning):
    """The mixer runs, but slower than its class allows (e.g. a term with no
    fast strategy runs through the dense interpreter)."""


def exit_on_error(fn):
    """For CLI commands: a MixerError prints as a diagnostic (no traceback) and
    exits with status 2."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MixerError as e:
            print(e.render(), file=sys.stderr)
            sys.exit(2)
    return wrapper


def _excerpt(source: str | None, loc: Loc) -> str:
    if not source:
        return ""
    lines = source.splitlines()
    if not 1 <= loc.line <= len(lines):
        return ""
    line = lines[loc.line - 1].replace("\t", " ")
    start = max(loc.col - 1, 0)
    if loc.end_line == loc.line and loc.end_col > loc.col:
        width = loc.end_col - loc.col
    else:
        width = max(len(line.rstrip()) - start, 1)
    width = max(1, min(width, max(len(line) - start, 1)))
    return f"    {line}\n    {' ' * start}{'^' * width}"
