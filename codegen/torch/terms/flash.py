"""Softmax terms (strategy `flash`): an online softmax over key blocks with the
mixer's score modification and mask rendered into the tile code
(codegen/torch/tiles.py), key blocks outside the band never visited, tiles
classified by interval bounds when the mask is more than a band, SDPA when
the scores are a plain scaled dot product under a causal or no mask, and a
KV cache (a ring buffer for a band) for decode. Grouped keys and values stay
at their G heads: in the cache and in the tiles (query head h reads key head
h // (H / G)). Template: codegen/torch/templates/flash.py.jinja.
"""

from mixerc.codegen.torch import tiles
from mixerc.plan.model import INF
from mixerc.plan.parts import mul
from mixerc.plan import value_dims

# queries per block and keys per tile: the fastest measured on a 2-core CPU (B=1,
# H=8, D=64, float32, T = 2k..8k); keys of a block are gathered into one softmax
BLOCK_Q, BLOCK_K = 64, 128


def _num(x) -> str:
    return "math.inf" if x == INF else "-math.inf" if x == -INF else str(int(x))


def key_heads(tp, mp, program) -> tuple:
    """The head dims keys and values keep: a group dim G when every key-side
    value is per group (GQA), else the matrix's heads."""
    g = program.groups
    k = tp.operands.get("k")
    if len(mp.heads) != 1 or k is None or len(k.heads) != 1 or g.get(k.heads[0]) != mp.heads[0]:
        return tuple(mp.heads)
    group = k.heads
    keyside = [a.u for a in mp.applies] + [o.node for o in tp.operands.values() if o.role == "col"]
    if any(set(x.type.dims) & {mp.heads[0]} for x in keyside):
        return tuple(mp.heads)
    if "in_scale" in tp.operands:
        return tuple(mp.heads)
    return group


def emit(tp, mp, w, key, values):
    f = tp.flags
    g = w.program.groups
    kh = key_heads(tp, mp, w.program)
    dim = tp.operands["q"].feature if "q" in tp.operands else ()
    score = tp.score
    leaves = tiles.TileLeaves(score.dot, f["leaves"], [])
    if score.pure:
        q_node = tp.operands["q"].node if score.scale is None else \
            mul(tp.operands["q"].node, score.scale, g)
        score_code = score_grad = []
    else:
        q_node = tp.operands["q"].node if "q" in tp.operands else None
        score_code = tiles.render(score.expr, leaves, "score")
        score_grad = tiles.render(score.expr, leaves, "score", inplace=False)
    if tp.mask.exact or tp.mask.predicate is None:
        mask_code, classify = ["keep = band_keep(t_pos, s_pos, lo, hi)"], None
    else:
        mask_code = tiles.render(tp.mask.predicate, leaves, "keep")
        classify = tiles.render_intervals(tp.mask.predicate, leaves, "tiles")
    if q_node is None:  # scores from positions and per-token values only: a zero dot
        q = w.assign(f"{values}.new_zeros(batch, time, {w.size_expr(mp.heads)}, 1)", hint="q")
        k = q
    else:
        q = w.canon(q_node, mp.heads, dim, hint="q")
        k = w.canon(tp.operands["k"].node, kh, dim, hint="k")
    if kh != tuple(mp.heads):  # the values at the key heads too, never per query head
        parts = []
        for a in mp.applies:
            vd = value_dims(a, kh, g)
            x = w.canon(a.u, kh, vd, hint="x")
            parts.append(x if vd else f"{x}[..., None]")
        values = w.assign(parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)",
                          hint="values_g")
    names = sorted({v for v in f["leaves"].values()}, key=lambda n: (n[:3], int(n[3:])))
    rows = [w.canon(tp.operands[n].node, mp.heads, (), hint=n) for n in names if n.startswith("row")]
    cols = [w.canon(tp.operands[n].node, kh, (), hint=n) for n in names if n.startswith("col")]
    heads = [w.per_head(node, mp.heads, hint="per_head") for node in leaves.heads]
    window = tp.mask.window if f["cache"] else None
    fn = w.function("flash.py.jinja", base="flash", cache=f["cache"], window=window,
                    sdpa=f["sdpa"], causal=f["lo"] == 0, score_code=score_code,
                    score_grad=score_grad,
                    mask_code=mask_code, classify=classify is not None,
                    exact=tp.mask.exact or tp.mask.predicate is None,
                    classify_code=classify or [], rows=bool(rows), cols=bool(cols),
                    heads=bool(heads), score_doc=_doc(score, tp), mask_doc=_mask_doc(tp))
    cache = "None"
    names = ["k", "v", "pos"] + [f"col{i}" for i in range(len(cols))]
    if f["cache"]:
        reads = {n: w.state(f"{key}.{n}") for n in names}
        cache = w.assign(f"None if {reads['k'][0]} is None else "
                         f"({', '.join(reads[n][0] for n in names)})", hint="cache")
    args = [q, k, str(values), f"[{', '.join(rows)}]", f"[{', '.join(cols)}]",
            f"[{', '.join(heads)}]", cache, f"lo={_num(f['lo'])}", f"hi={_num(f['hi'])}",
            f"block_q={w.config_key(key, 'block_q', tp)}",
            f"block_k={w.config_key(key, 'block_k', tp)}"]
    if f["sdpa"]:
        args += [f"sdpa={w.config_key(key, 'sdpa', tp)}", "mm_dtype=MM_DTYPE"]
    y, new_cache = w.fresh("y"), w.fresh("new_cache")
    w.line(f"{y}, {new_cache} = {fn}({', '.join(args)})")
    if f["cache"]:
        w.line(f"{', '.join(reads[n][1] for n in names)} = {new_cache}")
    return y


def _doc(score, tp) -> str:
    if score.pure:
        return ""
    where = f" (the source at {score.expr.loc})" if score.expr.loc else ""
    return f"the mixer's score modification{where}, computed per tile"


def _mask_doc(tp) -> str:
    m = tp.mask
    lo, hi = m.band
    band = f"{_num(lo)} <= t - s <= {_num(hi)}".replace("math.inf", "inf")
    if m.exact:
        return f"the band {band}"
    where = f" at {m.predicate.loc}" if m.predicate.loc else ""
    return f"the mixer's predicate{where}, within the band {band}"


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

