"""Typed IR of a mixer: a DAG of small nodes, printable and hashable.

Every node carries a `Type`:

* kind ``token``  - a value per batch and time step, ``[batch, time, *dims]``;
* kind ``static`` - no time axis (params, constants, dim sizes), ``[*dims]``;
* kind ``kernel`` - indexed by lag, ``[L, *dims]``;
* kind ``matrix`` - a T x T sequence matrix per batch and dims,
  ``[batch, t, s, *dims]``.

A matrix may carry *contracted* dims: `u @ w^T` keeps the shared feature dim
as an axis until a `Contract` node sums it. The checker places `Contract`s
where linearity stops (before `@`, `+`, nonlinear maps), so a Hadamard
factor that carries the contracted dim (a per-channel decay, as in GLA and
Mamba-1) lands *inside* the sum. Every other node is plain elementwise
algebra on named axes.

Nodes compare by identity (they form a DAG with sharing); a `Program` hashes
by its canonical printed form, which is what caches key on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

from .errors import Loc

TOKEN, STATIC, KERNEL, MATRIX = "token", "static", "kernel", "matrix"

UNARY_OPS = frozenset({"neg", "exp", "log", "sqrt", "softplus", "sigmoid", "silu", "elu",
                       "relu", "tanh", "abs", "logsigmoid", "not"})
ARITH_OPS = frozenset({"add", "sub", "mul", "div", "pow"})
COMPARE_OPS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
LOGIC_OPS = frozenset({"and", "or"})
BINARY_OPS = ARITH_OPS | COMPARE_OPS | LOGIC_OPS


@dataclass(frozen=True)
class Type:
    kind: str
    dims: tuple = ()          # free dims, in the order values are laid out
    contracted: tuple = ()    # matrix only: dims still to be summed by a Contract
    boolean: bool = False

    def __str__(self) -> str:
        inner = ", ".join(self.dims)
        if self.contracted:
            inner += " | sum " + ", ".join(self.contracted)
        b = "bool " if self.boolean else ""
        return f"{b}{self.kind}[{inner}]"

    @property
    def axes(self) -> tuple:
        """All named axes of a value of this type, in layout order after the
        leading batch/time axes."""
        return self.dims + self.contracted


@dataclass(frozen=True, eq=False)
class Node:
    type: Type
    loc: Loc | None = field(default=None, compare=False, repr=False, kw_only=True)

    def children(self) -> tuple:
        return ()

    def label(self) -> str:
        """Operator text for printing; children are printed as references."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Input(Node):
    name: str = ""

    def label(self):
        return f"input {self.name}"


@dataclass(frozen=True, eq=False)
class Param(Node):
    name: str = ""

    def label(self):
        return f"param {self.name}"


@dataclass(frozen=True, eq=False)
class KernelRef(Node):
    name: str = ""

    def label(self):
        return f"kernel {self.name}"


@dataclass(frozen=True, eq=False)
class Const(Node):
    value: float = 0.0

    def label(self):
        return f"const {self.value!r}"


@dataclass(frozen=True, eq=False)
class DimSize(Node):
    dim: str = ""

    def label(self):
        return f"size {self.dim}"


@dataclass(frozen=True, eq=False)
class Index(Node):
    """The row index `t` or column index `s` of a sequence matrix."""
    which: str = "t"

    def label(self):
        return f"index {self.which}"


@dataclass(frozen=True, eq=False)
class Map(Node):
    """Elementwise op over aligned named axes. Multiplying by a boolean selects
    (where(mask, x, 0)), so an overflowing masked entry never becomes NaN."""
    op: str = ""
    args: tuple = ()

    def children(self):
        return self.args

    def label(self):
        return self.op


@dataclass(frozen=True, eq=False)
class Sum(Node):
    x: Node = None
    dim: str = ""

    def children(self):
        return (self.x,)

    def label(self):
        return f"sum[{self.dim}]"


@dataclass(frozen=True, eq=False)
class Contract(Node):
    """Sum a matrix over its contracted dims."""
    x: Node = None

    def children(self):
        return (self.x,)

    def label(self):
        return "contract"


@dataclass(frozen=True, eq=False)
class Taps(Node):
    """A static tensor whose last dim is read as a lag: w[..., j] -> h[j, ...]."""
    w: Node = None
    tap_dim: str = ""

    def children(self):
        return (self.w,)

    def label(self):
        return f"taps[{self.tap_dim}]"


@dataclass(frozen=True, eq=False)
class LowRank(Node):
    """M[t, s] = u_t[..., d] * w_s[..., d], with d kept as a contracted dim."""
    u: Node = None
    w: Node = None
    dim: str = ""

    def children(self):
        return (self.u, self.w)

    def label(self):
        return f"lowrank[{self.dim}]"


@dataclass(frozen=True, eq=False)
class Decay(Node):
    """L[t, s] = exp(sum_{s < r <= t} a_r) for s <= t, else 0."""
    a: Node = None

    def children(self):
        return (self.a,)

    def label(self):
        return "decay"


@dataclass(frozen=True, eq=False)
class Toeplitz(Node):
    """M[t, s] = h[t - s] for 0 <= t - s < L, else 0."""
    h: Node = None

    def children(self):
        return (self.h,)

    def label(self):
        return "toeplitz"


@dataclass(frozen=True, eq=False)
class Softmax(Node):
    """Row-wise softmax over s; masked-out entries are 0, a fully masked row is 0."""
    scores: Node = None
    mask: Node | None = None

    def children(self):
        return (self.scores,) if self.mask is None else (self.scores, self.mask)

    def label(self):
        return "softmax"


