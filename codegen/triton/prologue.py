"""The elementwise math a chunked kernel computes on load (the plan's
prologues): a feature map of q or k (linear attention's elu(q) + 1), and
the log-decay and key scale from per-token and per-head values (SSD's
-exp(A_log) * softplus(dt + dt_bias) and softplus(dt + dt_bias), RetNet's
per-head log_gamma), so none of them is written to HBM before the kernels.

Each map is rendered twice from the same IR: as a Triton expression for the
kernels (the chunk kernels and the decode step's) and as a torch expression
for the paths that run without them (float64, a single step while traced or
with gradients, the backward's recomputation). What is not a map of
this shape stays the torch backend's code before the kernel.

Leaves inside the kernels' expressions: `x` (the q or k tile in float32) for
a feature map; `l0`, `l1`, ... (per-token [BT] or per-head scalars, float32)
for the log-decay and the key scale. The per-channel scan
(terms/scan.py) renders its scalar maps (Mamba's delta and the values'
scale) by scalar_map too, and the per-channel chunks' cumsum kernel
(terms/per_channel.py decay_map) its log-decay at the heads and the
contracted dim (leaves [B, T, H, K] and [H, K])."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mixerc import ir
from mixerc.codegen.torch.emit import BINARY as TORCH_BINARY
from mixerc.codegen.torch.emit import UNARY as TORCH_UNARY
from mixerc.codegen.names import literal
from mixerc.codegen.torch.emit import axes_of, fold, number_kind
# (tiles' local derivatives: a scalar map's chain rule in a backward kernel)
from mixerc.codegen.triton.tiles import BINARY, UNARY, Seed, local_grad, map_of, triton_literal

# the ops a map may use: smooth elementwise math (no comparisons or masks)
OPS = {"neg", "exp", "log", "sqrt", "softplus", "sigmoid", "silu", "elu", "relu", "tanh",
       "abs", "logsigmoid", "add", "sub", "mul", "div"}


@dataclass
class Map:
    """One operand as an expression of leaves: `triton` and `torch` source
    over the names of `leaves` (ir nodes, in order)."""

    triton: str
    torch: str
    leaves: list = field(default_factory=list)
    # a feature map's derivative times `y` (Triton source over `x` and `y`), or
    # None: the backward's dq and dk runs take its chain rule in their epilogue
    grad: str | None = None


@dataclass
class Prologue:
    """The maps of one chunked term (None: the operand is read as given)."""

    q: Map | None = None
    k: Map | None = None
    a: Map | None = None        # the log-decay per token and head
    w: Map | None = None        # the keys' scale per token and head
    leaves: list = field(default_factory=list)  # the scalar maps' leaves (l0, l1, ...)
    kinds: list = field(default_factory=list)   # per leaf: "token" [B, T, H] or "head" [H]

    @property
    def any(self) -> bool:
        return any(m is not None for m in (self.q, self.k, self.a, self.w))

    def describe(self) -> str:
        """The maps in words, for explain: `q = F.elu(q) + 1.0`, ..."""
        names = {f"l{i}": x.name for i, x in enumerate(self.leaves)}
        out = []
        for role, label in (("q", "q"), ("k", "k"), ("a", "log_decay"), ("w", "k_scale")):
            m = getattr(self, role)
            if m is not None:
                leaf = {"x": m.leaves[0].name} if role in "qk" else names
                out.append(f"{label} = {with_names(m.torch, leaf)}")
        return "; ".join(out)

    def flags(self) -> dict:
        """What the kernels' template renders from."""
        out = {}
        for role in ("q", "k", "a", "w"):
            m = getattr(self, role)
            # (triton, torch[, the derivative times y: q's and k's feature maps])
            out[f"{role}_map"] = None if m is None else (m.triton, m.torch) + (
                (m.grad,) if role in "qk" else ())
        out["leaf_kinds"] = tuple(self.kinds)
        out["leaf_names"] = tuple(x.name for x in self.leaves)
        return out


