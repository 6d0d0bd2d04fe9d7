"""Toeplitz (time-invariant) matrices M[t, s] = h[t - s], 0 <= t - s < L: a
lag kernel passed at run time (`toeplitz(h)`, h: [L, *dims]) or the taps of a
static weight (`conv(u, w)`, w: [*dims, taps]), times static scale factors.
Direct multiply-adds for short kernels and decode steps, FFT convolution
padded to >= T + L - 1 for long ones; decode keeps the last L - 1 inputs.

Band masks are applied exactly by cutting or zeroing taps; anything else
(decays, low-rank factors, token gates inside the matrix) is left to other
strategies. A modal kernel sum_n c_n exp(a_n (t - s)) has no Toeplitz factor:
chunked claims it (its decode state is O(N), not O(L)).

Template: codegen/templates/torch/toeplitz.py.jinja; helpers: runtime/conv.py.
"""

import dataclasses
import math

from mixerc import analysis, ir, planner
from mixerc.codegen.emit import axes_of
from mixerc.ir import KERNEL

NAME = "toeplitz"
VERSION = "1"
INF = math.inf


def _band(parts):
    """(lo, hi) of t - s the masks allow (None if one is not exactly a band)."""
    lo, hi = -INF, INF
    for m in parts.masks:
        b = analysis.exact_band(m)
        if b is None:
            return None
        lo, hi = max(lo, b[0]), min(hi, b[1])
    return lo, hi


def _covered(node, heads, groups) -> bool:
    """Every dim of node is a head of the matrix (or a group of one)."""
    return all(d in heads or groups.get(d) in heads for d in node.type.dims)


def match(parts, mp, program):
    if len(parts.toeplitz) != 1 or parts.summed or parts.lowranks or parts.decays or \
            parts.rows or parts.cols or parts.softmaxes or parts.rest:
        return None
    h = parts.toeplitz[0].h
    if h.type.kind != KERNEL:
        return None
    if not all(_covered(n, mp.heads, program.groups) for n in [h] + parts.statics):
        return None
    if any(program.groups.get(d) in a.u.type.dims for d in mp.heads for a in mp.applies):
        # a kernel per group applied to per-head values: the writer has no
        # [B, T, G, (H / G) V] layout for that yet, so the dense fallback runs
        return None
    band = _band(parts)
    if band is None:
        return None
    lo, hi = band
    if hi < max(lo, 0):
        return None  # the masks leave nothing of the kernel: not worth a strategy
    # M^T = J M J for any Toeplitz M (J reverses time), and shifts and reversals
    # keep a matrix Toeplitz, so a transpose anywhere among the wrappers is a rev
    wrappers = [("rev",) if w[0] == "transpose" else w for w in parts.wrappers]
    parts = dataclasses.replace(parts, wrappers=wrappers)
    taps = int(h.tap_dim) if isinstance(h, ir.Taps) and h.tap_dim.isdigit() else INF
    flags = {"first": int(lo) if lo > 0 else 0, "stop": int(hi) + 1 if hi < taps - 1 else None}
    operands = {"h": h}
    operands.update({f"scale{i}": s for i, s in enumerate(parts.statics)})
    return planner.TermPlan(NAME, parts, operands, flags)


def emit(tp, mp, w, key, values):
    heads = mp.heads
    dst = ("l",) + tuple(heads)
    h = tp.operands["h"]
    kern = w.convert(w.value(h), axes_of(h), dst, expand=True)
    for name, s in tp.operands.items():
        if name.startswith("scale"):  # static scale factors fold into the kernel
            kern = f"{kern} * {w.convert(w.value(s), axes_of(s), dst)}"
    kern = kern if kern.isidentifier() else f"({kern})"
    hk = w.assign(f"{kern}.reshape(-1, {w.size_expr(heads)})", hint="h")
    first, stop = tp.flags["first"], tp.flags["stop"]
    if stop is not None:  # mask t - s <= stop - 1: drop the later taps
        w.line(f"{hk} = {hk}[:{stop}]")
    if first:  # mask t - s >= first: zero the earlier taps
        w.line(f"{hk} = torch.cat([torch.zeros_like({hk}[:{first}]), {hk}[{first}:]])")
    fn = w.function("torch/toeplitz.py.jinja", base="toeplitz", title=mp.info.cls)
    y = w.fresh("y")
    w.line(f"{y}, new_state[{key!r}] = {fn}({values}, {hk}, state.get({key!r}), "
           f"{w.config_key(key, 'direct_max', tp)})")
    return y


def space(tp):
    # taps cost O(L T), the FFT O(T log T) flat in L: on a 2-core CPU (float32,
    # 512 channels, T = 2k..8k) they cross near L = 28
    return {"direct_max": ([4, 8, 16, 24, 32, 64, 128], 24)}
