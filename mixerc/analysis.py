"""Analyze stage: what kind of matrix each `M @ u` applies, from the IR alone.

Never looks at names. Three questions, each answered structurally:

* band: which diagonals t - s can be nonzero (masks, decays, shifts,
  reversal and transposition move or cut the band);
* causality: does output t read only inputs at times <= t (band below the
  diagonal *and* every entry of row t built from tokens <= t);
* class: split the matrix into additive terms and each term into Hadamard
  factors (low rank, decay, mask, Toeplitz, softmax, polynomial of a low-rank
  product, ...), then name the class (DESIGN.md "Analysis") and what a decode
  step must keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from . import ir
from .ir import MATRIX, STATIC, TOKEN

INF = math.inf
Band = tuple  # (lo, hi) bounds on d = t - s where an entry can be nonzero
# Positions t, s are below 2^31 (README, limits): a bound on t - s beyond that
# is no bound at all, and a window of 1e12 tokens must not size a buffer.
MAX_LAG = 2 ** 31

# Elementwise functions with f(0) == 0 keep zeros zero, so they keep the band.
_ZERO_PRESERVING = frozenset({"neg", "relu", "silu", "elu", "tanh", "abs", "sqrt"})


# ----------------------------------------------------------------------- band


def affine(node: ir.Node, sizes: dict | None = None):
    """node as alpha*t + beta*s + gamma (alpha, beta finite; gamma may be inf or
    nan, as `t - s < 1e400` has), or None if it is not affine in t, s."""
    form = _affine(node)
    return form if form is not None and all(math.isfinite(x) for x in form[:2]) else None


def _affine(node: ir.Node):
    if isinstance(node, ir.Index):
        return (1.0, 0.0, 0.0) if node.which == "t" else (0.0, 1.0, 0.0)
    if isinstance(node, ir.Const):
        return (0.0, 0.0, node.value)
    if isinstance(node, ir.Map) and node.op in ("add", "sub", "neg", "mul"):
        parts = [affine(a) for a in node.args]
        if any(p is None for p in parts):
            return None
        if node.op == "neg":
            return tuple(-x for x in parts[0])
        a, b = parts
        if node.op == "add":
            return tuple(x + y for x, y in zip(a, b))
        if node.op == "sub":
            return tuple(x - y for x, y in zip(a, b))
        if a[:2] == (0.0, 0.0):
            return tuple(a[2] * y for y in b)
        if b[:2] == (0.0, 0.0):
            return tuple(b[2] * x for x in a)
    return None


def _predicate_band(node: ir.Map) -> Band:
    """Band of `lhs op rhs` when it is a bound on t - s; else everything."""
    x, y = affine(node.args[0]), affine(node.args[1])
    if x is None or y is None:
        return (-INF, INF)
    a, b, c = (x[0] - y[0], x[1] - y[1], x[2] - y[2])  # a*t + b*s + c  op  0
    if a == 0 and b == 0:
        holds = {"lt": c < 0, "le": c <= 0, "gt": c > 0, "ge": c >= 0, "eq": c == 0,
                 "ne": c != 0}[node.op]
        return (-INF, INF) if holds else (1, 0)  # (1, 0) is the empty band
    if a != -b:
        return (-INF, INF)  # depends on absolute positions
    # a*(t - s) + c op 0  ->  d op' -c/a
    op, bound = node.op, -c / a
    if a < 0:
        op = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}.get(op, op)
    if math.isnan(bound):  # every comparison with nan is false, but !=
        return (-INF, INF) if op == "ne" else (1, 0)
    if abs(bound) > MAX_LAG:  # beyond any position: always or never true
        bound = math.copysign(INF, bound)
        holds = {"lt": bound > 0, "le": bound > 0, "gt": bound < 0, "ge": bound < 0,
                 "eq": False, "ne": True}[op]
        return (-INF, INF) if holds else (1, 0)
    if op == "lt":
        return (-INF, math.ceil(bound) - 1)
    if op == "le":
        return (-INF, math.floor(bound))
    if op == "gt":
        return (math.floor(bound) + 1, INF)
    if op == "ge":
        return (math.ceil(bound), INF)
    if op == "eq":
        return (bound, bound) if bound == int(bound) else (1, 0)
    return (-INF, INF)  # ne


def exact_band(node: ir.Node) -> Band | None:
    """(lo, hi) if the predicate holds exactly when lo <= t - s <= hi (affine
    comparisons in t - s joined by `and`, or a one-sided `not`); else None, e.g.
    for predicates on absolute positions such as `t < 9`."""
    if not (isinstance(node, ir.Map) and node.type.boolean):
        return None
    op, args = node.op, node.args
    if op in ir.COMPARE_OPS:
        x, y = affine(args[0]), affine(args[1])
        if x is None or y is None:
            return None
        a, b = x[0] - y[0], x[1] - y[1]
        if a != -b or (a == 0 and op == "ne") or op == "ne":
            return None
        return _predicate_band(node)
    if op in ("and", "mul"):
        x, y = exact_band(args[0]), exact_band(args[1])
        return None if x is None or y is None else _meet(x, y)
    if op == "not":
        x = exact_band(args[0])
        if x is None:
            return None
        lo, hi = x
        if lo == -INF and hi != INF:
            return (hi + 1, INF)
        if hi == INF and lo != -INF:
            return (-INF, lo - 1)
        return None
    return None


def _meet(a: Band, b: Band) -> Band:
    return (max(a[0], b[0]), min(a[1], b[1]))


def _hull(a: Band, b: Band) -> Band:
    if a[0] > a[1]:
        return b
    if b[0] > b[1]:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]))


def band(node: ir.Node) -> Band:
    """Diagonals t - s on which a matrix-valued node can be nonzero (true, for a
    boolean node). Conservative: (-inf, inf) when unsure."""
    if node.type.kind != MATRIX:
        return (-INF, INF)
    if isinstance(node, ir.Decay):
        return (0, INF)
    if isinstance(node, ir.Toeplitz):
        h = node.h
        if isinstance(h, ir.Taps) and h.tap_dim.isdigit():
            return (0, int(h.tap_dim) - 1)
        return (0, INF)
    if isinstance(node, ir.Softmax):
        return band(node.mask) if node.mask is not None else (-INF, INF)
    if isinstance(node, (ir.Contract, ir.Sum)):
        return band(node.x)
    if isinstance(node, ir.Shift):
        lo, hi = band(node.x)
        return (lo + node.k, hi + node.k)
    if isinstance(node, (ir.Rev, ir.Transpose)):
        lo, hi = band(node.children()[0])
        return (-hi, -lo)
    if isinstance(node, ir.Map):
        op, args = node.op, node.args
        if op in ir.COMPARE_OPS:
            return _predicate_band(node)
        if op in ("mul", "and"):
            return _meet(band(args[0]), band(args[1]))
        if op in ("add", "sub", "or"):
            return _hull(band(args[0]), band(args[1]))
        if op == "div":
            return band(args[0])
        if op == "not":
            lo, hi = band(args[0])
            if lo == -INF and hi != INF:
                return (hi + 1, INF)
            if hi == INF and lo != -INF:
                return (-INF, lo - 1)
            return (-INF, INF)
        if op == "pow" and isinstance(args[1], ir.Const) and args[1].value > 0:
            return band(args[0])
        if op in _ZERO_PRESERVING:
            return band(args[0])
    return (-INF, INF)


# ------------------------------------------------------------------ causality


def causal_issue(node: ir.Node) -> ir.Node | None:
    """None if output t of `node` reads only inputs at times <= t; otherwise the
    node that breaks it. For a matrix: entry [t, s] (s <= t) reads only
    tokens <= t, and the band lies on or below the diagonal where applied."""
    memo: dict = {}

    def reads_positions(n: ir.Node) -> bool:
        """n's value depends on where it sits in the sequence: it holds tokens
        or absolute positions (not only t - s)."""
        return any(x.type.kind == TOKEN or isinstance(x, (ir.Input, ir.Row, ir.Col))
                   for x in ir.walk(n)) or not _is_time_invariant(n)

    def visit(n: ir.Node):
        if id(n) in memo:
            return memo[id(n)]
        bad = None
        if isinstance(n, ir.Shift) and n.k < 0:
            bad = n  # row t reads row t + |k|, which a prefix does not have yet
        elif isinstance(n, ir.Rev) and reads_positions(n.x):
            bad = n  # time reversed: its value at t depends on the length
        elif isinstance(n, ir.Apply) and band(n.m)[0] < 0:
            bad = n
        elif isinstance(n, ir.Softmax) and band(n)[0] < 0:
            bad = n  # its normalizer reads keys s > t, even where a later mask drops them
        elif isinstance(n, ir.Transpose) and any(
                isinstance(x, (ir.Softmax, ir.Apply, ir.Shift)) for x in ir.walk(n.m)):
            bad = n
        if bad is None:
            for c in n.children():
                bad = visit(c)
                if bad is not None:
                    break
        memo[id(n)] = bad
        return bad

    return visit(node)


# ------------------------------------------------------------------ structure


@dataclass
class Term:
    """One additive term of a mixing matrix, as a product of recognized factors."""

    kind: str                 # softmax | lowrank | polynomial | toeplitz | diagonal | banded | dense
    band: Band
    node: ir.Node
    orientation: str = "lower"         # lower | upper | both, after unwrapping rev/transpose
    flipped: bool = False              # reached through rev() or ^T
    shift: int = 0                     # rows moved down by shift()
    lowrank: ir.LowRank | None = None
    decays: list = field(default_factory=list)
    rank_dim: str | None = None
    per_channel: bool = False          # decay carries the contracted dim (GLA, Mamba-1)
    time_invariant: bool = False
    softmax: ir.Softmax | None = None
    degree: int | None = None          # polynomial kernel degree
    modes: tuple | None = None         # Toeplitz kernel realizable as a modal SSM of these dims
    kernel: ir.Toeplitz | None = None  # Toeplitz of an explicit lag kernel


@dataclass
class MatrixInfo:
    apply: ir.Apply
    name: str
    cls: str
    band: Band
    terms: list
    state: str                          # what a decode step keeps, in words
    state_shape: tuple = ()             # dims of that state per sequence ("time" = grows)
    applies: list = field(default_factory=list)  # every `M @ u` applying this matrix


@dataclass
class Analysis:
    program: ir.Program
    matrices: list
    causal: bool
    reason: str | None               # why not causal, with a source position
    token_state: list                # (what, dims) kept for shift()/conv() history

    @property
    def cls(self) -> str:
        classes = list(dict.fromkeys(m.cls for m in self.matrices))
        return " + ".join(classes) if classes else "elementwise"


def factors(node: ir.Node) -> list:
    """Split a Hadamard product into factors; statics become scale factors."""
    if isinstance(node, ir.Map) and node.op == "mul":
        return factors(node.args[0]) + factors(node.args[1])
    if isinstance(node, ir.Map) and node.op == "div" and node.args[1].type.kind == STATIC:
        d = node.args[1]  # a scale factor 1 / d, not d
        one = ir.Const(ir.Type(STATIC), value=1.0)
        return factors(node.args[0]) + [ir.Map(d.type, op="div", args=(one, d), loc=d.loc)]
    if isinstance(node, ir.Map) and node.op == "neg":
        return factors(node.args[0]) + [ir.Const(ir.Type(STATIC), value=-1.0, loc=node.loc)]
    if isinstance(node, ir.Contract):
        return factors(node.x)
    return [node]


def terms(node: ir.Node) -> list:
    """Additive terms; a subtracted term carries its sign as a `neg` factor."""
    if isinstance(node, ir.Map) and node.op in ("add", "sub") and \
            node.args[0].type.kind == MATRIX and node.args[1].type.kind == MATRIX:
        right = terms(node.args[1])
        return terms(node.args[0]) + ([_negate(t) for t in right] if node.op == "sub" else right)
    if isinstance(node, ir.Contract) and isinstance(node.x, ir.Map) and node.x.op in ("add", "sub"):
        return terms(node.x)
    return [node]


def _negate(node: ir.Node) -> ir.Node:
    """-node with the sign inside shift/rev/transpose/sum wrappers, so that the
    planner still peels them."""
    if isinstance(node, (ir.Shift, ir.Rev, ir.Contract, ir.Sum)):
        return replace(node, x=_negate(node.x))
    if isinstance(node, ir.Transpose):
        return replace(node, m=_negate(node.m))
    return ir.Map(node.type, op="neg", args=(node,), loc=node.loc)


@dataclass
class Polynomial:
    """f(z) = sum_d coeffs[d] z^d for z = the low-rank product u . w. Coefficients
    are sympy expressions in `symbols` (static sub-expressions such as sqrt(K),
    by symbol name -> IR node)."""

    lowrank: ir.LowRank
    coeffs: list
    symbols: dict

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1


# A polynomial kernel is expanded into a feature map of sum_d K^d features per
# token, so only low degrees pay: a term of higher degree (z^16, z^100000,
# z^1e300) is not a polynomial kernel and goes to another strategy or the
# dense path. The expansion's size is bounded too (e.g. (a + b + ... + z)^8
# with many static symbols), so sympy never does more than a little work.
MAX_POLY_DEGREE = 8
MAX_POLY_MONOMIALS = 4096   # terms of the expanded expression, static symbols included


def polynomial_of_lowrank(node: ir.Node) -> Polynomial | None:
    """A polynomial of degree 2..MAX_POLY_DEGREE in one low-rank product with
    scalar static coefficients (Based: 1 + z + z^2/2), expanded with sympy;
    else None. Degree and expanded size are bounded on the IR, node by node,
    before sympy builds that node's expression."""
    import sympy

    z = sympy.Symbol("z")
    found: list = []
    symbols: dict = {}

    def small(e, degree: int, monomials: int):
        if degree > MAX_POLY_DEGREE or monomials > MAX_POLY_MONOMIALS:
            return None
        return e, degree, monomials

    def exponent(n) -> int | None:
        """A pow's exponent if it is a literal integer 0..MAX_POLY_DEGREE."""
        v = n.value if isinstance(n, ir.Const) else None
        if not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not 0 <= v <= MAX_POLY_DEGREE or v != int(v):
            return None
        return int(v)

    def expr(n):
        """(sympy expression, degree in z, bound on its expanded terms) or None."""
        if n.type.kind == STATIC:
            if n.type.dims:
                return None  # per-head coefficients: not a scalar polynomial
            if isinstance(n, ir.Const):
                v = n.value
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    return None
                return sympy.Rational(repr(float(v))), 0, 1  # exact: 1e-300 stays 1e-300
            for name, seen in symbols.items():
                if seen is n:
                    return sympy.Symbol(name), 0, 1
            name = f"c{len(symbols)}"
            symbols[name] = n
            return sympy.Symbol(name), 0, 1
        if isinstance(n, ir.LowRank):
            found.append(n)
            return z, 1, 1
        if isinstance(n, ir.Contract):
            return expr(n.x)
        if not (isinstance(n, ir.Map) and n.op in ("add", "sub", "mul", "div", "pow", "neg")):
            return None
        if n.op == "pow":
            k = exponent(n.args[1])
            base = None if k is None else expr(n.args[0])
            if base is None:
                return None
            e, d, m = base
            return small(e ** k, d * k, math.comb(m + k - 1, k) if k else 1)
        if n.op == "div" and n.args[1].type.kind != STATIC:
            return None  # a polynomial divides by statics only
        args = [expr(a) for a in n.args]
        if any(a is None for a in args):
            return None
        if n.op == "neg":
            return -args[0][0], args[0][1], args[0][2]
        (a, da, ma), (b, db, mb) = args
        if n.op in ("add", "sub"):
            return small(a + b if n.op == "add" else a - b, max(da, db), ma + mb)
        return small(a * b if n.op == "mul" else a / b, da + db, ma * mb)

    got = expr(node)
    if got is None or len({id(x) for x in found}) != 1:
        return None
    try:
        poly = sympy.Poly(sympy.expand(got[0]), z)
    except sympy.PolynomialError:
        return None
    if poly.degree() < 2:
        return None
    coeffs = list(reversed(poly.all_coeffs()))
    if any(c.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo) for c in coeffs):
        return None  # a literal division by 0: exact arithmetic has no float64 value for it
    return Polynomial(found[0], coeffs, symbols)


