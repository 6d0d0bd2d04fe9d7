"""A mixer's module for the Triton backend: the torch backend's module
(codegen/torch/module.py) with the terms that have Triton kernels rendered
from codegen/triton/templates, and their inputs read as given (no float32
copy of a bf16 q, k, v before a kernel that reads bf16 anyway)."""

from __future__ import annotations

import ast
from dataclasses import replace

from mixerc import ir
from mixerc.codegen.torch.emit import axes_of
from mixerc.codegen.torch.module import Writer, _env
from mixerc.plan import value_dims
from mixerc.plan.model import ModulePlan

from . import terms
from .terms import quasiseparable


class TritonWriter(Writer):
    backend = "triton"
    terms = terms.BY_STRATEGY
    base_header = ("import triton", "import triton.language as tl")

    @property
    def header(self) -> tuple:
        """Import lines: triton where the module has kernels, Optional for a
        chunked kernel's op signature."""
        typing = any("Optional[" in f for f in self.functions)
        kernels = any("@triton.jit" in f for f in self.functions)
        return (("from typing import Optional",) if typing else ()) + \
            (self.base_header if kernels else ())

    def __init__(self, plan: ModulePlan):
        super().__init__(plan)
        self.raw: dict = {}  # input name -> variable holding it as given
        self.kernel_dims: dict = {}  # host function -> (config key, q dims, value dims)
        # variables holding a divided y's quotient alone (the chunked kernels'
        # divide=True): no normalizer column to slice off
        self.quotients: set = set()

    def environment(self):
        return _env("mixerc.codegen.triton")

    def e_Map(self, node: ir.Map) -> str:
        """M @ u + d * u where the plan found a skip term and M's kernel adds
        it in its epilogue (terms/chunked.py): the application's output is
        the sum."""
        for mp in self.plan.matrices:
            if mp.skip is not None and mp.skip[0] is node and (
                    terms.chunked.fuses_skip(mp) or terms.scan.fuses_skip(mp, self.groups)):
                return self.value(mp.applies[0])
            if mp.divide is node and self.fuses_divide(mp):
                return self.value(mp.applies[0])  # (M @ v) / (M @ 1), divided in the kernel
        return super().e_Map(node)

    def emit_matrix(self, mp):
        """A quasiseparable pair (a term, its reversed twin, a diagonal) in one
        pair of launches (terms/quasiseparable.py); anything else term by term."""
        pair = quasiseparable.pair(mp)
        if pair is None:
            return super().emit_matrix(mp)
        self.line(f"# {mp.name}: {mp.info.cls}, both passes and the diagonal fused")
        y = quasiseparable.emit(mp, self, *pair)
        self.split_outputs(mp, y, [value_dims(a, mp.heads, self.groups) for a in mp.applies])

    def split_outputs(self, mp, y, widths):
        """A division in the kernel: y[..., :V] is the quotient (or y itself,
        from the chunked kernels), and nothing reads the denominator's column."""
        if self.fuses_divide(mp):
            quotient = y if y in self.quotients else \
                self.assign(f"{y}[..., :{self.size_expr(widths[0])}]", hint="y")
            return super().split_outputs(replace(mp, applies=mp.applies[:1]), quotient,
                                         widths[:1])
        return super().split_outputs(mp, y, widths)

    def fuses_divide(self, mp) -> bool:
        """Whether M's kernel divides (M @ v) / (M @ 1) itself (MatrixPlan.divide):
        its y is then [n / m, m] (terms/chunked.py and terms/poly.py emit it)."""
        return terms.chunked.fuses_divide(mp)

    def own_values(self, tp) -> bool:
        """Terms whose kernels read the values as given (no float32 copy)."""
        # (the per-channel chunks' emitter takes the values as the torch backend builds
        # them: a lone scan term builds them in that branch only)
        return super().own_values(tp) or terms.chunked.handles(tp) or terms.poly.handles(tp) \
            or (terms.scan.handles(tp) and any(
                len(m.terms) == 1 and m.terms[0] is tp for m in self.plan.matrices))

    def canon_mm(self, node: ir.Node, heads: tuple, tail: tuple, hint: str = "v") -> str:
        """canon(...) in the matmuls' dtype (MM_DTYPE: the inputs'); an input
        is read as given, so a kernel's bf16 operand is never a float32 copy."""
        if not isinstance(node, ir.Input):
            return self.assign(f"{self.canon(node, heads, tail, hint)}.to(MM_DTYPE)", hint=hint)
        return self.assign(f"{self._raw(node, heads, tail)}.to(MM_DTYPE)", hint=hint)

    def canon_raw(self, node: ir.Node, heads: tuple, tail: tuple, hint: str = "v") -> str:
        """canon(...) of an input as given (its own dtype: what a kernel reads and
        converts on load), of anything else in DTYPE."""
        if not isinstance(node, ir.Input):
            return self.canon(node, heads, tail, hint)
        return self.assign(self._raw(node, heads, tail), hint=hint)

    def _raw(self, node: ir.Input, heads: tuple, tail: tuple) -> str:
        """An input as given at [batch, time, prod(heads)(, prod(tail))], as an expression."""
        if node.name not in self.raw:
            self.raw[node.name] = self.namer.claim(self.args[node.name] + "_in")
        dst = ("b", "t") + tuple(heads) + tuple(tail)
        expr = self.convert(self.raw[node.name], axes_of(node), dst, expand=True)
        if not (len(heads) == 1 and len(tail) <= 1):
            expr = f"{expr}.reshape(batch, time, {self.size_expr(heads)}" + \
                (f", {self.size_expr(tail)})" if tail else ")")
        return expr

    def raw_inputs(self) -> list:
        return [(raw, self.args[n]) for n, raw in self.raw.items()]

    def input_casts(self) -> list:
        """The inputs converted to DTYPE at the top of the forward: those read
        in DTYPE outside any branch (cast_sites)."""
        return [name for name, at in self.cast_sites().items() if at is None]

    def body_lines(self) -> list:
        """The body with the casts of inputs that only one branch reads in
        DTYPE (a torch fallback, the chunked arm of a scan-or-chunks choice)
        at that branch's first use: a bf16 input the kernels read as given is
        not copied to float32 on the path that runs them."""
        lines = list(self.lines)
        at: dict = {}
        for name, i in self.cast_sites().items():
            if i is not None:
                at.setdefault(i, []).append(name)
        for i in sorted(at, reverse=True):
            indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            names = at[i]
            one = "," if len(names) == 1 else ""
            lines.insert(i, f"{indent}{', '.join(names)}{one} = "
                            f"({', '.join(n + '.to(DTYPE)' for n in names)}{one})")
        return lines

    def cast_sites(self) -> dict:
        """{input variable: None (cast at the top) or the index of the body
        line its cast precedes}, for the inputs the code reads in DTYPE (not
        as given): the innermost if-arm holding every read, before its first."""
        code = ["def forward():"] + ["    " + ln for ln in self.lines] + \
            ["    return (" + ", ".join(self.value(n) for n in self.program.outs.values()) + ",)"]
        tree = ast.parse("\n".join(code)).body[0]
        sites = {}
        for n in self.program.inputs:
            name = self.args[n]
            site = _cast_site(tree.body, name, top=True)
            if site is not False:
                sites[name] = site
        return sites


def _reads(node: ast.AST, name: str) -> bool:
    return any(isinstance(x, ast.Name) and x.id == name for x in ast.walk(node))


def _cast_site(block: list, name: str, top: bool):
    """Where `name`'s cast goes in a block of statements: False when nothing
    reads it, None for the forward's top, else the body index of the first
    statement reading it (lineno 1 is the def line). Descends into an if
    whose one arm holds every read (never a loop: a cast there would repeat)."""
    readers = [s for s in block if _reads(s, name)]
    if not readers:
        return False
    if len(readers) == 1 and isinstance(readers[0], ast.If) and \
            not _reads(readers[0].test, name):
        arms = [a for a in (readers[0].body, readers[0].orelse)
                if any(_reads(s, name) for s in a)]
        if len(arms) == 1:
            return _cast_site(arms[0], name, top=False)
    return None if top else readers[0].lineno - 2


def generate(plan: ModulePlan, standalone: bool = False) -> tuple[str, dict, dict, dict]:
    """(module source, default config, config choices, kernel dims)."""
    w = TritonWriter(plan)
    src = w.render(standalone=standalone)
    return src, dict(w.config), dict(w.spaces), dict(w.kernel_dims)
