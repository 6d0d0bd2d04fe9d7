"""Cost model: FLOPs and bytes of each planned matrix as sympy expressions in
T (sequence length), t (context length at decode), C (chunk length), L
(kernel length) and the mixer's dims, per sequence (batch 1), float32.

Counts multiply-adds as 2 FLOPs and the dominant terms only; bytes count
what the algorithm must read and write (inputs, outputs, state), not cache
traffic. Used by `mixerc explain` and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import mul

import sympy

# Sequence length, decode context, chunk length and kernel length. Dummies,
# so that a mixer's own dim called C or L is a different symbol; `readable`
# names them for printing without clashing with the mixer's names.
T, t, C, L = (sympy.Dummy(n, positive=True) for n in ("T", "t", "C", "L"))
SPECIAL = {T: ("T",), t: ("t",), C: ("C", "chunk"), L: ("L", "taps")}
WORD = 4  # bytes per float32


@dataclass
class Cost:
    prefill_flops: sympy.Expr
    prefill_bytes: sympy.Expr
    decode_flops: sympy.Expr      # one token with t tokens of context
    decode_bytes: sympy.Expr
    state: sympy.Expr             # elements kept between decode steps


def dim(name: str) -> sympy.Expr:
    return sympy.Integer(int(name)) if name.isdigit() else sympy.Symbol(name, positive=True)


def prod(names) -> sympy.Expr:
    return reduce(mul, (dim(n) for n in names), sympy.Integer(1))


def _value_width(mp, groups) -> sympy.Expr:
    """Total width of everything the matrix is applied to (a group dim whose
    head dim the matrix has is a head, not a value dim)."""
    total = sympy.Integer(0)
    for a in mp.applies:
        dims = [d for d in a.u.type.dims if d not in mp.heads and groups.get(d) not in mp.heads]
        total += prod(dims)
    return total


def _rank(tp, mp) -> sympy.Expr:
    f = tp.flags
    if f.get("features") is not None:  # polynomial kernel: 1 + K + K^2 + ...
        k = dim(f["dim"])
        return sum((k ** d for d in range(f["features"].degree + 1)), sympy.Integer(0))
    return dim(f["dim"]) if "dim" in f else sympy.Integer(1)


def _feature(tp, mp, groups) -> sympy.Expr:
    q = tp.operands.get("q")
    if q is None:
        return sympy.Integer(1)
    return prod(q.feature)


def term_cost(tp, mp, groups) -> Cost:
    H, V = prod(mp.heads), _value_width(mp, groups)
    if tp.strategy == "chunked" and tp.flags.get("features") is not None \
            and not tp.flags.get("has_decay"):
        quadratic, features = polynomial_choice(tp, mp, groups)
        F, V = _rank(tp, mp), _value_width(mp, groups)
        return Cost(H * sympy.Min(quadratic, features), WORD * H * T * (2 * _feature(tp, mp, groups)
                                                                   + 2 * V), H * 4 * F * V,
                    WORD * H * 2 * F * V, H * F * V)
    if tp.strategy == "chunked" and tp.flags.get("per_channel"):
        K = _rank(tp, mp)
        scan, chunked = per_channel_choice(tp, mp, groups)
        return Cost(H * sympy.Min(scan, chunked), WORD * H * T * (3 * K + 2 * V),
                    H * 4 * K * V, WORD * H * 2 * K * V, H * K * V)
    if tp.strategy == "chunked":
        K = _rank(tp, mp)
        return Cost(H * (2 * T * C * (K + V) + 4 * T * K * V + 2 * T * K * V / C),
                    WORD * H * T * (2 * K + 2 * V + 1), H * 4 * K * V, WORD * H * 2 * K * V,
                    H * K * V)
    if tp.strategy == "global":
        K = _rank(tp, mp)
        return Cost(H * 4 * T * K * V, WORD * H * T * (2 * K + 2 * V), 0, 0, 0)
    if tp.strategy == "banded":
        K = _feature(tp, mp, groups)
        lo, hi = tp.mask.band
        width = int(hi) - int(lo) + 1
        keys = sympy.Min(T, width + C)  # whole chunks around the band
        return Cost(H * 2 * T * keys * (K + V), WORD * H * T * (2 * K + 2 * V),
                    H * 2 * width * (K + V), WORD * H * width * (K + V), H * width * (K + V))
    if tp.strategy == "flash":
        D = _feature(tp, mp, groups)
        lo, hi = tp.mask.band
        keys = T if hi == sympy.oo or hi == float("inf") else sympy.Min(T, int(hi) + 1)
        ctx = t if hi == float("inf") else sympy.Min(t, int(hi) + 1)
        causal = sympy.Rational(1, 2) if lo >= 0 and hi == float("inf") else 1
        return Cost(H * causal * 2 * T * keys * (D + V), WORD * H * T * (2 * D + 2 * V),
                    H * 2 * ctx * (D + V), WORD * H * ctx * (D + V), H * ctx * (D + V))
    if tp.strategy == "toeplitz":
        n = 2 * T  # three real FFTs of size 2T and a pointwise product
        fft = H * V * (3 * sympy.Rational(5, 2) * n * sympy.log(n, 2) + 6 * n)
        direct = H * V * 2 * T * L
        return Cost(sympy.Min(fft, direct), WORD * H * V * 2 * T, H * V * 2 * L,
                    WORD * H * V * 2 * L, H * V * (L - 1))
    if tp.strategy == "diagonal":
        return Cost(H * V * 2 * T, WORD * H * V * 2 * T, H * V * 2, WORD * H * V * 2, 0)
    return dense_cost(mp, groups)


def polynomial_choice(tp, mp, groups) -> tuple:
    """Prefill FLOPs per head of a polynomial kernel (no decay) computed
    quadratically (f(q k^T) masked, times V; plus the feature-map state for
    decode) and as a chunked feature map of F = sum_d K^d features."""
    V = _value_width(mp, groups)
    K, F = dim(tp.flags["dim"]), _rank(tp, mp)
    degree = tp.flags["features"].degree
    quadratic = T * T * (2 * K + 2 * V + 2 * degree) + 2 * T * F * V
    features = 2 * T * C * (F + V) + 4 * T * F * V + 2 * T * F * V / C + 2 * T * F
    return quadratic, features


ELEMENTWISE = 8  # an elementwise FLOP costs about this many matmul FLOPs on a CPU


def per_channel_choice(tp, mp, groups) -> tuple:
    """Per-head cost of a per-channel decay term as a recurrence (elementwise
    O(T K V), weighted) and in chunks (matmuls plus exact sub-chunk decays)."""
    V = _value_width(mp, groups)
    K = _rank(tp, mp)
    scan = ELEMENTWISE * T * K * V * 4 + 2 * T * K * V
    chunked = 2 * T * C * (K + V) + 4 * T * K * V + 2 * T * K * V / C \
        + ELEMENTWISE * 3 * T * 16 * K
    return scan, chunked


TENSOR_CORE = 16  # a tensor-core FLOP costs about 1/16 of an elementwise one on a GPU
TENSOR_TILE = 16  # dots pad their dims to tiles of 16


def gpu_per_channel_choice(tp, mp, groups) -> tuple:
    """Per-head cost per token of a per-channel decay term on a GPU, in
    elementwise FLOPs, as a scan (templates/triton_scan.py.jinja: per state
    entry a decay, an update, a read of the output and the scan's combines,
    no tensor cores) and in chunks (templates/triton_per_channel.py.jinja:
    tensor-core dots whose value dim pads to 16, plus the exact pairwise
    decays of the diagonal sub-blocks of 16 steps). A small value dim per
    head (Mamba-1: 1) makes the scan cheaper; K = V = 128 (GLA) the chunks."""
    V = _value_width(mp, groups)
    K = _rank(tp, mp)
    padded = sympy.Max(V, TENSOR_TILE)
    scan = 8 * K * V
    chunks = (2 * C * (K + padded) + 4 * K * padded) / TENSOR_CORE + 3 * TENSOR_TILE * K + 4 * K
    return scan, chunks


def gpu_per_channel_rule(tp, mp, groups, taken=()) -> str:
    """The GPU choice between scan and chunks in words, for explain: settled
    when one is cheaper at every size, else the inequality checked per call."""
    scan, chunks = gpu_per_channel_choice(tp, mp, groups)
    diff = sympy.simplify(chunks - scan)
    if diff.is_nonnegative:
        return "scan (cheaper than chunks at every size)"
    if diff.is_negative:
        return "chunks (cheaper than a scan at every size)"
    return f"scan when {readable(scan, taken)} <= {readable(chunks, taken)}, else chunks (per call)"


def as_python(expr: sympy.Expr, chunk: str, dim_local) -> str:
    """Python code for a cost expression inside a generated forward, where the
    sequence length is `time`, dim d's size the local `dim_local(d)` and the
    chunk length the code `chunk`."""
    subs = {T: sympy.Symbol("time"), C: sympy.Symbol(chunk)}
    for s in expr.free_symbols - set(subs):
        subs[s] = sympy.Symbol(dim_local(s.name))
    return sympy.pycode(expr.xreplace(subs), fully_qualified_modules=True)


def readable(expr: sympy.Expr, taken=()) -> sympy.Expr:
    """expr with T, t, the chunk and kernel lengths as plain symbols, named
    so that none reads as one of the mixer's own names (`taken`)."""
    subs = {}
    for sym, names in SPECIAL.items():
        name = next((n for n in names if n not in taken), names[-1] + "_")
        subs[sym] = sympy.Symbol(name, positive=True)
    return expr.xreplace(subs)


def dense_cost(mp, groups) -> Cost:
    """The dense fallback: the T x T matrix per head, and the whole history."""
    H, V = prod(mp.heads), _value_width(mp, groups)
    return Cost(H * T * T * (2 * V + 8), WORD * H * T * T, H * t * (2 * V + 8),
                WORD * H * t * (V + 1), H * t * V)


def matrix_cost(mp, groups: dict) -> Cost:
    parts = [term_cost(tp, mp, groups) for tp in mp.terms]
    return Cost(*(sum((getattr(c, f) for c in parts), sympy.Integer(0))
                  for f in ("prefill_flops", "prefill_bytes", "decode_flops", "decode_bytes",
                            "state")))


def evaluate(expr: sympy.Expr, sizes: dict) -> float:
    """expr at `sizes`: dims by name, plus T, t, C (chunk) and L (kernel length)."""
    subs = {sympy.Symbol(k, positive=True): v for k, v in sizes.items() if not k.isdigit()}
    for sym, names in SPECIAL.items():
        value = next((sizes[n] for n in names if n in sizes), None)
        if value is not None:
            subs[sym] = value
    return float(expr.subs(subs))
