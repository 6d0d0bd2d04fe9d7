"""Chunked terms (strategy `chunked`) with a scalar log-decay per head and
token, or none (linear attention, RetNet, Mamba-2 SSD), as a Triton kernel
(templates/triton_chunked.py.jinja): a forward with initial state in and
final state out, in two kernels (the chunk states in order, then every
chunk's output in parallel), which also runs the three adjoint problems of
the backward (runtime/triton/chunked.py) and prefill; a decode step without
gradients (up to 16 tokens) is one launch of the template's decode kernel,
which computes on load what the chunk kernels do (below) and updates the
state in place (runtime/triton/recurrent.py step_state). q and k are read at their group heads (SSD's B and C shared by a
group of heads).

Computed in the kernels instead of read from HBM (the plan says where): a key
scale per token and head (operand k_scale: SSD's delta, keys left at their
groups), the ones column of a normalizer M @ 1 (MatrixPlan.normalizer; with
MatrixPlan.divide the division too), a skip term d * u (MatrixPlan.skip), and
the elementwise maps before them (prologue.py: feature maps of q and k, the
log-decay and the key scale from their per-token and per-head leaves).

A decay inside the contraction (GLA, Mamba-1, H3's modal kernel) goes to
terms/scan.py (a scan or per_channel.py's chunks, per call); a polynomial of degree
<= 2 without decay (Based) to terms/poly.py; other polynomial feature maps are the torch backend's
(codegen/torch/terms/chunked.py), and explain says so per term."""

import hashlib

from mixerc.codegen.torch.terms import chunked as torch_chunked
from mixerc.codegen.triton import prologue
from mixerc.codegen.triton.terms import output, poly, scan
from mixerc.plan import value_dims

# defaults from the static fitness table (`mixerc compile --target`, bf16):
# no spills on sm_90a and sm_80 for linear attention, RetNet and SSD at
# K = V = 64 and 128. The tuner tries the rest of the space on its device
# (screened by the same check).
DEFAULTS = {"chunk": 64, "block_k": 64, "block_v": 64, "num_warps": 4, "num_stages": 2}
CHOICES = {"chunk": [16, 32, 64, 128], "block_k": [32, 64, 128],
           "block_v": [16, 32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}


def handles(tp) -> bool:
    """Whether the kernel computes this term exactly: masked low rank with a
    scalar decay or none (per head and token), causal, strict or not."""
    f = tp.flags
    return tp.strategy == "chunked" and f["features"] is None and not f["per_channel"] \
        and f["hi"] == float("inf") and f["lo"] in (0, 1)


def fuses_skip(mp) -> bool:
    """Whether the kernel adds the matrix's skip term d * u (plan: MatrixPlan.skip)
    in its epilogue: one term on these kernels, its values u as given (no
    gates or wrappers between them and the kernel, nothing on its output)."""
    if mp.skip is None or len(mp.terms) != 1 or mp.skip[2] is not mp.applies[0].u:
        return False
    tp = mp.terms[0]
    return handles(tp) and not tp.wrappers and not any(
        n in tp.operands for n in ("in_scale", "out_scale"))


def fuses_divide(mp) -> bool:
    """Whether the kernel divides by the normalizer in its epilogue (plan:
    MatrixPlan.divide): one term on these kernels or the polynomial's
    quadratic-form kernels (terms/poly.py; their other forms divide by torch
    ops, to the same [n / m, m]), values as given."""
    if mp.divide is None or len(mp.terms) != 1:
        return False
    tp = mp.terms[0]
    return (handles(tp) or poly.handles(tp)) and not tp.wrappers and not any(
        n in tp.operands for n in ("in_scale", "out_scale"))


def _other(tp):
    """Who computes a chunked term these kernels do not: the per-channel decay's
    scan or chunked kernels (terms/scan.py chooses, per call) or the polynomial's
    quadratic-form kernels (terms/poly.py) where they handle the term, else the torch backend."""
    if scan.handles(tp):
        return scan
    return poly if poly.handles(tp) else torch_chunked


def _heads(op, mp, groups) -> tuple:
    """The heads an operand is read at: its group dim when it is per group of
    the matrix's single head dim, else the matrix's heads."""
    if len(mp.heads) == 1 and len(op.heads) == 1 and groups.get(op.heads[0]) == mp.heads[0]:
        return tuple(op.heads)
    return tuple(mp.heads)


def emit(tp, mp, w, key, values):
    if not handles(tp):
        return _other(tp).emit(tp, mp, w, key, values)
    f = tp.flags
    dim = f["dim"]
    g = w.program.groups
    pro = prologue.of(tp, mp.heads)  # what the kernels compute on load
    # a feature-mapped q or k: the kernels read the map's input
    qn = pro.q.leaves[0] if pro.q else tp.operands["q"].node
    kn = pro.k.leaves[0] if pro.k else tp.operands["k"].node
    q = w.canon_mm(qn, _heads(tp.operands["q"], mp, g), (dim,), hint="q")
    k = w.canon_mm(kn, _heads(tp.operands["k"], mp, g), (dim,), hint="k")
    ones = False
    if isinstance(values, str):  # built by the writer (gates or wrappers applied)
        v = w.assign(f"{values}.to(MM_DTYPE)", hint="values")
    else:  # the inputs as given, at the matrix's heads
        parts = []
        # M @ 1 last (a normalizer): the kernels add the ones column themselves
        ones = mp.normalizer
        for a in mp.applies[:-1] if ones else mp.applies:
            vd = value_dims(a, mp.heads, g)
            x = w.canon_mm(a.u, mp.heads, vd, hint="x")
            parts.append(x if vd else f"{x}[..., None]")
        v = w.assign(parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)",
                     hint="values")
    a = "None"
    if f["has_decay"] and not pro.a:
        a = w.canon(tp.operands["log_decay"].node, mp.heads, (), hint="log_decay")
    scale = ""
    if "k_scale" in tp.operands and not pro.w:  # k = scale * key at fewer heads: scaled on load
        ks = w.canon(tp.operands["k_scale"].node, mp.heads, (), hint="key_scale")
        scale = f", key_scale={ks}"
    if pro.any:  # the maps' leaves: per token [b, t, H], per head [H]
        leaves = [w.canon_raw(x, mp.heads, (), hint=x.name) if kind == "token" else
                  w.per_head(x, mp.heads, hint=x.name) for x, kind in zip(pro.leaves, pro.kinds)]
        scale += f", leaves=[{', '.join(leaves)}]"
    if ones:
        scale += ", ones_column=True"
        if fuses_divide(mp):  # y[..., :V] / y[..., V] in the output kernel's epilogue
            scale += ", divide=True"
    skip = fuses_skip(mp) and not isinstance(values, str)
    if skip:  # y = M @ u + d * u: d * u added in the output kernel's epilogue
        scale += f", skip={w.value(mp.skip[1], hint='skip')}"  # [H]: dims == heads
    # y goes to the user as is: stored in the inputs' dtype
    if output.writes_output(mp, w, skip, divides=fuses_divide(mp)):
        scale += ", out_dtype=MM_DTYPE"
    # q or k read at fewer heads than the matrix's: their gradients are folded
    # over the groups after the backward's runs (which then keep float32)
    gathered = tuple(r for r in ("q", "k") if _heads(tp.operands[r], mp, g) != tuple(mp.heads))
    fn = kernel_function(tp, mp, w, ones=ones, skip=skip, pro=pro, gathered=gathered)
    # the kernels' dims, for compiling them without tensors (fitness.py)
    w.kernel_dims[fn] = (key, (dim,), [value_dims(a_, mp.heads, g) for a_ in mp.applies])
    config = ", ".join(w.config_key(key, p, tp) for p in ("chunk", "block_k", "block_v",
                                                          "num_warps", "num_stages"))
    y = w.fresh("y")
    if "divide=True" in scale:  # the kernels' y is then the quotient alone
        w.quotients.add(y)
    read, write = w.state(key)
    w.line("# backward: the same kernel on the adjoint problems (runtime/triton/chunked.py)")
    w.line(f"{y}, {write} = chunked_kernels_apply({fn}, {q}, {k}, {v}, {a}, {read}, {config}"
           f"{scale})")
    return y