def _is_time_invariant(node: ir.Node) -> bool:
    """Entries depend on t - s only: no tokens, no reversal, and t, s appear
    only as t - s (an absolute position such as `t < 9` breaks it)."""
    def lag_only(n) -> bool:
        if n.type.kind == TOKEN or isinstance(n, (ir.Row, ir.Col, ir.LowRank, ir.Rev)):
            return False
        form = affine(n)
        if form is not None and form[:2] != (0.0, 0.0):
            return form[0] == -form[1]  # c * (t - s) + d
        if isinstance(n, ir.Index):
            return False  # t or s alone
        return all(lag_only(c) for c in n.children())
    return lag_only(node)


def classify_term(node: ir.Node) -> Term:
    t = Term("dense", band(node), node)
    inner = node
    while isinstance(inner, (ir.Shift, ir.Rev, ir.Transpose, ir.Contract)):
        if isinstance(inner, ir.Shift):
            t.shift += inner.k
        elif isinstance(inner, (ir.Rev, ir.Transpose)):
            t.flipped = not t.flipped
        inner = inner.children()[0]
    lo, hi = t.band
    t.orientation = "lower" if lo >= 0 else "upper" if hi <= 0 else "both"
    if lo == hi == 0:
        t.kind = "diagonal"
        return t
    parts = factors(inner)
    matrix_factors = [f for f in parts if f.type.kind == MATRIX]
    other = [f for f in matrix_factors
             if not f.type.boolean and not isinstance(f, (ir.Row, ir.Col))]
    softmaxes = [f for f in other if isinstance(f, ir.Softmax)]
    lowranks = [f for f in other if isinstance(f, ir.LowRank)]
    decays = [f for f in other if isinstance(f, ir.Decay)]
    toeplitz = [f for f in other if isinstance(f, ir.Toeplitz)]
    rest = [f for f in other if f not in softmaxes + lowranks + decays + toeplitz]
    t.decays = decays
    if softmaxes and len(softmaxes) == 1 and not (lowranks or decays or toeplitz or rest):
        t.kind, t.softmax = "softmax", softmaxes[0]
        return t
    if len(lowranks) == 1 and not (softmaxes or toeplitz or rest):
        lr = lowranks[0]
        t.kind, t.lowrank, t.rank_dim = "lowrank", lr, lr.dim
        t.per_channel = any(lr.dim in d.a.type.dims for d in decays)
        return t
    if not lowranks and not softmaxes and len(rest) == 1:
        poly = polynomial_of_lowrank(rest[0])
        if poly is not None and not toeplitz:
            t.kind, t.lowrank, t.degree = "polynomial", poly.lowrank, poly.degree
            t.rank_dim = poly.lowrank.dim
            return t
    if not lowranks and not softmaxes and _is_time_invariant(inner):
        t.kind = "toeplitz" if (toeplitz or decays or rest) else "banded"
        t.time_invariant = True
        t.modes = _ssm_modes(inner)
        t.kernel = toeplitz[0] if len(toeplitz) == 1 else None
        return t
    return t


