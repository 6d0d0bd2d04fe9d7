"""Diagonal terms (band t - s == 0): y_t += d_t * u_t, no matrix at all.
Hydra's free diagonal `diag(delta)` is one."""

from mixerc import planner

NAME = "diagonal"
VERSION = "1"


def match(parts, mp, program):
    if parts.wrappers or parts.band != (0, 0):
        return None
    if parts.lowranks or parts.decays or parts.softmaxes or parts.toeplitz or parts.rest:
        return None
    if any(planner.analysis.exact_band(m) != (0, 0) for m in parts.masks):
        # a mask that is not exactly t == s cannot be dropped
        return None
    d = None
    for f in parts.rows + parts.cols + parts.statics:
        d = planner.mul(d, f, program.groups)
    if d is None:
        return None
    return planner.TermPlan(NAME, parts, {"d": d}, {}, state=False)


def emit(tp, mp, w, key, values):
    d = w.canon(tp.operands["d"], mp.heads, ())
    return f"{d}[..., None] * {values}"


def space(tp):
    return {}
