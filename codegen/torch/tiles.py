"""Render a softmax's score modification and mask into torch code that runs on
one tile of (query rows) x (key columns) inside the flash template: the
hook where the mixer's own math meets the kernel (FlexAttention's score_mod
and mask_mod, generated from the IR instead of written as Python).

Inside the template's block function every leaf has a fixed name: the raw
dot product `score` [B, Hk, R, K] (R = heads per key head x query rows),
positions `t_pos` [R, 1] and `s_pos` [1, K] (absolute, in the compute dtype
`dtype`: exact below 2^24 in float32), per-token
values `rows[i]` [B, Hk, R, 1] and `cols[j]` [B, Hk, 1, K], per-head values
`heads[p]` [1, Hk, R, 1] (or a Python number). The same IR also renders as
interval arithmetic over whole tiles (`classify`): bounds on every value
per (row block, column block), from which a tile is empty (the mask is
false everywhere), full (true everywhere: no mask evaluated) or partial.
"""

from __future__ import annotations

from mixerc import ir
from mixerc.codegen.names import literal
from mixerc.codegen.torch.emit import BINARY, UNARY, fold, number_kind

# interval arithmetic (runtime/torch/tiles.py): a monotone function maps bounds
# to bounds; the others are left unbounded
MONOTONE_UP = ("exp", "log", "sqrt", "softplus", "sigmoid", "tanh", "relu", "elu",
               "logsigmoid")


class TileLeaves:
    """Which IR nodes are leaves of a tile expression, and their names."""

    def __init__(self, dot: ir.Node | None, leaves: dict, heads: list):
        self.dot = dot          # the q.k node (renders as `score`)
        self.leaves = leaves    # id(Row/Col node) -> operand name (row0, col1, ...)
        self.heads = heads      # static nodes passed per head, in order
        self.kinds: dict = {}   # memo of number_kind

    def leaf(self, n: ir.Node, interval: bool) -> str | None:
        if self.dot is not None and n is self.dot:
            return None if interval else "score"
        if isinstance(n, ir.Index):
            return ("t_iv" if n.which == "t" else "s_iv") if interval else \
                ("t_pos" if n.which == "t" else "s_pos")
        if isinstance(n, (ir.Row, ir.Col)):
            name = self.leaves[id(n)]
            i = int(name[3:])
            group = "rows" if name.startswith("row") else "cols"
            return f"{group}_iv[{i}]" if interval else f"{group}[{i}]"
        kind = number_kind(n, self.kinds)
        if kind == "const":
            value = literal(fold(n))
            return f"({value}, {value})" if interval else value
        if n.type.kind == ir.STATIC:
            if not any(x is n for x in self.heads):
                self.heads.append(n)
            i = next(j for j, x in enumerate(self.heads) if x is n)
            return f"heads_iv[{i}]" if interval else f"heads[{i}]"
        return None


def _ordered(root: ir.Node, leaves: TileLeaves, interval: bool) -> list:
    """(node, leaf name or None), children first, not descending into leaves."""
    out, done, stack = [], {}, [root]
    while stack:
        n = stack[-1]
        if id(n) in done:
            stack.pop()
            continue
        leaf = leaves.leaf(n, interval)
        todo = [] if leaf is not None else [c for c in n.children() if id(c) not in done]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        done[id(n)] = leaf
        out.append((n, leaf))
    return out


# in-place forms: a value computed from the dot product has the tile's full
# shape and is read once, so its op can overwrite it (one pass, no new tile)
INPLACE_UNARY = {"neg": "{x}.neg_()", "exp": "{x}.exp_()", "log": "{x}.log_()",
                 "sqrt": "{x}.sqrt_()", "sigmoid": "{x}.sigmoid_()", "tanh": "{x}.tanh_()",
                 "relu": "{x}.relu_()", "abs": "{x}.abs_()", "silu": "F.silu({x}, inplace=True)",
                 "elu": "F.elu({x}, inplace=True)"}
INPLACE_BINARY = {"add": "{a}.add_({b})", "sub": "{a}.sub_({b})", "mul": "{a}.mul_({b})",
                  "div": "{a}.div_({b})"}