def _ssm_modes(node: ir.Node):
    """Dims of a modal SSM state if the kernel is sum_n c_n exp(a_n * lag):
    decay(static a) times statics, optionally summed over a state dim."""
    summed = ()
    while isinstance(node, ir.Sum):
        summed += (node.dim,)
        node = node.x
    found = factors(node)
    decays = [f for f in found if isinstance(f, ir.Decay)]
    others = [f for f in found if not isinstance(f, ir.Decay)]
    if len(decays) != 1 or decays[0].a.type.kind != STATIC or \
            any(f.type.kind != STATIC for f in others):
        return None
    return decays[0].a.type.dims


def _name_class(terms: list, lo, hi) -> str:
    kinds = [x.kind for x in terms]
    if len(terms) > 1:
        lower = [x for x in terms if x.orientation == "lower" and x.kind != "diagonal"]
        upper = [x for x in terms if x.orientation == "upper" and x.kind != "diagonal"]
        diag = [x for x in terms if x.kind == "diagonal"]
        if lower and upper and len(lower) + len(upper) + len(diag) == len(terms) and \
                all(x.kind == "lowrank" for x in lower + upper):
            return "quasiseparable"
        if all(k == "lowrank" for k in kinds if k != "diagonal") and lo >= 0:
            return "semiseparable (sum)"
        return "dense"
    x = terms[0]
    if x.kind == "softmax":
        return "softmax"
    if x.kind == "lowrank":
        if x.orientation == "both":
            return "low-rank"
        if x.per_channel:
            return "per-channel decay"
        return "semiseparable" if x.decays else "masked low-rank"
    if x.kind == "polynomial":
        return "polynomial kernel"
    if x.kind == "toeplitz":
        return "toeplitz"
    if x.kind in ("banded", "diagonal"):
        return x.kind
    return "dense"


