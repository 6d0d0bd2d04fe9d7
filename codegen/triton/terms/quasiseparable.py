"""A quasiseparable matrix as one pair of launches
(templates/triton_quasiseparable.py.jinja, called through
runtime/triton/quasiseparable.py's quasiseparable_apply): a chunked
scalar-decay term, its reversed twin over the same matrix and application
(rev(...) outermost), and at most one diagonal term, computed together: one
states launch for both directions and one output launch that adds both
passes and d * u and writes y once. Recognized by the terms' shapes, never a
mixer's name; anything else keeps one chunked call per term
(terms/chunked.py) with torch flips and sums.

A pass's mode (the template's): 0 non-strict, 1 strict, 2 shifted by one
(shift(M), non-strict inside). Both passes take the first term's config."""

from mixerc import ir
from mixerc.codegen.triton.terms import chunked, output
from mixerc.plan import value_dims

_MODES = {((), False): 0, ((), True): 1, ((("shift", 1),), False): 2}


def _mode(tp, reversed_):
    wrappers = [tuple(w) for w in tp.wrappers]
    if reversed_:
        if not wrappers or wrappers[0] != ("rev",):
            return None
        wrappers = wrappers[1:]
    return _MODES.get((tuple(wrappers), bool(tp.flags["strict"])))


def _lowrank(tp) -> bool:
    return chunked.handles(tp) and tp.flags["has_decay"] and not any(
        n in tp.operands for n in ("in_scale", "out_scale"))


def pair(mp):
    """(lower term, upper term, diagonal term or None) when the matrix is such
    a sum, else None."""
    if mp.normalizer or mp.divide is not None or mp.skip is not None or len(mp.applies) != 1:
        return None
    low = [tp for tp in mp.terms if tp.strategy == "chunked"]
    diag = [tp for tp in mp.terms if tp.strategy == "diagonal"]
    if len(low) != 2 or len(diag) > 1 or len(low) + len(diag) != len(mp.terms):
        return None
    if diag and (diag[0].wrappers or len(diag[0].operands) != 1):
        return None
    lo, up = sorted(low, key=lambda tp: bool(tp.wrappers) and tuple(tp.wrappers[0]) == ("rev",))
    if not (_lowrank(lo) and _lowrank(up)) or _mode(lo, False) is None or \
            _mode(up, True) is None or lo.flags["dim"] != up.flags["dim"] or \
            ("k_scale" in lo.operands) != ("k_scale" in up.operands):
        return None
    return lo, up, (diag[0] if diag else None)


def fused(tp, mp) -> bool:
    """Whether the term runs in its matrix's pair of launches."""
    p = pair(mp)
    return p is not None and any(t is tp for t in p if t is not None)


def _real(w, node, emit):
    """An upper pass's operand in real time order: rev(x) is x itself (no
    flip); anything else is flipped here (a [B, T, heads(, K)] operand,
    never the values)."""
    if isinstance(node, ir.Rev):
        return emit(node.x)
    return w.assign(f"{emit(node)}.flip(1)", hint="rev")


def emit(mp, w, lo, up, diag):
    g = w.program.groups
    dim = lo.flags["dim"]
    heads = {r: chunked._heads(lo.operands[r], mp, g) for r in ("q", "k")}
    stacked = {}
    gathered = []  # q, k read at fewer heads than the matrix's (kernel_function)
    for role in ("q", "k", "log_decay", "k_scale"):
        if role not in lo.operands:
            continue
        tail = (dim,) if role in ("q", "k") else ()
        hd = heads.get(role, mp.heads)
        if role in ("q", "k") and chunked._heads(up.operands[role], mp, g) != hd:
            hd = tuple(mp.heads)  # the passes read different groups: both at the heads
        if role in ("q", "k") and not lo.operands[role].heads and not up.operands[role].heads:
            # per token only (Hydra's B and C): [B, T, 1, K], one group that all the
            # kernels' heads read, never a copy per head
            read = lambda n, tail=tail, role=role: w.canon_mm(n, (), tail, hint=role)  # noqa: E731,E501
            gathered.append(role)
        elif role in ("q", "k"):
            if hd != tuple(mp.heads):
                gathered.append(role)
            read = lambda n, hd=hd, tail=tail, role=role: w.canon_mm(n, hd, tail, hint=role)  # noqa: E731,E501
        else:
            read = lambda n, role=role: w.canon(n, mp.heads, (), hint=role)  # noqa: E731
        both = [read(lo.operands[role].node), _real(w, up.operands[role].node, read)]
        stacked[role] = w.assign(f"torch.stack([{both[0]}, {both[1]}])", hint=role)
    a_ = mp.applies[0]
    vd = value_dims(a_, mp.heads, g)
    x = w.canon_mm(a_.u, mp.heads, vd, hint="x")
    v = w.assign(x if vd else f"{x}[..., None]", hint="values")
    d = "None"
    if diag is not None:
        dn = w.canon(diag.operands["d"].node, mp.heads, (), hint="diag")
        d = w.assign(f"torch.broadcast_to({dn}, (batch, time, {w.size_expr(mp.heads)}))",
                     hint="diag")
    runs = [chunked.kernel_function(tp, mp, w, key=None, gathered=gathered) for tp in (lo, up)]
    fn = w.function("triton_quasiseparable.py.jinja", base="quasiseparable_kernel")
    key = f"{mp.key}.term{lo.index}"
    # the kernels' dims, for compiling them without tensors (fitness.py)
    for name in (runs[0], fn):
        w.kernel_dims[name] = (key, (dim,), [vd])
    config = ", ".join(w.config_key(key, p, lo) for p in ("chunk", "block_k", "block_v",
                                                          "num_warps", "num_stages"))
    w.constraints.extend(chunked.constraints(lo, key))
    modes = (_mode(lo, False), _mode(up, True))
    # y in the inputs' dtype where it is the mixer's output as is
    out = ", out_dtype=MM_DTYPE" if output.writes_output(mp, w, False, False, all_terms=True) \
        else ""
    y = w.fresh("y")
    w.line(f"# both passes and the diagonal: one states and one output launch ({fn}; "
           "the backward: each pass's adjoint runs)")
    w.line(f"{y} = quasiseparable_apply({fn}, ({runs[0]}, {runs[1]}), {stacked['q']}, "
           f"{stacked['k']}, {v}, {stacked['log_decay']}, {stacked.get('k_scale', 'None')}, "
           f"{d}, {modes}, {config}{out})")
    return y
