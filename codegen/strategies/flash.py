"""Softmax attention whose mask is a band lo <= t - s <= hi: flash-style online
softmax over key blocks (skipping blocks outside the band, masking only the
ones that straddle it), SDPA where it is exactly the same, KV-cache decode (a
fixed-size ring buffer for a finite window).

Claims `c * softmax(a * (u @ w^T), mask=band)` with static c and a; anything
else in the scores (biases, other factors) is left to the dense fallback.
Template: codegen/templates/torch/flash.py.jinja.
"""

import math

from mixerc import analysis, ir, planner
from mixerc.ir import STATIC, Type

NAME = "flash"
VERSION = "3"
INF = math.inf
MINUS_ONE = ir.Const(Type(STATIC), value=-1.0)


def _scaled_lowrank(node, ops=()):
    """(LowRank, [(op, static)]) when node = u @ w^T scaled by statics (op is
    "mul" or "div"); None for any other structure."""
    if isinstance(node, ir.Contract):
        return _scaled_lowrank(node.x, ops)
    if isinstance(node, ir.LowRank):
        return node, list(ops)
    if not isinstance(node, ir.Map):
        return None
    a = node.args
    if node.op == "neg":
        return _scaled_lowrank(a[0], ops + (("mul", MINUS_ONE),))
    if node.op == "mul" and a[0].type.kind == STATIC:
        return _scaled_lowrank(a[1], ops + (("mul", a[0]),))
    if node.op == "mul" and a[1].type.kind == STATIC:
        return _scaled_lowrank(a[0], ops + (("mul", a[1]),))
    if node.op == "div" and a[1].type.kind == STATIC:
        return _scaled_lowrank(a[0], ops + (("div", a[1]),))
    return None


def _outer_scale(node, softmax, g):
    """The static factor c of a term c * softmax(...) (None for 1), walking the
    term itself so that signs are kept; False if the term has other factors."""
    if node is softmax:
        return None
    if isinstance(node, ir.Contract):
        return _outer_scale(node.x, softmax, g)
    if isinstance(node, ir.Map) and node.op in ("mul", "div", "neg"):
        a = node.args
        if node.op == "neg":
            inner = _outer_scale(a[0], softmax, g)
            return False if inner is False else planner.mul(inner, MINUS_ONE, g)
        static = [x for x in a if x.type.kind == STATIC]
        other = [x for x in a if x.type.kind != STATIC]
        if len(static) != 1 or len(other) != 1 or (node.op == "div" and static[0] is not a[1]):
            return False
        inner = _outer_scale(other[0], softmax, g)
        if inner is False:
            return False
        c = static[0] if node.op == "mul" else _div(ir.Const(Type(STATIC), value=1.0),
                                                     static[0], g)
        return planner.mul(inner, c, g)
    return False


def _div(a, b, g):
    return ir.Map(Type(a.type.kind if a.type.kind != STATIC else b.type.kind,
                       planner.union_dims(a.type.dims, b.type.dims, g)), op="div", args=(a, b))


def _band(softmax):
    if softmax.mask is None:
        return (-INF, INF)
    b = analysis.exact_band(softmax.mask)
    if b is None or b[0] > b[1]:
        return None  # not a band in t - s (or empty): dense
    return tuple(x if abs(x) == INF else int(x) for x in b)