def _state(info_cls: str, terms: list, apply: ir.Apply, lo, hi, sizes_note: str = ""):
    """What a decode step keeps for this matrix, in words and dims."""
    u_dims = apply.u.type.dims
    m_dims = apply.m.type.dims
    value_dims = tuple(d for d in u_dims if d not in m_dims)
    x = terms[0]
    if info_cls == "softmax":
        window = None if hi == INF else int(hi) + 1
        lowrank = next((n for n in ir.walk(x.softmax.scores) if isinstance(n, ir.LowRank)), None)
        kdims = lowrank.w.type.dims if lowrank is not None else ()
        what = (f"ring buffer of the last {window} keys and values" if window
                else "KV cache: every past key and value")
        return what, ("time" if window is None else str(window),) + tuple(
            dict.fromkeys(kdims + u_dims))
    if info_cls in ("semiseparable", "masked low-rank", "per-channel decay"):
        dims = tuple(dict.fromkeys(apply.type.dims[:len(apply.type.dims) - len(value_dims)]
                                   + (x.rank_dim,) + value_dims))
        kind = "diagonal-decay state" if x.per_channel else "state S = a*S + k v^T"
        return f"{kind} [{', '.join(dims)}]", dims
    if info_cls == "polynomial kernel":
        return (f"feature-map state of degree {x.degree} over {x.rank_dim} "
                f"(feature dim grows as {x.rank_dim}^{x.degree})"), ("features",) + value_dims
    if info_cls == "toeplitz":
        if hi != INF:
            return f"ring buffer of the last {int(hi)} inputs", (str(int(hi)),) + u_dims
        if x.modes is not None:
            dims = tuple(dict.fromkeys(x.modes + u_dims))
            return f"modal SSM state [{', '.join(dims)}] (the kernel is a sum of exponentials)", \
                dims
        if x.kernel is not None and isinstance(x.kernel.h, ir.KernelRef):
            return (f"ring buffer of the last L - 1 inputs (L = taps of kernel "
                    f"{x.kernel.h.name})"), ("L-1",) + u_dims
        return "full input history", ("time",) + u_dims
    if info_cls in ("banded", "diagonal"):
        if hi == 0:
            return "nothing (diagonal)", ()
        if hi != INF:
            return f"ring buffer of the last {int(hi)} inputs", (str(int(hi)),) + u_dims
    if info_cls == "quasiseparable" or lo < 0:
        return "none: the matrix has entries above the diagonal (bidirectional)", ()
    return "full input history (dense)", ("time",) + u_dims


