"""Plan stage: IR + analysis -> kernel plan (mixerc/plan/model.py).

Each sequence matrix is split into additive terms, each term into wrappers
around a Hadamard product of factors (parts.py); the matchers (softmax.py,
lowrank.py, simple.py) each claim the terms their strategy computes. A term
no matcher claims runs through the dense interpreter, and the plan records a
warning naming it and what kept it from a fast strategy: compiling such a
mixer warns (MixerPerformanceWarning), `explain` says so, nothing is silent.
"""

from __future__ import annotations

import re

from .. import analysis, cost, ir
from .model import (INF, MaskPlan, MatrixPlan, ModulePlan, Operand, ScorePlan, StatePlan,
                    StateTensor, TermPlan)
from .parts import Parts, decompose
from .simple import dense_term, match_diagonal, match_toeplitz
from . import lowrank, softmax

MATCHERS = (match_diagonal, softmax.match, match_toeplitz, lowrank.match)

__all__ = ["plan", "describe", "ModulePlan", "MatrixPlan", "TermPlan", "Operand", "MaskPlan",
           "ScorePlan", "StatePlan", "StateTensor", "Parts", "decompose", "INF"]


def plan(program: ir.Program, result: analysis.Analysis | None = None) -> ModulePlan:
    result = result or analysis.analyze(program)
    matrices, warnings, keys = [], [], set()
    for info, applies in _independent(result.matrices):
        node = applies[0].m
        mp = MatrixPlan(info.name, _unique(_key(info.name), keys), node, applies,
                        _heads(node, applies, program), [], info)
        mp.value_label = _value_label(mp, program)
        for i, term in enumerate(analysis.terms(node)):
            parts = decompose(term)
            tp = None
            for matcher in MATCHERS:
                tp = matcher(parts, mp, program, i)
                if tp is not None:
                    break
            if tp is None:
                why = why_dense(parts)
                tp = dense_term(parts, mp, program, i, why)
                where = term.loc or info.apply.loc
                warnings.append((where, f"{where}: matrix {info.name}: this term runs through the "
                                 f"dense interpreter (O(T^2) time and memory): {why}"))
            if tp.strategy == "chunked" and mp.normalizer:
                tp.flags["normalizer"] = True  # the values end with M @ 1's ones
            mp.terms.append(tp)
        matrices.append(mp)
    _find_skips(program, matrices)
    return ModulePlan(program, result, matrices, warnings)


def _find_skips(program: ir.Program, matrices: list) -> None:
    """Set MatrixPlan.skip where the program computes M @ u + d * u (d a
    per-head param) and reads M @ u nowhere else, and MatrixPlan.divide where
    it computes (M @ v) / (M @ 1) and reads neither anywhere else."""
    readers: dict = {}
    for n in program.nodes():
        for c in n.children():
            readers[id(c)] = readers.get(id(c), 0) + 1
    for n in list(program.outs.values()) + list(program.lets.values()):
        readers[id(n)] = readers.get(id(n), 0) + 1
    for n in program.nodes():
        if isinstance(n, ir.Map) and n.op == "div" and len(n.args) == 2:
            mp = next((m for m in matrices if m.normalizer and len(m.applies) == 2 and
                       tuple(m.applies) == tuple(n.args)), None)
            if mp is not None and all(readers.get(id(a)) == 1 for a in n.args):
                mp.divide = n
        if not (isinstance(n, ir.Map) and n.op == "add" and len(n.args) == 2):
            continue
        for apply, other in (n.args, n.args[::-1]):
            mp = next((m for m in matrices if len(m.applies) == 1 and m.applies[0] is apply),
                      None)
            if mp is None or readers.get(id(apply)) != 1 or mp.skip is not None:
                continue
            if not (isinstance(other, ir.Map) and other.op == "mul" and len(other.args) == 2):
                continue
            d, u = other.args if _skip_value(other.args[1], apply.u) else other.args[::-1]
            if _skip_value(u, apply.u) and d.type.kind == ir.STATIC and \
                    d.type.dims == tuple(mp.heads) and n.type.dims == apply.type.dims:
                mp.skip = (n, d, u)