def with_names(text: str, names: dict) -> str:
    """A map's torch source with its leaves (x, l0, l1, ...) renamed by
    `names` (to the user's names, for explain)."""
    return re.sub(r"\b(x|l\d+)\b", lambda g: names.get(g[1], g[1]), text)


def of(tp, heads: tuple) -> Prologue:
    """The maps of a chunked term at the matrix's `heads` (one head dim)."""
    pro = Prologue()
    memo: dict = {}
    for role in ("q", "k"):
        op = tp.operands.get(role)
        if op is not None and not isinstance(op.node, ir.Input):
            leaf = _single_leaf(op.node, memo)
            if leaf is not None and axes_of(leaf) == axes_of(op.node):
                m = _render(op.node, lambda n, leaf=leaf: "x" if n is leaf else None, memo)
                if m is not None:
                    # (a memo of its own: the derivative's nodes are temporaries,
                    # whose ids a shared memo would see again on later nodes)
                    grad = scalar_grads(op.node, [leaf], "y", names=["x"]).get(0)
                    setattr(pro, role, Map(*m, [leaf], grad))
    if len(heads) != 1:
        return pro
    for role, operand in (("a", "log_decay"), ("w", "k_scale")):
        op = tp.operands.get(operand)
        if op is None or isinstance(op.node, ir.Input):  # a token input is read as given
            continue
        setattr(pro, role, scalar_map(op.node, heads, pro.leaves, pro.kinds, memo))
    return pro


def scalar_map(node, heads: tuple, leaves: list, kinds: list, memo=None,
               extra: dict | None = None) -> Map | None:
    """`node` as a map of per-token values at exactly `heads` ("token" [B, T,
    H]) and per-head statics ("head" [H]), named l0, l1, ... by their place
    in `leaves` (its new leaves appended there and their kinds to `kinds`),
    or None (nothing appended) where a kernel cannot compute it on load.
    Shared by the chunked kernels (of) and the per-channel scan
    (terms/scan.py: Mamba's delta and the values' scale). extra: {axes:
    kind} of further statics a caller reads (the per-channel cumsum's [H]
    params beside its [H, K] ones: terms/per_channel.py decay_map)."""
    memo = {} if memo is None else memo
    found = _scalar_leaves(node, heads, memo, extra or {})
    if found is None:
        return None
    new = [(x, kind) for x, kind in found if all(x is not y for y in leaves)]
    names = {id(x): f"l{i}" for i, x in enumerate(leaves + [x for x, _ in new])}
    m = _render(node, lambda n: names.get(id(n)), memo)
    if m is None:
        return None
    leaves.extend(x for x, _ in new)
    kinds.extend(kind for _, kind in new)
    return Map(*m, [x for x, _ in found])


def _single_leaf(node, memo):
    """The one token input an elementwise expression reads (constants aside)."""
    leaves = _leaves(node, memo)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], ir.Input) else None


def _scalar_leaves(node, heads, memo, extra) -> list | None:
    """[(leaf, kind)] of an expression of per-token values at exactly the
    heads ("token"), per-head statics ("head") and the statics `extra` names
    by their axes, else None."""
    out = []
    for n in _leaves(node, memo):
        if not isinstance(n, (ir.Input, ir.Param)):
            return None
        axes = axes_of(n)
        if axes == ("b", "t") + tuple(heads):
            out.append((n, "token"))
        elif axes == tuple(heads):
            out.append((n, "head"))
        elif isinstance(n, ir.Param) and axes in extra:
            out.append((n, extra[axes]))
        else:
            return None
    return out


def _leaves(node, memo) -> list:
    """The non-constant leaves below the elementwise maps, each once; a
    non-map inner node is a leaf too (the renderers then refuse it)."""
    out, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if id(n) in seen or number_kind(n, memo) == "const":
            continue
        seen.add(id(n))
        if isinstance(n, ir.Map):
            stack.extend(reversed(n.args))
        else:
            out.append(n)
    return out


