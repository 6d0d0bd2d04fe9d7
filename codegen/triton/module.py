"""A mixer's module for the Triton backend: the torch backend's module
(codegen/torch/module.py) with the terms that have Triton kernels rendered
from codegen/triton/templates, and their inputs read as given (no float32
copy of a bf16 q, k, v before a kernel that reads bf16 anyway)."""

from __future__ import annotations

import re
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
        """A division in the kernel: y[..., :V] is the quotient, and nothing
        reads the denominator's column."""
        if self.fuses_divide(mp):
            quotient = self.assign(f"{y}[..., :{self.size_expr(widths[0])}]", hint="y")
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
        """Only the inputs something besides the kernels reads."""
        code = "\n".join(self.lines + [self.value(n) for n in self.program.outs.values()])
        code = re.sub(r"'[^'\n]*'|\"[^\"\n]*\"", "", code)  # state keys name no variable
        return [self.args[n] for n in self.program.inputs
                if n not in self.raw or re.search(rf"\b{re.escape(self.args[n])}\b", code)]


def generate(plan: ModulePlan, standalone: bool = False) -> tuple[str, dict, dict, dict]:
    """(module source, default config, config choices, kernel dims)."""
    w = TritonWriter(plan)
    src = w.render(standalone=standalone)
    return src, dict(w.config), dict(w.spaces), dict(w.kernel_dims)
