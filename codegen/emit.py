"""Emit PyTorch code for the token-level part of a program.

Each token / static / kernel IR node becomes one line `vN = <expr>` in the
generated forward. Layouts are known at compile time, so broadcasting is
spelled out as indexing (`x[..., None]`), `.permute(...)` and group expansion
(`.repeat_interleave(H // G, dim=2)`): the generated code reads like
hand-written torch.

Axes: tokens ("b", "t", *dims), statics (*dims), kernels ("l", *dims).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixerc import ir
from mixerc.ir import KERNEL, STATIC, TOKEN

PREFIX = ("b", "t", "l")

UNARY = {
    "neg": "(-{x})", "exp": "torch.exp({x})", "log": "torch.log({x})", "sqrt": "torch.sqrt({x})",
    "softplus": "F.softplus({x})", "sigmoid": "torch.sigmoid({x})", "silu": "F.silu({x})",
    "elu": "F.elu({x})", "relu": "torch.relu({x})", "tanh": "torch.tanh({x})",
    "abs": "torch.abs({x})", "logsigmoid": "F.logsigmoid({x})", "not": "(~{x})",
}
# the same ops on Python floats (constants and dim sizes fold to plain numbers)
SCALAR_UNARY = {
    "neg": "(-{x})", "exp": "math.exp({x})", "log": "math.log({x})", "sqrt": "math.sqrt({x})",
    "softplus": "math.log1p(math.exp({x}))", "sigmoid": "(1.0 / (1.0 + math.exp(-{x})))",
    "silu": "({x} / (1.0 + math.exp(-{x})))", "elu": "({x} if {x} > 0 else math.expm1({x}))",
    "relu": "max({x}, 0.0)", "tanh": "math.tanh({x})", "abs": "abs({x})",
    "logsigmoid": "(-math.log1p(math.exp(-{x})))", "not": "(not {x})",
}
BINARY = {
    "add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})", "div": "({a} / {b})",
    "pow": "torch.pow({a}, {b})", "lt": "({a} < {b})", "le": "({a} <= {b})",
    "gt": "({a} > {b})", "ge": "({a} >= {b})", "eq": "({a} == {b})", "ne": "({a} != {b})",
    "and": "({a} & {b})", "or": "({a} | {b})",
}


def axes_of(node: ir.Node) -> tuple:
    kind = node.type.kind
    prefix = {TOKEN: ("b", "t"), STATIC: (), KERNEL: ("l",)}.get(kind, ())
    return prefix + node.type.axes


def dim_expr(dim: str) -> str:
    """The generated code keeps every dim size in a local of the same name;
    literal dims (`[E, 4]`) are numbers."""
    return dim if not dim.isdigit() else dim


@dataclass
class Emitter:
    """Writes straight-line code; `lines` is the body, `names[id(node)]` the
    variable holding each emitted node."""

    program: ir.Program
    lines: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    counter: int = 0

    def __post_init__(self):
        self.groups = self.program.groups
        self.let_names = {id(n): k for k, n in self.program.lets.items()}

    def fresh(self, hint: str = "v") -> str:
        self.counter += 1
        return f"{hint}{self.counter}"

    def line(self, text: str):
        self.lines.append(text)

    # ---------------------------------------------------------------- layout
    def group_map(self, src: tuple, dst: tuple) -> dict:
        """Group dims of src that dst names by their head dim: {G: H}."""
        out = {}
        for a in src:
            h = self.groups.get(a)
            if h and h in dst and a not in dst and h not in src:
                out[a] = h
        return out

    def convert(self, expr: str, src: tuple, dst: tuple, expand: bool = False) -> str:
        """Code turning a value laid out as `src` into layout `dst` (a superset of
        src after group renames): expand groups, permute, insert broadcast axes;
        with expand=True also materialize the broadcast axes at full size."""
        gm = self.group_map(src, dst)
        axes = list(src)
        for i, a in enumerate(axes):
            if a in gm:
                h = gm[a]
                expr = f"{expr}.repeat_interleave({dim_expr(h)} // {dim_expr(a)}, dim={i})"
                axes[i] = h
        missing = [a for a in axes if a not in dst]
        assert not missing, (src, dst)
        order = [a for a in dst if a in axes]
        if order != axes:
            expr = f"{expr}.permute({', '.join(str(axes.index(a)) for a in order)})"
        if len(order) < len(dst):
            first = dst.index(order[0]) if order else len(dst)
            idx = []
            for a in dst[first:]:
                idx.append(":" if a in order else "None")
            while idx and idx[-1] == ":":
                idx.pop()
            if idx and "None" in idx:
                if all(i == "None" for i in idx[len(order):]) and idx[:len(order)] == \
                        [":"] * len(order):
                    idx = ["..."] + idx[len(order):]
                expr = f"{expr}[{', '.join(idx)}]"
            if expand:
                size = ", ".join(_size(a) for a in dst)
                expr = f"{expr}.expand({size})"
        return expr

    # ---------------------------------------------------------------- nodes
    def value(self, node: ir.Node) -> str:
        """Variable name (or literal) holding node; emits it on first use."""
        if id(node) in self.names:
            return self.names[id(node)]
        name = getattr(self, "e_" + type(node).__name__)(node)
        self.names[id(node)] = name
        return name

    def assign(self, node: ir.Node, expr: str, hint: str = "v") -> str:
        name = self.fresh(hint)
        note = f"  # {self.let_names[id(node)]}" if id(node) in self.let_names else ""
        axes = axes_of(node)
        self.line(f"{name} = {expr}{note or ''}  # [{', '.join(axes)}]" if not note
                  else f"{name} = {expr}{note} [{', '.join(axes)}]")
        return name

    def e_Input(self, node):
        return node.name

    def e_Param(self, node):
        return node.name

    def e_KernelRef(self, node):
        return node.name

    def e_Const(self, node):
        return repr(float(node.value))

    def e_DimSize(self, node):
        return f"float({dim_expr(node.dim)})"

    def e_Random(self, node):
        a, b = (self.value(x) for x in node.args)
        shape = "(" + "".join(f"{dim_expr(d)}, " for d in node.type.dims) + ")"
        draw = "torch.rand" if node.dist == "uniform" else "torch.randn"
        scale = f"({b} - {a})" if node.dist == "uniform" else b
        return self.assign(node, f"{draw}({shape}, generator=generator, dtype=torch.float64, "
                                 f"device=device) * {scale} + {a}")

    def e_Taps(self, node):
        return self.assign(node, f"{self.value(node.w)}.movedim(-1, 0)", "taps")

    def is_number(self, node: ir.Node) -> bool:
        """A value computed from constants and dim sizes only: a Python float."""
        return node.type.kind == STATIC and not node.type.dims and all(
            isinstance(n, (ir.Const, ir.DimSize, ir.Map)) for n in ir.walk(node))

    def e_Map(self, node):
        args = node.args
        if self.is_number(node):
            if len(args) == 1:
                return self.assign(node, SCALAR_UNARY[node.op].format(x=self.value(args[0])))
            op = "**" if node.op == "pow" else None
            if op:
                return self.assign(node, f"({self.value(args[0])} ** {self.value(args[1])})")
        if len(args) == 1:
            return self.assign(node, UNARY[node.op].format(x=self.value(args[0])))
        a, b = args
        dst = axes_of(node)
        ea = self.aligned(a, dst)
        eb = self.aligned(b, dst)
        if node.op == "mul" and a.type.boolean != b.type.boolean:
            mask, val = (ea, eb) if a.type.boolean else (eb, ea)
            return self.assign(node, f"torch.where({mask}, {val}, 0.0)")
        return self.assign(node, BINARY[node.op].format(a=ea, b=eb))

    def aligned(self, node: ir.Node, dst: tuple) -> str:
        if isinstance(node, (ir.Const, ir.DimSize)):
            return self.value(node)
        src = axes_of(node)
        # statics broadcast against tokens from the right: skip their leading axes
        return self.convert(self.value(node), src, tuple(a for a in dst if a in src or
                                                       a not in PREFIX or
                                                       any(p in src for p in PREFIX)))

    def e_Sum(self, node):
        axes = axes_of(node.x)
        return self.assign(node, f"{self.value(node.x)}.sum({axes.index(node.dim)})")

    def e_Rev(self, node):
        return self.assign(node, f"{self.value(node.x)}.flip(1)")

    def e_Shift(self, node):
        # token shift with a carried buffer of the last k values (decode state)
        x = self.value(node.x)
        key = self.state_key(node)
        name = self.fresh("v")
        self.line(f"{name}, new_state[{key!r}] = shift_tokens({x}, {node.k}, "
                  f"state.get({key!r}))  # [{', '.join(axes_of(node))}]")
        return name

    def state_key(self, node) -> str:
        return f"shift{self.counter}"


def _size(axis: str) -> str:
    return {"b": "batch", "t": "time", "l": "-1"}.get(axis, dim_expr(axis))
