"""Public API: `mixerc.compile(...)` -> `CompiledMixer`."""

from __future__ import annotations

import codecs
import functools
import os
import stat
from importlib import resources
from pathlib import Path

import torch

from . import analysis as _analysis
from . import backends, ir
from .checker import check
from .errors import (Loc, MixerDecodeError, MixerError, MixerSyntaxError,
                     MixerUnsupportedError, MixerValueError)
from .runtime import call
from .runtime.bind import bind, signature_of
from .syntax import parse


def stdlib_names() -> list:
    """Names of the standard-library mixers shipped in examples/."""
    root = resources.files("mixerc.examples")
    return sorted(p.name[:-3] for p in root.iterdir() if p.name.endswith(".mx"))


def load_source(path_or_source) -> tuple[str, str]:
    """(source text, file name) from a path, a standard-library name or source text."""
    if isinstance(path_or_source, os.PathLike):
        path = Path(path_or_source)
        return _read(path), str(path)
    if not isinstance(path_or_source, str):
        raise MixerValueError("compile() takes a path, a standard-library name or source text, "
                              f"got {type(path_or_source).__name__}")
    text = path_or_source
    if "{" in text:
        return text.removeprefix("\ufeff"), "<string>"
    if text in stdlib_names():
        f = resources.files("mixerc.examples").joinpath(text + ".mx")
        return f.read_text(), f"examples/{text}.mx"
    path = Path(text)
    try:
        is_file = path.suffix == ".mx" or path.exists()
    except (OSError, ValueError):  # not a usable path at all (too long, NUL, ...)
        is_file = False
    if is_file:
        return _read(path), text
    shown = text if len(text) <= 80 else text[:77] + "..."
    raise MixerValueError(f"{shown!r} is neither a file, mixer source, nor a standard mixer",
                          hint="standard mixers: " + ", ".join(stdlib_names()))


def _read(path: Path) -> str:
    """A source file's text. Only regular files are opened: a named pipe would
    block open() forever, a directory or device is no mixer."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise MixerValueError(f"cannot read {path}: {_file_kind(path)}, not a regular file",
                                  hint="give the path of a .mx file")
        # O_NONBLOCK: should the path turn into a pipe after the check, open() still returns
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise MixerValueError(f"cannot read {path}: not a regular file")
            data = f.read()
    except OSError as e:
        raise MixerValueError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_source(data, str(path))


def _file_kind(path: Path) -> str:
    mode = os.stat(path).st_mode
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"it is {word}"
    return "it is a special file"


def decode_source(data: bytes, file: str) -> str:
    """Source bytes as text: strict UTF-8, a leading byte-order mark dropped. A
    byte that is not UTF-8 is an error at its line and column."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start]  # valid UTF-8 up to the bad byte
        line = before.count(b"\n") + 1
        col = len(before[before.rfind(b"\n") + 1:].decode("utf-8")) + 1
        raise MixerSyntaxError(f"the file is not valid UTF-8: byte 0x{data[e.start]:02x} "
                               f"({e.reason})", Loc(file, line, col, line, col + 1),
                               hint="save the file as UTF-8",
                               source=data.decode("utf-8", "replace")) from None


