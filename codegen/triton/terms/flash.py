"""Softmax terms (strategy `flash`) as Triton kernels
(templates/triton_flash.py.jinja): the score modification, the mask and the
scores' derivatives rendered into the kernels (codegen/triton/tiles.py),
block lists from the band and interval bounds on the mask, grouped keys and
values read at their G heads, and the decode step: a split-K kernel over a KV
cache appended in place (runtime/triton/cache.py).
"""

import hashlib

from mixerc.codegen.torch.terms.flash import _doc, _mask_doc, _num, key_heads
from mixerc.codegen.triton import tiles
from mixerc.plan import value_dims

# defaults for an H100 (bf16, D = 64 or 128), from the static fitness table
# (`mixerc compile --target sm_90a`): no spills, shared memory within sm_80's
# limit too; the backward's blocks are smaller (its dK, dV or dQ accumulators
# take the registers). The tuner tries the rest of the space on its device.
DEFAULTS = {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 3,
            "bwd_block_q": 64, "bwd_block_k": 32, "bwd_warps": 8, "bwd_stages": 2}
CHOICES = {"block_q": [32, 64, 128], "block_k": [32, 64, 128], "num_warps": [4, 8],
           "num_stages": [2, 3, 4], "bwd_block_q": [32, 64, 128], "bwd_block_k": [32, 64, 128],
           "bwd_warps": [4, 8], "bwd_stages": [1, 2, 3]}


def emit(tp, mp, w, key, values):
    f = tp.flags
    g = w.program.groups
    kh = key_heads(tp, mp, w.program)
    dim = tp.operands["q"].feature if "q" in tp.operands else ()
    score = tp.score
    leaves = tiles.Leaves(score.dot, f["leaves"], [])
    score_code = tiles.render(score.expr, leaves, "score")
    grad_code, row_grads, col_grads, head_grads = tiles.render_gradients(score.expr, leaves)
    if tp.mask.exact or tp.mask.predicate is None:
        mask_code, classify = ["d = t_pos - s_pos", "allowed = (d >= lo) & (d <= hi)"], None
    else:
        mask_code = tiles.render(tp.mask.predicate, leaves, "allowed")
        from mixerc.codegen.torch import tiles as torch_tiles
        classify = torch_tiles.render_intervals(tp.mask.predicate, leaves, "tiles")
    if score.dot is None:  # scores from positions and per-token values only: a zero dot
        q = w.assign(f"torch.zeros(batch, time, {w.size_expr(mp.heads)}, 16, dtype=MM_DTYPE, "
                     "device=DEVICE)", hint="q")
        k = w.assign(f"torch.zeros(batch, time, {w.size_expr(kh)}, 16, dtype=MM_DTYPE, "
                     "device=DEVICE)", hint="k")
    else:
        q = w.canon_mm(tp.operands["q"].node, mp.heads, dim, hint="q")
        k = w.canon_mm(tp.operands["k"].node, kh, dim, hint="k")
    parts = []  # the values, at the key heads, in the matmuls' dtype
    for a in mp.applies:
        vd = value_dims(a, kh, g)
        x = w.canon_mm(a.u, kh, vd, hint="x")
        parts.append(x if vd else f"{x}[..., None]")
    values = w.assign(parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)",
                      hint="values_g" if kh != tuple(mp.heads) else "values")
    names = sorted({v for v in f["leaves"].values()}, key=lambda n: (n[:3], int(n[3:])))
    rows = [w.canon(tp.operands[n].node, mp.heads, (), hint=n) for n in names if n.startswith("row")]
    cols = [w.canon(tp.operands[n].node, kh, (), hint=n) for n in names if n.startswith("col")]
    heads = [w.per_head(node, mp.heads, hint="per_head") for node in leaves.heads]
    window = tp.mask.window if f["cache"] else None
    flags = dict(cache=f["cache"], window=window, score_code=score_code, grad_code=grad_code,
                 mask_code=mask_code, classify=classify is not None,
                 exact=tp.mask.exact or tp.mask.predicate is None,
                 classify_code=classify or [], n_rows=len(rows), n_cols=len(cols),
                 n_heads=len(heads), row_grads=row_grads, col_grads=col_grads,
                 head_grads=head_grads, score_doc=_doc(score, tp), mask_doc=_mask_doc(tp))
    # the custom op's name: a digest of what the kernels are rendered from
    digest = hashlib.sha256(repr(sorted(flags.items())).encode()).hexdigest()[:16]
    fn = w.function("triton_flash.py.jinja", base="flash", op=f"mixerc::flash_{digest}", **flags)
    # the kernels' head dims, for compiling them without tensors (fitness.py)
    w.kernel_dims[fn] = (key, tuple(dim) if score.dot is not None else None,
                         [value_dims(a, kh, g) for a in mp.applies])
    cache = "None"
    names = ["k", "v", "pos"] + [f"col{i}" for i in range(len(cols))]
    if f["cache"]:
        reads = {n: w.state(f"{key}.{n}") for n in names}
        cache = w.assign(f"None if {reads['k'][0]} is None else "
                         f"({', '.join(reads[n][0] for n in names)})", hint="cache")
    args = [q, k, values, f"[{', '.join(rows)}]", f"[{', '.join(cols)}]",
            f"[{', '.join(heads)}]", cache, f"lo={_num(f['lo'])}", f"hi={_num(f['hi'])}"]
    args += [f"{p}={w.config_key(key, p, tp)}" for p in space(tp)]
    y, new_cache = w.fresh("y"), w.fresh("new_cache")
    w.line(f"{y}, {new_cache} = {fn}({', '.join(args)})")
    if f["cache"]:
        w.line(f"{', '.join(reads[n][1] for n in names)} = {new_cache}")
    return y


def space(tp):
    return {p: (CHOICES[p], DEFAULTS[p]) for p in DEFAULTS}


def constraints(tp, key):
    """Python expressions over `cfg` and `T` that a config must satisfy: no
    block far longer than the input (the defaults stay allowed)."""
    out = []
    for p in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"):
        c = f"cfg[{key + '.' + p!r}]"
        out.append(f"({c} < 2 * max(T, 16) or {c} == {DEFAULTS[p]})")
    return out
