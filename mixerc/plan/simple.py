"""Diagonal and Toeplitz terms.

* diagonal (band t - s == 0): y_t += d_t * u_t, no matrix at all (Hydra's
  free diagonal `diag(delta)`);
* Toeplitz (time-invariant) M[t, s] = h[t - s], 0 <= t - s < L: a lag kernel
  passed at run time (`toeplitz(h)`, h: [L, *dims]) or the taps of a static
  weight (`conv(u, w)`, w: [*dims, taps]), times static scale factors.
  Direct multiply-adds for short kernels, FFT convolution padded to
  >= T + L - 1 for long ones; decode keeps the last L - 1 inputs. Band masks
  cut or zero taps; a transpose is a time reversal (M^T = J M J).
"""

from __future__ import annotations

from .. import analysis, ir
from ..ir import KERNEL
from .model import INF, MaskPlan, Operand, StatePlan, StateTensor, TermPlan
from .parts import masks_band, mul


def match_diagonal(parts, mp, program, index) -> TermPlan | None:
    if parts.wrappers or parts.band != (0, 0):
        return None
    if parts.lowranks or parts.decays or parts.softmaxes or parts.toeplitz or parts.rest:
        return None
    if any(analysis.exact_band(m) != (0, 0) for m in parts.masks):
        return None  # a mask that is not exactly t == s cannot be dropped
    d = None
    for f in parts.rows + parts.cols + parts.statics:
        d = mul(d, f, program.groups)
    if d is None:
        return None
    return TermPlan(index, parts.node, "diagonal", [], {"d": Operand("d", d, d.type.dims)},
                    MaskPlan(None, (0, 0), True), {}, StatePlan("none", [], "nothing"),
                    "autograd (elementwise)")


def _covered(node, heads, groups) -> bool:
    return all(d in heads or groups.get(d) in heads for d in node.type.dims)


def match_toeplitz(parts, mp, program, index) -> TermPlan | None:
    if len(parts.toeplitz) != 1 or parts.summed or parts.lowranks or parts.decays or \
            parts.rows or parts.cols or parts.softmaxes or parts.rest:
        return None
    h = parts.toeplitz[0].h
    if h.type.kind != KERNEL:
        return None
    if not all(_covered(n, mp.heads, program.groups) for n in [h] + parts.statics):
        return None
    if any(program.groups.get(d) in a.u.type.dims for d in mp.heads for a in mp.applies):
        return None  # a kernel per group applied to per-head values: no layout for it yet
    band = masks_band(parts.masks)
    if band is None:
        return None
    lo, hi = band
    if hi < max(lo, 0):
        return None  # the masks leave nothing of the kernel
    # M^T = J M J for any Toeplitz M, and shifts and reversals keep it Toeplitz
    wrappers = [("rev",) if w[0] == "transpose" else w for w in parts.wrappers]
    taps = int(h.tap_dim) if isinstance(h, ir.Taps) and h.tap_dim.isdigit() else INF
    flags = {"first": int(lo) if lo > 0 else 0,
             "stop": int(hi) + 1 if hi < taps - 1 else None}
    operands = {"h": Operand("kernel", h, h.type.dims)}
    operands.update({f"scale{i}": Operand("scale", s, s.type.dims)
                     for i, s in enumerate(parts.statics)})
    keep = f"{int(hi)}" if hi != INF else ("L - 1" if taps == INF else str(taps - 1))
    state = StatePlan("conv", [StateTensor("inputs", (keep, *mp.heads, mp.value_label))],
                      f"the last {keep} inputs")
    return TermPlan(index, parts.node, "toeplitz", wrappers, operands,
                    MaskPlan(None, (max(lo, 0), hi), True), flags, state,
                    "autograd (FFT or direct taps)")


def dense_term(parts, mp, program, index, why: str) -> TermPlan:
    """No fast strategy: the dense interpreter evaluates the term (O(T^2)), and
    its decode state is the whole input history."""
    return TermPlan(index, parts.node, "dense", list(parts.wrappers), {},
                    MaskPlan(None, analysis.band(parts.node), False), {},
                    StatePlan("history", [StateTensor("inputs", ("time", "..."))],
                              "every input so far"), "autograd through the dense "
                    "interpreter", why=why)

