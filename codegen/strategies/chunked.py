"""Chunked semiseparable algorithm: masked low rank with a scalar decay
(linear attention, RetNet, SSD), a per-channel decay inside the contraction
(GLA, Mamba-1), a time-invariant modal kernel (H3's SSM), and a polynomial of a
low-rank product expanded into a feature map (Based).

Template: codegen/templates/torch/chunked.py.jinja.

Backward: for a scalar decay (or none) the generated code calls the rendered
forward through runtime/autograd.py `chunked_apply`, whose backward runs that
same forward on the adjoint problems (dq causal, dk and dv time-reversed,
the decay gradient a reverse cumulative sum). A per-channel decay
differentiates by autograd through the chunked code.
"""

import math

from mixerc import analysis, ir, planner
from mixerc.ir import STATIC, Type

NAME = "chunked"
VERSION = "2"
INF = math.inf


def _lower_band(parts):
    """0 (s <= t) or 1 (s < t) if the masks and decays make the term causal with
    no upper limit on t - s; None otherwise."""
    lo, hi = (-INF, INF)
    for m in parts.masks:
        b = analysis.exact_band(m)
        if b is None:
            return None
        lo, hi = max(lo, b[0]), min(hi, b[1])
    if parts.decays:
        lo = max(lo, 0)
    if hi != INF or lo not in (0, 1):
        return None
    return int(lo)


def match(parts, mp, program):
    if parts.softmaxes or parts.toeplitz or any(w[0] == "transpose" for w in parts.wrappers):
        return None
    strict = _lower_band(parts)
    if strict is None:
        return None
    g = program.groups
    flags = {"strict": bool(strict), "features": None}
    if len(parts.lowranks) == 1 and not parts.rest and not parts.summed:
        lr = parts.lowranks[0]
        q, k, dim = lr.u, lr.w, lr.dim
    elif not parts.lowranks and len(parts.rest) == 1 and not parts.summed:
        poly = analysis.polynomial_of_lowrank(parts.rest[0])
        if poly is None or parts.rows or parts.statics or parts.cols:
            # scale factors cannot be folded into q or k: f(c z) is not c f(z)
            return None
        q, k, dim = poly.lowrank.u, poly.lowrank.w, poly.lowrank.dim
        flags["features"] = poly  # f(z) = sum_d c_d z^d, z = u . w, as a feature map
    elif not parts.lowranks and not parts.rest and len(parts.summed) == 1 and parts.decays \
            and all(d.a.type.kind == STATIC for d in parts.decays) and not parts.rows \
            and not parts.cols:
        # time-invariant kernel sum_n c_n exp(a_n (t - s)): a modal SSM
        dim = parts.summed[0]
        q = None
        for f in parts.statics:
            q = planner.mul(q, f, g)
        if q is None or dim not in q.type.dims:
            return None
        k = ir.Const(Type(STATIC), value=1.0)
        parts = _without_statics(parts)
    elif not parts.lowranks and not parts.rest and not parts.summed:
        # no low-rank factor at all (a mask, a decay: cumsum, EMA): rank one
        q = k = ir.Const(Type(STATIC), value=1.0)
        dim = "1"
    else:
        return None
    for f in parts.rows + parts.statics:
        q = planner.mul(q, f, g)
    for f in parts.cols:
        k = planner.mul(k, f, g)
    a = None
    for d in parts.decays:
        a = planner.add(a, d.a, g)
    flags["has_decay"] = a is not None
    flags["per_channel"] = a is not None and dim in a.type.dims
    flags["dim"] = dim
    return planner.TermPlan(NAME, parts, {"q": q, "k": k, "a": a}, flags)


def _without_statics(parts):
    parts.statics = []
    return parts


