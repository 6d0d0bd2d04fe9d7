"""Masked low-rank terms -> chunked, banded or global strategies.

A term `row(r) * col(c) * decay(a) * mask * (q @ k^T)` (or a polynomial f of
one q @ k^T, or a time-invariant modal kernel) is linear in q and k, so row
factors fold into q and column factors into k; its mask and decays bound
t - s to a band [lo, hi]:

* [0 or 1, inf): causal, computed in chunks with a state passed between them
  (linear attention, RetNet, SSD; GLA and Mamba-1 with the decay inside the
  contraction; Based through its feature map);
* (-inf, 0 or -1]: the mirror image, planned as the causal case on reversed
  time;
* a finite band: only the blocks of chunks the band touches (a decay inside
  a window); decode keeps the window's keys and values;
* (-inf, inf): no mask at all, a global state sum_s k_s v_s^T, O(T).
"""

from __future__ import annotations

from .. import analysis, ir
from ..ir import STATIC
from . import rewrite
from .model import INF, MaskPlan, Operand, StatePlan, StateTensor, TermPlan
from .parts import ONE, add, masks_band, mul
from .softmax import gates

MAX_DEGREE_IN_A_BAND = 8


def match(parts, mp, program, index) -> TermPlan | None:
    if parts.softmaxes or parts.toeplitz or any(w[0] == "transpose" for w in parts.wrappers):
        return None
    band = masks_band(parts.masks)
    if band is None:
        return None
    lo, hi = band
    if parts.decays:
        lo = max(lo, 0)
    if lo > hi:
        return None
    form = _form(parts, program.groups)
    if form is None:
        return None
    q, k, dim, features, modal = form
    g = program.groups
    if dim in mp.heads or g.get(dim) in mp.heads:
        return None  # summed over a dim the matrix also keeps per head
    operands = {}
    if features is None:  # linear in q and k: gates fold into them
        for f in parts.rows + ([] if modal else parts.statics):
            q = mul(q, f, g)
        for f in parts.cols:
            k = mul(k, f, g)
    else:  # f(c z) != c f(z): gates scale the output and the values instead
        scale = None
        for s in parts.statics:
            scale = mul(scale, s, g)
        gates(operands, parts, g, scale)
    a = None
    for d in parts.decays:
        a = add(a, d.a, g)
    per_channel = a is not None and dim in a.type.dims
    wrappers = list(parts.wrappers)
    if lo == -INF and hi in (0, -1) and a is None:
        # anti-causal: the causal case on reversed time
        wrappers.append(("rev",))  # the gates apply outside it, in the original time
        q, k = rewrite.reversed_token(q), rewrite.reversed_token(k)
        lo, hi = -hi, INF
    flags = {"dim": dim, "features": features, "has_decay": a is not None,
             "per_channel": per_channel, "lo": lo, "hi": hi, "strict": lo == 1}
    if hi == INF and lo in (0, 1):
        strategy = "chunked"
    elif hi != INF and lo != -INF and not per_channel and \
            (features is None or features.degree <= MAX_DEGREE_IN_A_BAND):
        strategy = "banded"
    elif (lo, hi) == (-INF, INF) and a is None:
        strategy = "global"
    else:
        return None
    operands["q"] = Operand("q", q, _drop(q, dim), (dim,))
    scale = None
    if strategy == "chunked" and features is None and not per_channel:
        k, scale = split_key_scale(k, dim, mp.heads, g)
    operands["k"] = Operand("k", k, _drop(k, dim), (dim,))
    if scale is not None:  # k_s = scale_s * k_s at fewer heads: scaled on load
        operands["k_scale"] = Operand("k_scale", scale, _drop(scale, dim))
    if a is not None:
        operands["log_decay"] = Operand("log_decay", a, _drop(a, dim),
                                        (dim,) if per_channel else ())
    mask = MaskPlan(None, (lo, hi), True)  # exactly the band (masks_band checked it)
    state = _state(strategy, flags, mp)
    backward = ("autograd through the chunks or the recurrence" if per_channel else
                "adjoint: three more chunked runs (dq causal, dk and dv on reversed time), "
                "the decay gradient a reverse cumulative sum") if strategy == "chunked" \
        else "autograd through the blocks" if strategy == "banded" else "autograd"
    return TermPlan(index, parts.node, strategy, wrappers, operands, mask, flags, state,
                    backward)