def _apply_names(program: ir.Program) -> dict:
    """A readable name per Apply: its let name, conv(w) for a short conv, else the
    out name (with a counter when an out applies several matrices)."""
    names: dict = {}
    let_of = {id(n): k for k, n in program.lets.items()}
    for out, root in program.outs.items():
        applies = [n for n in ir.walk(root) if isinstance(n, ir.Apply)]
        unnamed = 0
        for a in applies:
            if id(a) in names:
                continue
            m = a.m.x if isinstance(a.m, ir.Contract) else a.m
            if id(m) in let_of or id(a.m) in let_of:
                names[id(a)] = let_of.get(id(m), let_of.get(id(a.m)))
            elif isinstance(m, ir.Toeplitz) and isinstance(m.h, ir.Taps) and \
                    isinstance(m.h.w, ir.Param):
                names[id(a)] = f"conv({m.h.w.name})"
            else:
                unnamed += 1
                names[id(a)] = f"{out}.{unnamed}"
        if unnamed == 1:
            for k, v in list(names.items()):
                if v == f"{out}.1":
                    names[k] = out
    return names


def analyze(program: ir.Program) -> Analysis:
    names = _apply_names(program)
    matrices: dict = {}  # id(matrix node) -> MatrixInfo; one entry per distinct matrix
    for root in program.outs.values():
        for n in ir.walk(root):
            if not isinstance(n, ir.Apply):
                continue
            if id(n.m) in matrices:
                matrices[id(n.m)].applies.append(n)
                continue
            lo, hi = band(n.m)
            term_list = [classify_term(x) for x in terms(n.m)]
            cls = _name_class(term_list, lo, hi)
            what, dims = _state(cls, term_list, n, lo, hi)
            matrices[id(n.m)] = MatrixInfo(n, names.get(id(n), "?"), cls, (lo, hi), term_list,
                                           what, dims, [n])
    matrices = list(matrices.values())
    reason = None
    for name, root in program.outs.items():
        bad = causal_issue(root)
        if bad is not None:
            where = f" at {bad.loc}" if bad.loc else ""
            if isinstance(bad, ir.Apply):
                lo = band(bad.m)[0]
                reason = (f"out {name}: the matrix applied{where} has entries above the "
                          f"diagonal (t - s reaches {lo}), so output t reads later inputs")
            elif isinstance(bad, ir.Rev):
                reason = f"out {name}: rev(){where} reverses time, so output t reads later inputs"
            elif isinstance(bad, ir.Shift):
                reason = f"out {name}: shift by {bad.k}{where} reads later inputs"
            elif isinstance(bad, ir.Softmax):
                reason = (f"out {name}: the softmax{where} normalizes each row over keys "
                          f"s > t, so output t reads later inputs")
            else:
                reason = f"out {name}: the transpose{where} reads later inputs"
            break
    token_state = []
    for root in program.outs.values():
        for n in ir.walk(root):
            if isinstance(n, ir.Shift) and n.type.kind == TOKEN and n.k > 0:
                token_state.append((f"last {n.k} values for shift()", n.type.dims))
    return Analysis(program, matrices, reason is None, reason, token_state)