def emit(tp, mp, w, key, values):
    f = tp.flags
    dim = f["dim"]
    q = w.assign(w.canon(tp.operands["q"], mp.heads, (dim,)))
    k = w.assign(w.canon(tp.operands["k"], mp.heads, (dim,)))
    if f["features"] is not None:
        poly = f["features"]
        c = w.assign(w.coefficients(poly), hint="coeffs")
        ones = ", ".join(["1.0"] * (poly.degree + 1))
        if not f["has_decay"]:
            return _emit_polynomial(tp, mp, w, key, values, q, k, c, ones)
        what = repr(_term_name(w, mp, key))  # named in the error for a too large feature map
        q = w.assign(f"poly_features({q}, {c}, {what})")
        k = w.assign(f"poly_features({k}, [{ones}], {what})")
    a = "None"
    if f["has_decay"]:
        a = w.assign(w.canon(tp.operands["a"], mp.heads, (dim,) if f["per_channel"] else ()))
    fn = w.function("torch/chunked.py.jinja", base="chunked", per_channel=f["per_channel"],
                    strict=f["strict"], has_decay=f["has_decay"],
                    title=mp.info.cls + (" (feature map)" if f["features"] is not None else ""))
    chunk = w.config_key(key, "chunk", tp)
    extra = f", sub={w.config_key(key, 'sub', tp)}" if f["per_channel"] else ""
    y = w.fresh("y")
    if f["per_channel"]:
        # No adjoint template for a decay inside the contraction yet (dq would
        # need the decay along the value dim): autograd records the steps.
        from mixerc import cost

        scan = w.function("torch/scan.py.jinja", base="recurrent", strict=f["strict"],
                          title=mp.info.cls)
        scan_cost, chunked_cost = cost.per_channel_choice(tp, mp, w.program.groups)
        sc, cc = w.fresh("scan_cost"), w.fresh("chunked_cost")
        w.line("# cost model (per head, elementwise ops weighted): a recurrence or chunks")
        w.line(f"{sc} = {cost.as_python(scan_cost, chunk, w.dim)}")
        w.line(f"{cc} = {cost.as_python(chunked_cost, chunk, w.dim)}")
        w.line("# backward: autograd through the chunks or the steps (per-channel decay)")
        w.line(f"if {sc} <= {cc} or time == 1:")
        w.line(f"    {y}, new_state[{key!r}] = {scan}({q}, {k}, {values}, {a}, "
               f"state.get({key!r}), {chunk})")
        w.line("else:")
        w.line(f"    {y}, new_state[{key!r}] = {fn}({q}, {k}, {values}, {a}, state.get({key!r}), "
               f"{chunk}{extra})")
    else:
        # Scalar decay: the backward is three more runs of `fn` on adjoint
        # problems (runtime/autograd.py), saving only the inputs.
        w.line("# backward: the same chunked mixer on the adjoint problems (runtime/autograd.py)")
        w.line(f"{y}, new_state[{key!r}] = chunked_apply({fn}, {q}, {k}, {values}, {a}, "
               f"state.get({key!r}), {chunk})")
    return y


def _term_name(w, mp, key) -> str:
    term = f", term {int(key.rsplit('.term', 1)[1]) + 1}" if ".term" in key else ""
    return f"mixer {w.program.name}, matrix {mp.name}{term}"


def _emit_polynomial(tp, mp, w, key, values, q, k, c, ones):
    """A polynomial kernel without decay: the quadratic form below the cost
    model's crossover length, the chunked feature map above it (per call).
    Where the feature map would be too large (runtime/tokens.py
    MAX_POLY_FEATURES, decided by K and the degree, so the same for every
    call and the state keeps one form), the quadratic form over the keys and
    values so far."""
    from mixerc import cost
    from mixerc.runtime.tokens import MAX_POLY_FEATURES

    f = tp.flags
    quadratic, features = cost.polynomial_choice(tp, mp, w.program.groups)
    chunk = w.config_key(key, "chunk", tp)
    quad = w.function("torch/poly_quadratic.py.jinja", base="poly_quadratic", strict=f["strict"])
    fn = w.function("torch/chunked.py.jinja", base="chunked", per_channel=False,
                    strict=f["strict"], has_decay=False, title=mp.info.cls + " (feature map)")
    qf, ff = w.fresh("quadratic_flops"), w.fresh("feature_flops")
    w.line("# cost model (FLOPs per head): the quadratic form or the chunked feature map")
    w.line(f"{qf} = {cost.as_python(quadratic, chunk, w.dim)}")
    w.line(f"{ff} = {cost.as_python(features, chunk, w.dim)}")
    y = w.fresh("y")
    hist = w.function("torch/poly_history.py.jinja", base="poly_history", strict=f["strict"])
    size = f"sum({q}.shape[-1] ** d for d in range({tp.flags['features'].degree + 1}))"
    w.line(f"if {size} > {MAX_POLY_FEATURES}:  # feature map too large: keep k, v")
    w.line(f"    {y}, new_state[{key!r}] = {hist}({q}, {k}, {values}, {c}, state.get({key!r}))")
    w.line(f"elif {qf} <= {ff}:")
    w.line(f"    {y}, new_state[{key!r}] = {quad}({q}, {k}, {values}, {c}, state.get({key!r}))")
    w.line("else:")
    w.line(f"    {y}, new_state[{key!r}] = chunked_apply({fn}, poly_features({q}, {c}), "
           f"poly_features({k}, [{ones}]), {values}, None, state.get({key!r}), {chunk})")
    return y


CHUNK, SUB = 64, 16  # defaults: always allowed, so no search is needed to run


def space(tp):
    s = {"chunk": ([16, 32, 64, 128, 256], CHUNK)}
    if tp.flags["per_channel"]:
        s["sub"] = ([8, 16, 32], SUB)
    return s


def constraints(tp, key):
    """Python expressions over `cfg` and `T` that a config must satisfy (rendered
    into the generated module's `config_allowed`); the defaults satisfy them for
    every T."""
    chunk = f"cfg[{key + '.chunk'!r}]"
    out = [f"({chunk} < 2 * max(T, 16) or {chunk} == {CHUNK})"]  # no chunk far longer than T
    if tp.flags["per_channel"]:
        out.append(f"cfg[{key + '.sub'!r}] <= {chunk}")
    return out
