"""Emit PyTorch code for the token-level part of a program.

Each token / static / kernel IR node becomes one line `name = <expr>` in the
generated forward, named after its `let` when it has one. Layouts are known
at compile time, so broadcasting is spelled out as indexing (`x[..., None]`),
`.permute(...)` and group expansion (`.repeat_interleave(H // G, dim=2)`):
the generated code reads like hand-written torch.

Every identifier comes from a `Namer` (codegen/names.py), so user names can
be anything the language accepts. Numbers (constants, dim sizes and math on
them) follow the dense interpreter's float64 semantics (runtime/torch/scalars.py):
constant ones are folded here into literals, dim-dependent ones are computed
by `number(...)` at run time.

Axes: tokens ("b", "t", *dims), statics (*dims), kernels ("l", *dims).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixerc import ir
from mixerc.codegen.names import Namer, literal
from mixerc.ir import KERNEL, STATIC, TOKEN
from mixerc.runtime.torch.scalars import number

PREFIX = ("b", "t", "l")

UNARY = {
    "neg": "(-{x})", "exp": "torch.exp({x})", "log": "torch.log({x})", "sqrt": "torch.sqrt({x})",
    "softplus": "F.softplus({x})", "sigmoid": "torch.sigmoid({x})", "silu": "F.silu({x})",
    "elu": "F.elu({x})", "relu": "torch.relu({x})", "tanh": "torch.tanh({x})",
    "abs": "torch.abs({x})", "logsigmoid": "F.logsigmoid({x})", "not": "(~{x})",
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


def number_kind(node: ir.Node, memo: dict | None = None) -> str | None:
    """"const" for a number built from constants only (folded at code
    generation), "dims" for one that reads a dim size (a Python number at run
    time), None for anything else. memo: id(node) -> kind, shared across calls."""
    memo = {} if memo is None else memo
    stack = [node]
    while stack:  # children before parents, without recursion (deep programs)
        n = stack[-1]
        if id(n) in memo:
            stack.pop()
            continue
        todo = [c for c in n.children() if id(c) not in memo]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        if n.type.kind != STATIC or n.type.dims:
            memo[id(n)] = None
        elif isinstance(n, ir.Const):
            memo[id(n)] = "const"
        elif isinstance(n, ir.DimSize):
            memo[id(n)] = "dims"
        elif isinstance(n, ir.Map):
            kinds = [memo[id(c)] for c in n.args]
            memo[id(n)] = None if None in kinds else "dims" if "dims" in kinds else "const"
        else:
            memo[id(n)] = None
    return memo[id(node)]


def fold(node: ir.Node):
    """The value of a constant number (float or bool), float64 semantics."""
    values: dict = {}
    for n in ir.walk(node):
        if isinstance(n, ir.Const):
            values[id(n)] = float(n.value)
        else:
            values[id(n)] = number(n.op, *(values[id(a)] for a in n.args))
    return values[id(node)]


@dataclass
class Emitter:
    """Writes straight-line code; `lines` is the body, `names[id(node)]` the
    variable (or literal) holding each emitted node. `dtype` is the code for
    the compute dtype where the code runs."""

    program: ir.Program
    namer: Namer = field(default_factory=Namer)
    dtype: str = "DTYPE"
    lines: list = field(default_factory=list)
    names: dict = field(default_factory=dict)

    def __post_init__(self):
        p = self.program
        self.groups = p.groups
        self.let_names = {id(n): k for k, n in p.lets.items()}
        self.args = {n: self.namer.claim(n) for n in [*p.inputs, *p.params, *p.kernels]}
        self.dim_names = {d: self.namer.claim(d) for d in p.dims if not d.isdigit()}
        self.used_dims: list = []     # dims the code reads, in first-use order
        self.state_keys: list = []    # keys of the decode state the code reads and writes
        self.shift_keys = 0
        self.number_kinds: dict = {}  # memo of number_kind
        self.hints: dict = {}         # id(node) -> the name its role suggests

    def is_number(self, node: ir.Node) -> bool:
        """A value computed from constants and dim sizes only: a Python number."""
        return number_kind(node, self.number_kinds) is not None

    def fresh(self, hint: str = "v") -> str:
        return self.namer.claim(hint)

    def line(self, text: str):
        self.lines.append(text)

    def state(self, key: str) -> tuple:
        """(read, write) code for the decode-state entry `key`."""
        self.state_keys.append(key)
        return f"state.get({key!r})", f"new_state[{key!r}]"

    def dim(self, d: str) -> str:
        """The local holding dim d's size (a literal dim is its number)."""
        if d.isdigit():
            return d
        if d not in self.used_dims:
            self.used_dims.append(d)
        return self.dim_names[d]

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
                expr = f"{expr}.repeat_interleave({self.dim(h)} // {self.dim(a)}, dim={i})"
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
                size = ", ".join(self.size(a) for a in dst)
                expr = f"{expr}.expand({size})"
        return expr

    def size(self, axis: str) -> str:
        return {"b": "batch", "t": "time", "l": "-1"}.get(axis) or self.dim(axis)

    # ---------------------------------------------------------------- nodes
    def value(self, node: ir.Node, hint: str | None = None) -> str:
        """Variable name (or literal) holding node; emits it on first use, named
        after its `let`, else after `hint` (the operand role it plays), else v."""
        if id(node) in self.names:
            return self.names[id(node)]
        if number_kind(node, self.number_kinds) == "const":
            name = literal(fold(node))
        else:
            if hint and id(node) not in self.hints:
                self.hints[id(node)] = hint
            name = getattr(self, "e_" + type(node).__name__)(node)
        self.names[id(node)] = name
        return name

    def assign(self, node: ir.Node, expr: str, hint: str = "v") -> str:
        if expr.isidentifier():  # already a variable: no `a = b` lines
            return expr
        let = self.let_names.get(id(node))
        name = self.fresh(let or self.hints.get(id(node)) or hint)
        self.line(f"{name} = {expr}  # [{', '.join(axes_of(node))}]")
        return name

    def e_Input(self, node):
        return self.args[node.name]

    e_Param = e_KernelRef = e_Input

    def e_DimSize(self, node):
        return f"float({self.dim(node.dim)})"

    def e_Random(self, node):
        a, b = (self.value(x) for x in node.args)
        shape = "(" + "".join(f"{self.dim(d)}, " for d in node.type.dims) + ")"
        draw = "torch.rand" if node.dist == "uniform" else "torch.randn"
        scale = f"({b} - {a})" if node.dist == "uniform" else b
        return self.assign(node, f"{draw}({shape}, generator=generator, dtype=torch.float64, "
                                 f"device=device) * {scale} + {a}")

    def e_Taps(self, node):
        return self.assign(node, f"{self.value(node.w)}.movedim(-1, 0)", "taps")

    def e_Map(self, node):
        args = node.args
        if self.is_number(node):  # needs a dim size: float64 semantics at run time
            values = ", ".join(self.value(a) for a in args)
            return self.assign(node, f"number({node.op!r}, {values})")
        if len(args) == 1:
            return self.assign(node, UNARY[node.op].format(x=self.value(args[0])))
        a, b = args
        dst = axes_of(node)
        ea = self.aligned(a, dst)
        eb = self.aligned(b, dst)
        if node.op == "mul" and a.type.boolean != b.type.boolean:
            mask, val = (ea, eb) if a.type.boolean else (eb, ea)
            return self.assign(node, f"select({mask}, {val}, {self.dtype})")
        return self.assign(node, BINARY[node.op].format(a=ea, b=eb))

    def aligned(self, node: ir.Node, dst: tuple) -> str:
        if self.is_number(node):
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
        self.shift_keys += 1
        read, write = self.state(f"shift{self.shift_keys}")
        name = self.fresh("shifted")
        self.line(f"{name}, {write} = shift_tokens({x}, {node.k}, {read})  "
                  f"# [{', '.join(axes_of(node))}]")
        return name