def explain(program: ir.Program, analysis: Analysis | None = None, states: bool = True) -> str:
    """Class, causality and terms of each matrix; with states=True also what a
    decode step would keep by class (a backend's plan says what it keeps)."""
    a = analysis or analyze(program)
    lines = [f"mixer {program.name}: {a.cls}",
             f"  causal: {'yes' if a.causal else 'no'}"
             + ("" if a.causal else f" ({a.reason})")]
    for m in a.matrices:
        lo, hi = m.band
        applied = ", ".join(_operand_text(a.u) for a in m.applies)
        lines.append(f"  matrix {m.name}: {m.cls}; nonzero for {_band_text(lo, hi)}; "
                     f"applied to {applied}")
        for t in m.terms:
            if len(m.terms) > 1 or t.kind not in ("dense",):
                lines.append(f"    term: {_term_text(t)}")
        if states:
            lines.append(f"    decode state: {m.state}")
    for what, dims in a.token_state:
        lines.append(f"  token state: {what} [{', '.join(dims)}]")
    if not a.causal:
        lines.append("  decode: not available (bidirectional or reads the future)")
    return "\n".join(lines)


def _operand_text(u: ir.Node) -> str:
    if isinstance(u, (ir.Input, ir.Param)):
        return u.name
    if isinstance(u, ir.Const):
        return f"{u.value:g}"
    return f"[{', '.join(u.type.dims)}]" if u.loc is None else f"the value at {u.loc}"


def _band_text(lo, hi) -> str:
    if lo == -INF and hi == INF:
        return "all t, s"
    if lo == -INF:
        return f"t - s <= {int(hi)}"
    if hi == INF:
        return f"t - s >= {int(lo)}"
    if lo == hi:
        return f"t - s == {int(lo)}"
    return f"{int(lo)} <= t - s <= {int(hi)}"


def _term_text(t: Term) -> str:
    parts = [t.kind]
    if t.rank_dim:
        parts.append(f"rank over {t.rank_dim}")
    if t.decays:
        parts.append("per-channel decay" if t.per_channel else "scalar decay")
    if t.degree:
        parts.append(f"degree {t.degree}")
    if t.time_invariant:
        parts.append("time-invariant")
    if t.shift:
        parts.append(f"shifted by {t.shift}")
    if t.flipped:
        parts.append("reversed")
    parts.append(t.orientation)
    return ", ".join(parts)