def render(root: ir.Node, leaves: TileLeaves, result: str, inplace: bool = True) -> list:
    """Lines computing `result = <root>` on a tile. With inplace (no gradient
    to record), values computed from the dot product (`score`, full tile
    shape) are updated in place where they are read once, and `x -+ a * b`
    is one addcmul_ (no tile-sized product)."""
    order = _ordered(root, leaves, interval=False)
    parents: dict = {}
    for n, leaf in order:
        if leaf is None:
            for c in n.children():
                parents.setdefault(id(c), []).append(n)
    once = lambda n: len(parents.get(id(n), ())) == 1  # noqa: E731
    full = set()  # ids of values computed from the dot product: the tile's full shape
    for n, leaf in order:
        if leaf == "score" or (leaf is None and not n.type.boolean and
                               any(id(c) in full for c in n.children())):
            full.add(id(n))
    deferred = {}     # id(a * b) -> (a, b) code, folded into its consumer's addcmul_
    lines, names = [], {}

    def owned(n):  # a full-shape temporary nothing else reads: overwrite it
        return inplace and id(n) in full and once(n) and not n.type.boolean

    for n, leaf in order:
        if leaf is not None:
            names[id(n)] = leaf
            continue
        if not isinstance(n, ir.Map):
            raise ValueError(f"internal: {type(n).__name__} in a tile expression")
        args = [names.get(id(a)) for a in n.args]
        booleans = [a.type.boolean for a in n.args]
        consumer = parents.get(id(n), [None])[0] if once(n) else None
        if n.op == "mul" and not any(booleans) and consumer is not None and \
                consumer.op in ("add", "sub") and consumer.args[1] is n and \
                owned(consumer.args[0]) and id(n) not in full:
            deferred[id(n)] = tuple(args)  # x -+ a * b: one addcmul_ below
            continue
        if len(args) == 1:
            if owned(n.args[0]) and n.op in INPLACE_UNARY:
                lines.append(INPLACE_UNARY[n.op].format(x=args[0]))
                names[id(n)] = args[0]
                continue
            expr = UNARY[n.op].format(x=args[0])
        elif n.op == "mul" and booleans[0] != booleans[1]:
            mask, val = args if booleans[0] else args[::-1]
            value = n.args[1] if booleans[0] else n.args[0]
            if owned(value):  # where(mask, x, 0), in place
                lines.append(f"{val}.masked_fill_(~{mask}, 0.0)")
                names[id(n)] = val
                continue
            expr = f"select({mask}, {val}, dtype)"
        elif n.op in ("add", "sub") and id(n.args[1]) in deferred and owned(n.args[0]):
            a_, b_ = deferred[id(n.args[1])]
            x, y = n.args[1].args
            sign = "-" if n.op == "sub" else ""
            if number_kind(x, leaves.kinds) or number_kind(y, leaves.kinds):  # a number factor
                num, other = (a_, b_) if number_kind(x, leaves.kinds) else (b_, a_)
                lines.append(f"{args[0]}.add_({other}, alpha={sign}{num})")
            else:
                lines.append(f"{args[0]}.addcmul_({a_}, {b_}, value={sign or ''}1)")
            names[id(n)] = args[0]
            continue
        elif n.op in INPLACE_BINARY and owned(n.args[0]):
            lines.append(INPLACE_BINARY[n.op].format(a=args[0], b=args[1]))
            names[id(n)] = args[0]
            continue
        elif n.op in ("add", "mul") and owned(n.args[1]):  # commutes: update the right one
            lines.append(INPLACE_BINARY[n.op].format(a=args[1], b=args[0]))
            names[id(n)] = args[1]
            continue
        else:
            expr = BINARY[n.op].format(a=args[0], b=args[1])
        name = result if n is root else f"e{len(lines)}"
        lines.append(f"{name} = {expr}")
        names[id(n)] = name
    if names[id(root)] != result:
        lines.append(f"{result} = {names[id(root)]}")
    return lines


def render_intervals(root: ir.Node, leaves: TileLeaves, result: str) -> list | None:
    """Lines computing `result = (must, may)` for a boolean root over whole
    tiles, or None when some node has no interval rule (then every tile
    inside the band is partial)."""
    lines, names = [], {}
    for n, leaf in _ordered(root, leaves, interval=True):
        if leaf is not None:
            names[id(n)] = leaf
            continue
        if not isinstance(n, ir.Map):
            return None
        args = [names[id(a)] for a in n.args]
        booleans = [a.type.boolean for a in n.args]
        if n.op == "mul" and all(booleans):
            expr = f"iv_and({args[0]}, {args[1]})"
        elif n.op == "mul" and any(booleans):  # a select: value where the mask holds, else 0
            mask, val = args if booleans[0] else args[::-1]
            expr = f"iv_select({mask}, {val})"
        elif n.op in ("add", "sub", "mul", "div", "lt", "le", "gt", "ge", "eq", "ne", "and",
                      "or"):
            expr = f"iv_{n.op}({args[0]}, {args[1]})"
        elif n.op in ("neg", "not", "abs"):
            expr = f"iv_{n.op}({args[0]})"
        elif n.op in MONOTONE_UP:
            expr = f"iv_monotone({n.op!r}, {args[0]})"
        elif n.op == "pow" and number_kind(n.args[1], leaves.kinds) == "const":
            expr = f"iv_pow({args[0]}, {literal(fold(n.args[1]))})"
        else:
            return None
        name = f"i{len(lines)}"
        lines.append(f"{name} = {expr}")
        names[id(n)] = name
    lines.append(f"{result} = {names[id(root)]}")
    return lines