def _form(parts, groups):
    """(q, k, contracted dim, polynomial or None, modal?) of the term's kernel."""
    if len(parts.lowranks) == 1 and not parts.rest and not parts.summed:
        lr = parts.lowranks[0]
        return lr.u, lr.w, lr.dim, None, False
    if not parts.lowranks and len(parts.rest) == 1 and not parts.summed:
        poly = analysis.polynomial_of_lowrank(parts.rest[0])
        if poly is None:
            return None
        return poly.lowrank.u, poly.lowrank.w, poly.lowrank.dim, poly, False
    if not parts.lowranks and not parts.rest and len(parts.summed) == 1 and parts.decays \
            and all(d.a.type.kind == STATIC for d in parts.decays) and not parts.rows \
            and not parts.cols:
        # time-invariant kernel sum_n c_n exp(a_n (t - s)): a modal SSM, rank N
        dim = parts.summed[0]
        q = None
        for f in parts.statics:
            q = mul(q, f, groups)
        if q is None or dim not in q.type.dims:
            return None
        return q, ONE, dim, None, True
    if not parts.lowranks and not parts.rest and not parts.summed:
        # no low-rank factor at all (a mask, a decay: cumsum, EMA): rank one
        return ONE, ONE, "1", None, False
    return None


def _mul_factors(node: ir.Node) -> list:
    if isinstance(node, ir.Map) and node.op == "mul":
        return [f for a in node.args for f in _mul_factors(a)]
    return [node]


def split_key_scale(k: ir.Node, dim: str, heads: tuple, groups: dict) -> tuple:
    """(key, scale) with k = scale * key, where the scale is the product of
    k's factors without the contracted dim (a value per token and head, as
    SSD's delta in delta * B) and the key keeps fewer head dims than k (B at
    its G groups): the key then stays at its groups and the kernel scales
    the score columns (equivalently the values' rows) as it loads them.
    (k, None) when nothing would be saved."""
    factors = _mul_factors(k)
    scales = [f for f in factors if dim not in f.type.dims]
    keys = [f for f in factors if dim in f.type.dims]
    if not scales or not keys or all(f.type.kind == STATIC for f in scales):
        return k, None
    key = scale = None
    for f in keys:
        key = mul(key, f, groups)
    for f in scales:
        scale = mul(scale, f, groups)
    if not all(d in heads for d in scale.type.dims) or \
            set(_drop(key, dim)) == set(_drop(k, dim)):
        return k, None
    return key, scale


def full_key(tp, groups: dict) -> ir.Node:
    """A chunked term's key with its column scale multiplied back in (for a
    backend that reads k at the matrix's heads)."""
    k = tp.operands["k"].node
    scale = tp.operands.get("k_scale")
    return k if scale is None else mul(scale.node, k, groups)


def _drop(node: ir.Node, dim: str) -> tuple:
    return tuple(d for d in node.type.dims if d != dim)


def _state(strategy: str, flags: dict, mp) -> StatePlan:
    heads = list(mp.heads)
    rank = flags["dim"]
    if flags["features"] is not None:
        rank = f"sum_d {flags['dim']}^d (d <= {flags['features'].degree})"
    if strategy == "global":
        return StatePlan("none", [], "not causal: no decode step")
    if strategy == "banded":
        w = int(flags["hi"])
        if flags["lo"] < 0:
            return StatePlan("none", [], "not causal: no decode step")
        tensors = [StateTensor("keys", (w, *heads, flags["dim"])),
                   StateTensor("values", (w, *heads, mp.value_label))]
        if flags["has_decay"]:
            tensors.append(StateTensor("log-decays", (w, *heads)))
        return StatePlan("window", tensors, f"ring buffer of the last {w} tokens (the band "
                         f"reaches {w} steps back)")
    if flags["per_channel"]:
        return StatePlan("diagonal_decay", [StateTensor("S", (*heads, rank, mp.value_label),
                                                        "float32")],
                         f"S = diag(exp(a_t)) S + k_t v_t^T (a decay per {flags['dim']})")
    decay = "exp(a_t) S + " if flags["has_decay"] else "S + "
    kind = "features" if flags["features"] is not None else "linear"
    k = "phi(k_t)" if flags["features"] is not None else "k_t"
    return StatePlan(kind, [StateTensor("S", (*heads, rank, mp.value_label), "float32")],
                     f"S = {decay}{k} v_t^T")

