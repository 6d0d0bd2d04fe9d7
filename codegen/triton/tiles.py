"""A softmax's score modification and mask as Triton code on one tile of
BLOCK_M query rows x BLOCK_N keys, and the derivatives of the scores for the
backward kernels: the hook where the mixer's own math meets the kernel.

Leaves inside the kernels: the raw dot product `s` (float32 [BM, BN]),
positions `t_pos` [BM, 1] and `s_pos` [1, BN] (float32), per-token values
`row{i}` [BM, 1] and `col{j}` [1, BN], per-head values `head{p}` (scalars of
the program's head), and in the backward the score's gradient `ds`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixerc import ir
from mixerc.codegen.torch.emit import fold, number_kind
from mixerc.codegen.torch.tiles import TileLeaves, _ordered
from mixerc.ir import MATRIX, Type

UNARY = {
    "neg": "(-{x})", "exp": "tl.exp({x})", "log": "tl.log({x})", "sqrt": "tl.sqrt({x})",
    "softplus": "_mx_softplus({x})", "sigmoid": "tl.sigmoid({x})",
    "silu": "({x} * tl.sigmoid({x}))", "elu": "tl.where({x} > 0, {x}, tl.exp({x}) - 1.0)",
    "relu": "tl.maximum({x}, 0.0)", "tanh": "_mx_tanh({x})", "abs": "tl.abs({x})",
    "logsigmoid": "(-_mx_softplus(-{x}))", "not": "({x} == 0)",
}
BINARY = {
    "add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})", "div": "({a} / {b})",
    "pow": "_mx_pow({a}, {b})", "lt": "({a} < {b})", "le": "({a} <= {b})",
    "gt": "({a} > {b})", "ge": "({a} >= {b})", "eq": "({a} == {b})", "ne": "({a} != {b})",
    "and": "({a} & {b})", "or": "({a} | {b})",
}


def triton_literal(value) -> str:
    """A number as Triton source (inf and nan as float("...")), or a bool."""
    if isinstance(value, bool):
        return repr(value)
    if value != value:
        return 'float("nan")'
    if value in (float("inf"), float("-inf")):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(float(value))


@dataclass(frozen=True, eq=False)
class Seed(ir.Node):
    """The gradient of the scores in a backward tile (renders as `ds`)."""

    def label(self):
        return "seed"


class Leaves(TileLeaves):
    """TileLeaves with the Triton kernels' names."""

    def leaf(self, n: ir.Node, interval: bool = False) -> str | None:
        if isinstance(n, Seed):
            return "ds"
        if interval:
            return super().leaf(n, True)
        if self.dot is not None and n is self.dot:
            return "s"
        if isinstance(n, ir.Index):
            return "t_pos" if n.which == "t" else "s_pos"
        if isinstance(n, (ir.Row, ir.Col)):
            return self.leaves[id(n)]  # row0, col1, ...
        if number_kind(n, self.kinds) == "const":
            return triton_literal(fold(n))
        name = super().leaf(n, False)
        if name is not None and name.startswith("heads["):
            return f"head{name[6:-1]}"
        return name


def render(root: ir.Node, leaves: Leaves, result: str) -> list:
    """Lines computing `result = <root>` in a Triton kernel."""
    lines, names = [], {}
    for n, leaf in _ordered(root, leaves, interval=False):
        if leaf is not None:
            names[id(n)] = leaf
            continue
        if not isinstance(n, ir.Map):
            raise ValueError(f"internal: {type(n).__name__} in a tile expression")
        args = [names[id(a)] for a in n.args]
        if len(args) == 1:
            expr = UNARY[n.op].format(x=args[0])
        elif n.op == "mul" and n.args[0].type.boolean != n.args[1].type.boolean:
            mask, val = args if n.args[0].type.boolean else args[::-1]
            expr = f"tl.where({mask}, {val}, 0.0)"
        elif n.op == "mul" and n.args[0].type.boolean:
            expr = f"({args[0]} & {args[1]})"
        else:
            expr = BINARY[n.op].format(a=args[0], b=args[1])
        name = result if n is root else f"{result}_{len(lines)}"
        lines.append(f"{name} = {expr}")
        names[id(n)] = name
    if names[id(root)] != result:
        lines.append(f"{result} = {names[id(root)]}")
    return lines


# ------------------------------------------------------------------ gradients


def map_of(op, *args) -> ir.Node:
    """The elementwise node op(*args) (the derivative rules build their
    expressions of these; prologue.scalar_grads too)."""
    boolean = op in ir.COMPARE_OPS or op in ir.LOGIC_OPS
    return ir.Map(Type(MATRIX, boolean=boolean), op=op, args=tuple(args))