def match(parts, mp, program):
    if len(parts.softmaxes) != 1 or parts.summed or any(
            getattr(parts, f) for f in ("lowranks", "decays", "rows", "cols", "masks",
                                        "toeplitz", "rest")):
        return None
    if any(w[0] == "transpose" for w in parts.wrappers):
        return None
    sm = parts.softmaxes[0]
    band = _band(sm)
    scaled = _scaled_lowrank(sm.scores)
    if band is None or scaled is None:
        return None
    inner = parts.node
    while isinstance(inner, (ir.Shift, ir.Rev, ir.Contract)):
        inner = inner.children()[0]
    g = program.groups
    scale = _outer_scale(inner, sm, g)
    if scale is False:
        return None
    lr, ops = scaled
    ok = set(mp.heads) | {d for d, h in g.items() if h in mp.heads}
    if any(not set(s.type.dims) <= ok | {lr.dim} for _, s in ops) or \
            (scale is not None and not set(scale.type.dims) <= ok):
        return None  # a scale over other dims: not a per-head scalar
    q = lr.u
    for op, s in ops:
        q = planner.mul(q, s, g) if op == "mul" else _div(q, s, g)
    lo, hi = band
    flags = {"dim": lr.dim, "lo": lo, "hi": hi,
             "cache": lo >= 0,                       # causal: a KV cache carries over
             "window": lo >= 0 and hi != INF,        # ... of fixed size hi
             "sdpa": (lo, hi) in ((0, INF), (-INF, INF))}
    return planner.TermPlan(NAME, parts, {"q": q, "k": lr.w, "scale": scale}, flags,
                            state=flags["cache"])


def _num(x) -> str:
    return "math.inf" if x == INF else "-math.inf" if x == -INF else str(x)


def _var(w, expr, hint):
    return expr if expr.isidentifier() else w.assign(expr, hint=hint)


def emit(tp, mp, w, key, values):
    f = tp.flags
    q, k = (_var(w, w.canon(tp.operands[x], mp.heads, (f["dim"],)), x) for x in "qk")
    fn = w.function("torch/flash.py.jinja", base="flash", cache=f["cache"], window=f["window"],
                    sdpa=f["sdpa"], causal=f["lo"] == 0)
    args = [q, k, values]
    outs = [w.fresh("y")]
    if f["cache"]:
        names = [f"{key}.k", f"{key}.v"] + ([f"{key}.filled"] if f["window"] else [])
        args += [f"state.get({n!r})" for n in names]
        outs += [f"new_state[{n!r}]" for n in names]
    args += [f"lo={_num(f['lo'])}", f"hi={_num(f['hi'])}",
             f"block_q={w.config_key(key, 'block_q', tp)}",
             f"block_k={w.config_key(key, 'block_k', tp)}"]
    if f["sdpa"]:
        args.append(f"sdpa={w.config_key(key, 'sdpa', tp)}")
    w.line(f"{', '.join(outs)} = {fn}({', '.join(args)})")
    y = outs[0]
    c = tp.operands["scale"]
    if c is not None:  # c * softmax(...): scale the output
        cv = w.value(c) if not c.type.dims else w.canon(c, mp.heads, ()) + "[..., None]"
        y = w.assign(f"{y} * {cv}", hint="y")
    return y


# the fastest blocks measured on a 2-core CPU (B=1, H=8, D=64, float32, T = 2k..8k)
BLOCK_Q, BLOCK_K = 256, 1024


def space(tp):
    s = {"block_q": ([32, 64, 128, 256, 512], BLOCK_Q),
         "block_k": ([64, 128, 256, 512, 1024, 2048], BLOCK_K)}
    if tp.flags["sdpa"]:
        s["sdpa"] = ([True, False], True)
    return s


def constraints(tp, key):
    """Python expressions over `cfg` and `T` that a config must satisfy."""
    q, k = f"cfg[{key + '.block_q'!r}]", f"cfg[{key + '.block_k'!r}]"
    # no block far longer than the input (the defaults stay allowed)
    out = [f"({q} < 2 * max(T, 32) or {q} == {BLOCK_Q})",
           f"({k} < 2 * max(T, 64) or {k} == {BLOCK_K})"]
    if tp.flags["sdpa"]:  # SDPA ignores the blocks: try it once, with the defaults
        out.append(f"(not cfg[{key + '.sdpa'!r}] or ({q} == {BLOCK_Q} and {k} == {BLOCK_K}))")
    return out