def kernel_function(tp, mp, w, key=None, ones=False, skip=False, pro=None,
                    gathered=()) -> str:
    """The rendered host function of the term's kernels (the name); pro:
    the maps they compute on load (none by default); gathered: the roles
    ("q", "k") the caller passes at fewer heads than the matrix's (the
    fitness table's backward runs store their gradients in float32)."""
    pro = pro or prologue.Prologue()
    f = tp.flags
    # float64 inputs run the torch backend's chunks (the kernels take float32 and halves)
    fallback = w.function("chunked.py.jinja", base="chunked", per_channel=False,
                          strict=f["strict"], has_decay=f["has_decay"], title=mp.info.cls)
    flags = dict(strict=f["strict"], has_decay=f["has_decay"], title=mp.info.cls,
                 key_scale="k_scale" in tp.operands, ones=ones, skip=skip,
                 fallback=fallback, maps=pro.any, **pro.flags(), gathered=tuple(gathered),
                 # `what`: who a decode error names, as a literal
                 what=repr(f"mixer {w.program.name}, matrix {mp.name}"))
    digest = hashlib.sha256(repr(sorted(flags.items())).encode()).hexdigest()[:16]
    return w.function("triton_chunked.py.jinja", base="chunked_kernel",
                      op=f"mixerc::chunked_{digest}", **flags)


def space(tp):
    if not handles(tp):
        return _other(tp).space(tp)
    defaults = dict(DEFAULTS)
    if tp.flags.get("normalizer") and tp.flags["has_decay"]:
        # the normalizer's state row beside a decayed state: 4 warps spill on sm_80
        defaults["num_warps"] = 8
    return {p: (CHOICES[p], defaults[p]) for p in DEFAULTS}


def constraints(tp, key):
    if not handles(tp):
        return _other(tp).constraints(tp, key)
    c = f"cfg[{key + '.chunk'!r}]"
    return [f"({c} < 2 * max(T, 16) or {c} == {DEFAULTS['chunk']})"]