def _skip_value(u, values) -> bool:
    """Whether d * u is a skip term of M @ values: u is the values, or an
    input they scale (Mamba's D * x beside M @ (delta * x)), which a kernel
    that scales x on load holds as well."""
    if u is values:
        return True
    if not isinstance(u, ir.Input) or u.type.dims != values.type.dims:
        return False
    stack = [values]
    while stack:  # the factors of a product (negations aside)
        n = stack.pop()
        if n is u:
            return True
        if isinstance(n, ir.Map) and n.op in ("mul", "neg"):
            stack.extend(n.args)
    return False


def _independent(matrices) -> list:
    """(info, applies) per group of applications of one matrix that can run as
    one call: an application whose vector is computed from another application
    of the same matrix (M @ (M @ x)) goes into a later group."""
    out = []
    for info in matrices:
        groups: list = []
        for a in info.applies:
            reached = {id(n) for n in ir.walk(a.u) if isinstance(n, ir.Apply)}
            for g in groups:
                if not any(id(b) in reached or id(a) in {id(n) for n in ir.walk(b.u)}
                           for b in g):
                    g.append(a)
                    break
            else:
                groups.append([a])
        out.extend((info, g) for g in groups)
    return out


def _key(name: str) -> str:
    """A matrix name as a config/state key: conv(w_shift) -> conv_w_shift."""
    key = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "m"
    return key if not key[0].isdigit() else "m_" + key


def _unique(key: str, taken: set) -> str:
    out, n = key, 2
    while out in taken:
        out, n = f"{key}_{n}", n + 1
    taken.add(out)
    return out


def _heads(matrix: ir.Node, applies: list, program: ir.Program) -> tuple:
    """The matrix's dims as its applications see them: a group dim G of the
    matrix applied to values with the head dim H becomes H (the matrix is
    shared by the heads of a group), so operands and values line up."""
    g = program.groups
    out = []
    for d in matrix.type.dims:
        h = g.get(d)
        if h and h not in matrix.type.dims and all(
                h in a.u.type.dims and d not in a.u.type.dims for a in applies):
            out.append(h)
        else:
            out.append(d)
    return tuple(out)


def value_dims(apply: ir.Apply, heads: tuple, groups: dict) -> tuple:
    """The dims of the values an application reads that are not heads of the matrix.
    A group dim G reads as its head dim H only when the values lack H (the
    checker's rule): values [G, H] keep G as a dim of their own."""
    dims = apply.u.type.dims
    out = []
    for d in dims:
        h = groups.get(d)
        mapped = h if h and h in heads and d not in heads and h not in dims else d
        if mapped not in heads:
            out.append(mapped)
    return tuple(out)


def _value_label(mp: MatrixPlan, program: ir.Program) -> str:
    widths = [" * ".join(value_dims(a, mp.heads, program.groups)) or "1" for a in mp.applies]
    return " + ".join(widths)


def why_dense(parts: Parts) -> str:
    """What keeps a term from every fast strategy, in words."""
    if any(w[0] == "transpose" for w in parts.wrappers) and not parts.toeplitz:
        return "a transposed term (write it with rev() and shift(), as Hydra's backward does)"
    if parts.softmaxes:
        if len(parts.softmaxes) > 1 or parts.lowranks or parts.decays or parts.toeplitz \
                or parts.rest or parts.masks:
            return ("a softmax multiplied by another matrix (only static scales and row/col "
                    "gates may multiply a softmax; put masks inside softmax(..., mask=...))")
        sm = parts.softmaxes[0]
        if softmax.mask_plan(sm.mask, set()) is None and sm.mask is not None \
                and any(not isinstance(n, softmax.MASK_NODES) for n in ir.walk(sm.mask)
                        if n.type.kind == ir.MATRIX):
            return "the softmax's mask uses matrices other than t, s, row() and col()"
        return ("the softmax's scores are not an elementwise function of one dot product "
                "q @ k^T, t, s, per-token values (row, col) and per-head params")
    if parts.masks and any(analysis.exact_band(m) is None for m in parts.masks):
        return ("its mask is not a band lo <= t - s <= hi (a fast low-rank algorithm needs "
                "one); masks on absolute positions or per-token values need a softmax")
    if len(parts.lowranks) > 1:
        return "a product of two low-rank matrices (its rank is the product of theirs)"
    if parts.rest:
        kinds = ", ".join(sorted({getattr(f, "op", type(f).__name__) for f in parts.rest}))
        return (f"a factor that is not a low-rank product, decay, mask, Toeplitz kernel or "
                f"softmax ({kinds}); polynomials of q @ k^T have degree <= 8")
    if parts.lowranks or parts.decays:
        lo, hi = analysis.band(parts.node)
        return (f"its band t - s in [{lo}, {hi}] has no fast algorithm for this combination "
                "(causal bands start at lag 0 or 1; a per-channel decay needs a causal band "
                "with no upper bound)")
    return "no strategy covers this combination of factors"