@dataclass(frozen=True, eq=False)
class Shift(Node):
    """Delay by k steps: token x_{t-k} (0 before the start); for a matrix the
    rows move, so that shift(M) @ u == shift(M @ u)."""
    x: Node = None
    k: int = 1

    def children(self):
        return (self.x,)

    def label(self):
        return f"shift[{self.k}]"


@dataclass(frozen=True, eq=False)
class Rev(Node):
    """Time reversal; for a matrix J M J, so that rev(M) @ rev(u) == rev(M @ u)."""
    x: Node = None

    def children(self):
        return (self.x,)

    def label(self):
        return "rev"


@dataclass(frozen=True, eq=False)
class Transpose(Node):
    m: Node = None

    def children(self):
        return (self.m,)

    def label(self):
        return "transpose"


@dataclass(frozen=True, eq=False)
class Row(Node):
    """M[t, s] = u_t."""
    u: Node = None

    def children(self):
        return (self.u,)

    def label(self):
        return "row"


@dataclass(frozen=True, eq=False)
class Col(Node):
    """M[t, s] = u_s."""
    u: Node = None

    def children(self):
        return (self.u,)

    def label(self):
        return "col"


@dataclass(frozen=True, eq=False)
class Random(Node):
    """A random static value with the dims of its type (param initial values
    only): dist "uniform" (args lo, hi) or "normal" (args mean, std)."""
    dist: str = "uniform"
    args: tuple = ()

    def children(self):
        return self.args

    def label(self):
        return f"random {self.dist}"


@dataclass(frozen=True, eq=False)
class Apply(Node):
    """y_t = sum_s M[t, s] u_s (u static: broadcast over time)."""
    m: Node = None
    u: Node = None

    def children(self):
        return (self.m, self.u)

    def label(self):
        return "apply"


# ------------------------------------------------------------------ program


@dataclass(frozen=True)
class Dim:
    name: str
    size: int | None = None       # fixed by the source (`dims W = 64`) or a literal
    divides: str | None = None    # group dim: head h reads group h // (H / G)


@dataclass(eq=False)
class Program:
    name: str
    dims: dict                     # name -> Dim, in declaration order
    inputs: dict                   # name -> tuple of dims (token tensors)
    params: dict                   # name -> tuple of dims
    kernels: dict                  # name -> tuple of dims (passed as [L, *dims])
    lets: dict                     # name -> Node, every `let`/`const` binding
    outs: dict                     # name -> Node (kind token)
    source: str = ""
    param_inits: dict = field(default_factory=dict)  # name -> static Node (module() only)
    file: str = "<string>"
    _text: str | None = field(default=None, repr=False)

    # --- printing and hashing
    def text(self) -> str:
        if self._text is None:
            self._text = format_program(self)
        return self._text

    def hash(self) -> str:
        """sha256 of the canonical text (no let names): same algebra, same hash."""
        return hashlib.sha256(format_program(self, annotate=False).encode()).hexdigest()

    def __str__(self) -> str:
        return self.text()

    def __hash__(self) -> int:
        return hash(self.hash())

    def __eq__(self, other) -> bool:
        return isinstance(other, Program) and self.hash() == other.hash()

    def nodes(self) -> list:
        """All nodes reachable from the outputs and lets, children first."""
        return topo_order(list(self.outs.values()) + list(self.lets.values()))

    @property
    def groups(self) -> dict:
        return {d.name: d.divides for d in self.dims.values() if d.divides}


def topo_order(roots, children=None) -> list:
    """The nodes under `roots`, each after its children (post-order, without
    recursion: deep programs); children(node): the ones to descend into
    (node.children() by default)."""
    seen: set = set()
    order: list = []
    for root in roots:
        stack: list = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            for c in reversed(node.children() if children is None else children(node)):
                if id(c) not in seen:
                    stack.append((c, False))
    return order


def walk(node: Node) -> Iterator[Node]:
    yield from topo_order([node])


def format_program(p: Program, annotate: bool = True) -> str:
    def shape(dims):
        return "[" + ", ".join(dims) + "]"

    lines = [f"mixer {p.name}"]
    dims = []
    for d in p.dims.values():
        s = d.name + (f" = {d.size}" if d.size is not None else "")
        s += f" divides {d.divides}" if d.divides else ""
        dims.append(s)
    lines.append("  dims " + ", ".join(dims))
    for kind, table in (("input", p.inputs), ("param", p.params), ("kernel", p.kernels)):
        for name, dd in table.items():
            lines.append(f"  {kind} {name} : {shape(dd)}")
    names = {id(n): k for k, n in p.lets.items()} if annotate else {}
    ids: dict = {}
    for node in topo_order(list(p.outs.values()) + list(p.lets.values())):
        if isinstance(node, (Input, Param, KernelRef)):
            ids[id(node)] = node.name
            continue
        ref = f"%{len(ids)}"
        ids[id(node)] = ref
        args = " ".join(ids[id(c)] for c in node.children())
        note = f"  # {names[id(node)]}" if id(node) in names else ""
        lines.append(f"  {ref} : {node.type} = {node.label()} {args}".rstrip() + note)
    for name, node in p.outs.items():
        lines.append(f"  out {name} : {node.type} = {ids[id(node)]}")
    return "\n".join(lines) + "\n"