def _c(value: float) -> ir.Node:
    return ir.Const(Type(ir.STATIC), value=float(value))


def local_grad(n: ir.Map, i: int, g: ir.Node) -> ir.Node | None:
    """The gradient n's argument i receives when n receives g (None: none)."""
    a = n.args
    x = a[0]
    op = n.op
    if op in ir.COMPARE_OPS or op in ir.LOGIC_OPS or op == "not":
        return None
    if a[i].type.boolean:
        return None  # a mask carries no gradient
    if op == "add":
        return g
    if op == "sub":
        return g if i == 0 else map_of("neg", g)
    if op == "mul":  # (times a mask: where(mask, g, 0))
        return map_of("mul", g, a[1 - i])
    if op == "div":
        if i == 0:
            return map_of("div", g, a[1])
        return map_of("neg", map_of("div", map_of("mul", g, n), a[1]))  # -g a / b^2 = -g n / b
    if op == "pow":
        b = a[1]
        if i == 0:
            return map_of("mul", g, map_of("mul", b, map_of("pow", x, map_of("sub", b, _c(1.0)))))
        return map_of("mul", g, map_of("mul", n, map_of("log", x)))
    if op == "neg":
        return map_of("neg", g)
    if op == "exp":
        return map_of("mul", g, n)
    if op == "log":
        return map_of("div", g, x)
    if op == "sqrt":
        return map_of("div", g, map_of("mul", _c(2.0), n))
    if op == "softplus":
        return map_of("mul", g, map_of("sigmoid", x))
    if op == "sigmoid":
        return map_of("mul", g, map_of("mul", n, map_of("sub", _c(1.0), n)))
    if op == "silu":
        sg = map_of("sigmoid", x)  # silu' = sg + x sg (1 - sg)
        slope = map_of("mul", x, map_of("mul", sg, map_of("sub", _c(1.0), sg)))
        return map_of("mul", g, map_of("add", sg, slope))
    if op == "elu":
        return map_of("mul", g, map_of("add", map_of("mul", map_of("gt", x, _c(0.0)), _c(1.0)),
                                       map_of("mul", map_of("le", x, _c(0.0)), map_of("exp", x))))
    if op == "relu":
        return map_of("mul", map_of("gt", x, _c(0.0)), g)
    if op == "tanh":
        return map_of("mul", g, map_of("sub", _c(1.0), map_of("mul", n, n)))
    if op == "abs":
        sign = map_of("sub", map_of("mul", map_of("gt", x, _c(0.0)), _c(1.0)),
                      map_of("mul", map_of("lt", x, _c(0.0)), _c(1.0)))
        return map_of("mul", g, sign)
    if op == "logsigmoid":
        return map_of("mul", g, map_of("sigmoid", map_of("neg", x)))
    raise ValueError(f"internal: no derivative for {op}")


def gradients(root: ir.Node, leaves: Leaves) -> dict:
    """{leaf name: IR of d(root)/d(leaf) * ds} for the leaves with a gradient:
    the dot product (`s`), per-token values (`row0`, `col1`) and per-head
    values (`head0`). Reverse mode over the expression, with the seed `ds`."""
    order = [n for n, _ in _ordered(root, leaves, interval=False)]
    adjoint: dict = {id(root): Seed(Type(MATRIX))}
    out: dict = {}
    for n in reversed(order):
        g = adjoint.get(id(n))
        if g is None:
            continue
        name = leaves.leaf(n)
        if name is not None:
            if name == "s" or name.startswith(("row", "col", "head")):
                out[name] = g
            continue
        if not isinstance(n, ir.Map):
            continue
        for i, a in enumerate(n.args):
            if number_kind(a, leaves.kinds) == "const" or isinstance(a, ir.Index):
                continue
            local = local_grad(n, i, g)
            if local is None:
                continue
            prev = adjoint.get(id(a))
            adjoint[id(a)] = local if prev is None else map_of("add", prev, local)
    return out



def render_gradients(root: ir.Node, leaves: Leaves) -> tuple:
    """(lines, row indices, col indices, head indices): lines defining `d_s`
    (the gradient of the raw dot product; zeros when the scores do not read
    it) and `d_row{i}`, `d_col{j}`, `d_head{p}` for the values the scores
    differentiate, from the score gradient `ds`."""
    grads = gradients(root, leaves)
    lines = []
    for name in sorted(grads, key=lambda n: (n != "s", n)):
        lines += render(grads[name], leaves, f"d_{name}")
    if "s" not in grads:
        lines.append("d_s = tl.zeros_like(ds)")
    which = lambda prefix: sorted(int(n[len(prefix):]) for n in grads  # noqa: E731
                                  if n.startswith(prefix))
    return lines, which("row"), which("col"), which("head")
