"""The kernel plan: what the planner hands to every backend.

A `ModulePlan` says, for each sequence matrix a program applies, how each of
its additive terms is computed: the strategy (an algorithm family), the
operands by role as IR subtrees (the backend renders them where it likes:
as torch code before a kernel, or inside a Triton kernel on load), the
score modification and mask of a softmax as IR the backend renders inside
its tiles, the decode state and the backward method. Backends read plans;
they never look at the IR's shape to choose an algorithm.

Operands keep their own head dims: a key at G groups stays at G heads and
`MatrixPlan.heads` says which head reads it (head h of H reads group
h // (H / G)), so a backend can index instead of copying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import ir
from ..analysis import Analysis, MatrixInfo
from ..errors import Loc

INF = math.inf


@dataclass
class Operand:
    """A value a term reads. `node` computes it (token, static or kernel IR);
    `heads` are its head dims as stored (a group dim stays a group dim),
    `feature` its trailing dims (the contracted dim of q and k)."""

    role: str
    node: ir.Node
    heads: tuple = ()
    feature: tuple = ()


@dataclass
class MaskPlan:
    """Which (t, s) pairs a term mixes. `band` bounds t - s from the mask and
    the term's other factors (outside it nothing mixes); when `exact`, the
    predicate is exactly lo <= t - s <= hi and tiles classify from the band
    alone; otherwise `predicate` (a boolean matrix over t, s and per-token
    values) is evaluated per tile, and a tile classifier labels each
    (row block, column block) empty, full or partial from bounds on it."""

    predicate: ir.Node | None = None
    band: tuple = (-INF, INF)
    exact: bool = True

    @property
    def causal(self) -> bool:
        return self.band[0] >= 0

    @property
    def window(self) -> int | None:
        """Keys a decode step keeps (t - s <= hi): hi + 1, or None (all)."""
        lo, hi = self.band
        return None if hi == INF or lo < 0 else int(hi) + 1


@dataclass
class ScorePlan:
    """The scores of a softmax: `expr` is an elementwise matrix expression of
    t, s, per-token values (row/col), per-head params and at most one dot
    product q_t . k_s (`dot`; None when the scores have no dot product).
    `scale` is set when expr is exactly scale * q . k (what SDPA computes)."""

    expr: ir.Node
    dot: ir.Node | None
    scale: ir.Node | None = None
    pure: bool = False

    def leaves(self, kind) -> list:
        """Row(u) or Col(u) nodes (kind ir.Row / ir.Col) the scores read."""
        return _leaves([self.expr], kind, self.dot)


@dataclass
class StateTensor:
    name: str
    dims: tuple        # per sequence; "time" grows with the context, a number is fixed
    dtype: str = "input"


@dataclass
class StatePlan:
    """What a decode step keeps for one term, and how it moves."""

    kind: str          # kv_cache | window | linear | diagonal_decay | features | history | conv | none
    tensors: list = field(default_factory=list)
    update: str = ""

    def describe(self) -> str:
        if not self.tensors:
            return self.update or "nothing"
        held = ", ".join(f"{t.name} [{', '.join(map(str, t.dims))}]" for t in self.tensors)
        return f"{held}: {self.update}" if self.update else held


@dataclass
class TermPlan:
    index: int
    node: ir.Node
    strategy: str      # flash | chunked | banded | global | toeplitz | diagonal | dense
    wrappers: list     # outermost first: ("shift", k) | ("rev",)
    operands: dict     # role -> Operand
    mask: MaskPlan
    flags: dict
    state: StatePlan
    backward: str
    score: ScorePlan | None = None
    why: str = ""      # dense: what no fast strategy could take

    @property
    def loc(self) -> Loc | None:
        return self.node.loc

    @property
    def parts(self):  # the decomposed factors, for backends that need them
        return self.flags.get("parts")


@dataclass
class MatrixPlan:
    name: str
    key: str           # unique in the module: config and state keys start with it
    matrix: ir.Node
    applies: list
    heads: tuple       # the matrix's free dims as its applications see them
    terms: list
    info: MatrixInfo
    # (add node, d, u): the program adds d * u to this matrix's only application
    # M @ values (SSD's skip D * x), u the values or an input they scale
    # (Mamba's D * x beside M @ (delta * x)), and nothing else reads M @ values:
    # a kernel may add it in its epilogue from the value tile it holds
    skip: tuple | None = None
    # the node (M @ v) / (M @ 1) when the program reads these two applications
    # (M's only ones) there alone: a kernel may divide in its epilogue
    divide: ir.Node | None = None

    @property
    def normalizer(self) -> bool:
        """Whether the last application is M @ 1 (the row sums of M, as in
        linear attention's (M @ v) / (M @ 1)): a kernel may compute it from
        its score tiles and a state row instead of reading a ones column."""
        last = self.applies[-1].u
        return len(self.applies) > 1 and isinstance(last, ir.Const) and last.value == 1.0

    @property
    def strategies(self) -> list:
        return [t.strategy for t in self.terms]

    @property
    def dense_terms(self) -> list:
        return [t for t in self.terms if t.strategy == "dense"]


@dataclass
class ModulePlan:
    program: ir.Program
    analysis: Analysis
    matrices: list
    warnings: list = field(default_factory=list)  # (loc, message) of terms with no fast strategy

    def for_apply(self, apply: ir.Apply) -> MatrixPlan:
        for m in self.matrices:
            if any(a is apply for a in m.applies):
                return m
        raise KeyError(apply)


def _leaves(roots, kind, skip=None) -> list:
    """Nodes of `kind` in the matrix expressions `roots` (not inside the token
    values their Row, Col and LowRank nodes read)."""
    from .rewrite import matrix_part
    out, seen = [], set()
    for root in roots:
        for n in reversed(matrix_part(root)):
            if n is not skip and isinstance(n, kind) and id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out