def _render(node, leaf_name, memo) -> tuple | None:
    """(triton, torch) source of an elementwise expression, or None where it
    uses an op or a leaf a kernel cannot compute on load."""
    def go(n):
        if number_kind(n, memo) == "const":
            v = fold(n)
            return None if isinstance(v, bool) else (triton_literal(v), literal(v))
        name = leaf_name(n)
        if name is not None:
            return name, name
        if not isinstance(n, ir.Map) or n.op not in OPS or n.type.boolean:
            return None
        args = [go(a) for a in n.args]
        if None in args:
            return None
        if len(args) == 1:
            return UNARY[n.op].format(x=args[0][0]), TORCH_UNARY[n.op].format(x=args[0][1])
        (ta, pa), (tb, pb) = args
        return BINARY[n.op].format(a=ta, b=tb), TORCH_BINARY[n.op].format(a=pa, b=pb)
    return go(node)


# ------------------------------------------------------------------ gradients


def scalar_grads(node, leaves: list, seed: str, memo=None, names=None) -> dict:
    """{i: Triton source of d(node)/d(l_i) times `seed`} for the leaves of
    `leaves` (l0, l1, ... by their place, as scalar_map names them) that
    `node` reads: reverse mode over the elementwise maps with the local
    derivatives of codegen/triton/tiles.py, so a backward kernel can take a
    map's chain rule on the values it loads (the per-channel scan's:
    Mamba's delta = softplus(dt + dt_bias) to dt and dt_bias). `seed` is a
    source expression (a name in the kernel); a map that is a product of
    several IR nodes is passed as one (product_node). names: the leaves'
    names in the source where not l0, l1, ... (a feature map's `x`: the
    chunked backward's dq and dk runs' epilogue)."""
    memo = {} if memo is None else memo
    names = {id(x): (names[i] if names else f"l{i}") for i, x in enumerate(leaves)}
    index = {id(x): i for i, x in enumerate(leaves)}

    def below(n):  # the maps' arguments, down to the leaves (constants fold)
        if id(n) in names or not isinstance(n, ir.Map) or number_kind(n, memo) == "const":
            return ()
        return n.args
    order = ir.topo_order([node], below)
    root = Seed(ir.Type(ir.MATRIX))
    adjoint, out = {id(node): root}, {}
    for n in reversed(order):
        g = adjoint.get(id(n))
        if g is None:
            continue
        if id(n) in names:
            out[index[id(n)]] = g
            continue
        if not isinstance(n, ir.Map) or number_kind(n, memo) == "const":
            continue
        for i, a in enumerate(n.args):
            if number_kind(a, memo) == "const":
                continue
            local = local_grad(n, i, g)
            if local is not None:
                prev = adjoint.get(id(a))
                adjoint[id(a)] = local if prev is None else map_of("add", prev, local)
    return {i: _render_grad(g, names, root, seed, memo) for i, g in sorted(out.items())}


def product_node(nodes: list, negated: bool = False):
    """One IR node for the product of `nodes` (negated: its negation), for
    scalar_grads on a map that _product renders from several."""
    out = nodes[0]
    for n in nodes[1:]:
        out = map_of("mul", out, n)
    return map_of("neg", out) if negated else out


def _render_grad(node, names, root, seed, memo) -> str:
    """Triton source of a gradient's IR (leaves by `names`, the seed node
    `root` as `seed`); masks (relu's, elu's, abs's derivatives) as tl.where."""
    def go(n):
        if n is root:
            return seed
        if id(n) in names:
            return names[id(n)]
        if number_kind(n, memo) == "const":
            return triton_literal(fold(n))
        args = [go(a) for a in n.args]
        if len(args) == 1:
            return UNARY[n.op].format(x=args[0])
        if n.op == "mul" and n.args[0].type.boolean != n.args[1].type.boolean:
            mask, val = args if n.args[0].type.boolean else args[::-1]
            return f"tl.where({mask}, {val}, 0.0)"
        return BINARY[n.op].format(a=args[0], b=args[1])
    return go(node)