# ------------------------------------------------------------------ explain


def describe(mplan: ModulePlan, backend: str = "torch", dtypes: dict | None = None,
             runs_on=None) -> str:
    """The plan in words: per matrix and term the strategy, operands, band,
    decode state, backward and cost (the cost of what runs). runs_on(term):
    what computes each term, for a backend that hands some terms to another."""
    p = mplan.program
    taken = set(p.dims) | set(p.inputs) | set(p.params) | set(p.kernels) | set(p.lets) \
        | set(p.outs)
    lines = [f"plan ({backend} backend):"]
    for mp in mplan.matrices:
        lines.append(f"  {mp.name}: {', '.join(mp.strategies)}")
        if mp.skip is not None:
            u = "the values" if mp.skip[2] is mp.applies[0].u else _node_text(mp.skip[2])
            lines.append(f"    skip: {_node_text(mp.skip[1])} * {u}, added to "
                         f"{mp.name} @ u (a chunked kernel or the scan adds it in its epilogue)")
        if mp.normalizer:
            lines.append(f"    normalizer: {mp.name} @ 1 (the row sums of {mp.name}; a chunked "
                         "kernel computes it from its score tiles and a state row"
                         + (", and divides by it in its epilogue)" if mp.divide is not None
                            else ")"))
        for tp in mp.terms:
            where = f" at {tp.loc}" if tp.loc else ""
            lines.append(f"    term {tp.index + 1}{where}: {_term_line(tp)}")
            if runs_on is not None:
                lines.append(f"      runs on: {runs_on(tp)}")
            if tp.strategy == "dense":
                lines.append(f"      missing: {tp.why}")
            for name, o in tp.operands.items():
                shape = ", ".join(o.heads + o.feature)
                lines.append(f"      {name}: [{shape}] {_node_text(o.node)}")
            lines.append(f"      decode state: {tp.state.describe()}")
            lines.append(f"      backward: {tp.backward}")
            if dtypes:
                lines.append(f"      dtypes: {dtypes.get(tp.strategy, dtypes.get('*', ''))}")
        c = cost.matrix_cost(mp, p.groups)
        lines.append(f"    prefill FLOPs  {cost.readable(c.prefill_flops, taken)}")
        lines.append(f"    prefill bytes  {cost.readable(c.prefill_bytes, taken)}")
        if mplan.analysis.causal:
            lines.append(f"    decode FLOPs/token  {cost.readable(c.decode_flops, taken)}")
            lines.append(f"    decode state elements  {cost.readable(c.state, taken)}")
    for loc, message in mplan.warnings:
        lines.append(f"  warning: {message}")
    return "\n".join(lines)


def _term_line(tp: TermPlan) -> str:
    f = tp.flags
    lo, hi = tp.mask.band
    band = ("all t, s" if (lo, hi) == (-INF, INF) else f"t - s <= {hi}" if lo == -INF else
            f"t - s >= {lo}" if hi == INF else f"{lo} <= t - s <= {hi}")
    bits = [tp.strategy, band]
    if tp.strategy == "flash":
        bits.append("scores: scale * q.k" if tp.score.pure else "scores: modified in the tile")
        if tp.mask.predicate is not None and not tp.mask.exact:
            bits.append("mask: evaluated per tile, tiles classified empty/full/partial")
    if f.get("has_decay"):
        bits.append("per-channel decay" if f.get("per_channel") else "scalar decay")
    if f.get("features") is not None:
        bits.append(f"polynomial of degree {f['features'].degree}")
    for w in tp.wrappers:
        bits.append({"rev": "reversed time", "transpose": "transposed"}.get(w[0]) or f"shifted by {w[1]}")
    return "; ".join(bits)


def _node_text(node: ir.Node) -> str:
    if isinstance(node, (ir.Input, ir.Param, ir.KernelRef)):
        return node.name
    if isinstance(node, ir.Const):
        return f"{node.value:g}"
    return f"(computed{' at ' + str(node.loc) if node.loc else ''})"