class CompiledMixer:
    """A compiled mixer: call it on tensors, decode with `step`, inspect it.

    Token tensors are [batch, time, *dims], params have their declared shape,
    kernels are [L, *dims]. Outputs come back in the inputs' dtype: one tensor,
    or a tuple when the mixer has several `out`s.
    """

    def __init__(self, program: ir.Program, backend: str = "dense"):
        if not isinstance(program, ir.Program):
            raise MixerValueError("CompiledMixer needs a checked program (use mixerc.compile)")
        self.program = program
        self.name = program.name
        self.backend_name = backends.resolve(backend)
        self.auto = backend == "auto"  # a backend may hand other devices to another
        self._impl = backends.get(backend).compile(self)
        self.signature = self._impl.signature

    @functools.cached_property
    def analysis(self) -> _analysis.Analysis:
        return _analysis.analyze(self.program)

    @functools.cached_property
    def _names(self) -> dict:
        return _analysis._apply_names(self.program)

    @property
    def _check_finite(self):
        """The reference checks everything for NaN/Inf; the fast paths check the
        (small) params and kernels and leave the inputs alone."""
        return self._impl.check_finite

    @property
    def causal(self) -> bool:
        return self.analysis.causal

    @property
    def plan(self):
        """The kernel plan that runs (mixerc/plan/model.py), or None for the
        dense interpreter, which needs none."""
        return getattr(self._impl, "plan", None)

    # ---------------------------------------------------------------- calls
    def __call__(self, /, *, initial_state=None, return_state: bool = False, cu_seqlens=None,
                 **tensors):
        bound = bind(self.signature, tensors, check_finite=self._check_finite,
                     varlen=cu_seqlens is not None)
        if initial_state is not None or return_state:
            self._need_causal("carry a decode state")
        if cu_seqlens is not None:
            return self._varlen(bound, tensors, cu_seqlens, initial_state, return_state)
        outs, state = self._impl.forward(bound, initial_state, return_state)
        y = outs[0] if len(outs) == 1 else tuple(outs)
        return (y, state) if return_state else y

    def _varlen(self, bound, tensors, cu_seqlens, initial_state, return_state):
        outs, states = call.run_varlen(self._impl.forward, self.signature, tensors, cu_seqlens,
                                       initial_state, return_state)
        y = outs[0] if len(outs) == 1 else tuple(outs)
        return (y, states) if return_state else y

    def step(self, state, /, **tensors):
        """One decode step: inputs are [batch, *dims] (no time axis); returns
        (y_t, new_state). Pass state=None at the first token."""
        self._need_causal("decode token by token")
        bound = bind(self.signature, tensors, step=True, check_finite=self._check_finite)
        outs, new = self._impl.step(bound, state)
        return (outs[0] if len(outs) == 1 else tuple(outs)), new

    def stack_states(self, states: list):
        """One decode state for a batch of sequences of different lengths, from
        the states of each (e.g. separate prefills): the Triton backend's decode
        kernels read every sequence's own length. Steps continue it; a block of
        several tokens over sequences of different lengths is refused."""
        if not hasattr(self._impl, "stack_states"):
            raise MixerUnsupportedError(
                f"the {self.backend_name} backend's decode states assume one length for the "
                "whole batch; stack_states needs backend='triton'")
        return self._impl.stack_states(list(states))

    def tuning_problem(self, shape: dict, dtype=torch.float32, device="cpu"):
        """This mixer at one shape as an autotune problem. shape holds every dim
        by name plus B and T (and L, the kernel length, for mixers with
        kernels)."""
        if not hasattr(self._impl, "tuning_problem"):
            raise MixerUnsupportedError(f"the {self.backend_name} backend has nothing to tune; "
                                        "compile with backend='torch'")
        shape = dict(shape)
        missing = [k for k in ("B", "T") if k not in shape]
        if missing:
            raise MixerValueError(f"shape needs {', '.join(missing)} (batch and time)")
        batch, time, kernel_len = shape.pop("B"), shape.pop("T"), shape.pop("L", None)
        sizes = {d.name: d.size for d in self.program.dims.values() if d.size is not None}
        sizes.update(shape)
        unknown = sorted(set(shape) - set(self.program.dims))
        if unknown:
            raise MixerValueError(f"unknown dim(s) {', '.join(unknown)} for {self.name}; "
                                  f"it declares {', '.join(d for d in self.program.dims if not d.isdigit())}")
        absent = [d for d in self.program.dims if d not in sizes]
        if absent:
            raise MixerValueError(f"shape lacks dim(s) {', '.join(absent)}")
        for d in self.program.dims.values():
            if d.divides and sizes[d.divides] % sizes[d.name]:
                raise MixerValueError(f"{d.name} = {sizes[d.name]} does not divide "
                                      f"{d.divides} = {sizes[d.divides]}")
        return self._impl.tuning_problem(sizes, batch, time, dtype, device, kernel_len)

    def init_state(self, batch: int = 1, **dims):
        """The state before the first token (the dense backend keeps history,
        so this is None: `step(None, ...)` starts a sequence)."""
        self._need_causal("decode token by token")
        return None

    def _need_causal(self, what: str):
        if not self.causal:
            raise MixerDecodeError(f"mixer {self.name} cannot {what}: it is not causal. "
                                   f"{self.analysis.reason}",
                                   hint="call it on the whole sequence instead")

    # ---------------------------------------------------------------- inspection
    def materialize(self, /, **tensors) -> dict:
        """The T x T matrices applied by `@`, float64, as name -> [batch, *dims, T, T]."""
        bound = bind(self.signature, tensors, check_finite=True)
        if bound.device.type == "meta":
            name = next(n for n, x in tensors.items() if x.device.type == "meta")
            raise MixerValueError(f"materialize() needs values, but {name} is on the meta "
                                  "device (it holds shapes only)")
        from .dense import DenseBackend
        return DenseBackend(self.program).materialize(bound, self._names)

    def explain(self) -> str:
        """Class, causality and decode state of each matrix, then the plan that
        runs: per term its algorithm, operands, decode state and cost."""
        planned = hasattr(self._impl, "explain")
        text = _analysis.explain(self.program, self.analysis, states=not planned)
        return text + ("\n" + self._impl.explain() if planned else "")

    def source(self, backend: str | None = None) -> str:
        """The code that runs: the typed IR for `dense`, the generated module for
        `torch`."""
        if backend is None or backends.resolve(backend) == self.backend_name:
            return self._impl.source()
        return backends.get(backend).compile(self).source()

    def _runner(self, backend: str):
        return self._impl if self.backend_name == backend else \
            backends.get(backend).compile(self)

    def module(self, /, *, dtype=torch.float32, device=None, seed=None, **dims):
        """A torch.nn.Module owning the params, sized by `dims` (every dim the
        params use, by name, unless the source fixes it), initialized as the
        source declares (`param A_log : [H] = log(uniform(1, 16))`)."""
        sizes = call.sizes_for_module(self.signature, dims)
        init = getattr(self._impl, "init_params", None) or self._runner("torch").init_params
        return call.MixerModule(self, init, sizes, dtype=dtype, device=device, seed=seed)

    def __repr__(self) -> str:
        return f"<CompiledMixer {self.name} backend={self.backend_name} {self.analysis.cls}>"


def compile(path_or_source, backend: str = "auto") -> CompiledMixer:  # noqa: A001
    """Compile a mixer from a .mx path, a standard-library name, or source text."""
    backends.get(backend)  # an unknown or unavailable backend fails before any parsing
    source, file = load_source(path_or_source)
    return CompiledMixer(check(parse(source, file)), backend)


__all__ = ["compile", "CompiledMixer", "MixerError", "stdlib_names", "load_source"]
