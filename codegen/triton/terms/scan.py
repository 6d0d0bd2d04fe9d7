"""Per-channel decay terms (Mamba-1, GLA, H3's modal kernel) on the Triton
backend: per call, the cost model (mixerc/cost.py gpu_per_channel_choice)
or the config's `algorithm` knob picks a scan
(templates/triton_scan.py.jinja: the state in registers, no tensor cores;
a small value dim per head) or the chunked kernels of terms/per_channel.py
(tensor-core dots; GLA's K = V = 128). The scan runs with or without
gradients (its backward: a reverse scan, runtime/triton/scan.py ScanFn);
float64 runs the chunked branch's code, which hands it to the torch
backend.

The scan reads q and k at their own heads (Mamba's B and C: one head) and
a log-decay that is a product of per-token factors without the contracted
dim and token-free factors with it (Mamba's delta [B, T, E] times
-exp(A_log) [E, N]) as the two factors, multiplied in the kernel: the
[B, T, E, N] product is never materialized. Any other log-decay is read as
a [B, T, H, K] tensor.

Computed in the scan instead of read from HBM (`maps`, codegen/triton/prologue.py's
renderer): the log-decay's per-token factor as a map of its leaves (Mamba's
delta = softplus(dt + dt_bias) from dt per token and dt_bias per channel),
the values' scale (values = delta * x: x read as given, scaled on load) and a
skip term d * x (MatrixPlan.skip) in the epilogue, so neither delta nor
delta * x nor D * x is written before or after the kernel. Its backward is
one op whose kernel computes the maps on load again and takes their chain
rule on the values it holds (prologue.scalar_grads renders each leaf's
gradient: Mamba's dt and dt_bias from sigmoid(dt + dt_bias); x's, D's and
the per-head leaves' sums in the kernel; runtime/triton/scan.py
MappedScanFn), and y is stored in the inputs' half dtype when it is the
mixer's output as is (no cast after, dy read as given); torch.compile with
a gradient computes the maps in torch. A decode step (up to 16
tokens, no gradient) of a factored log-decay is one launch of the same forward
kernel without checkpoints, the maps and the skip on load and the state
updated in place (the template's `_decode`); a log-decay that does not factor
(GLA's) decodes on runtime/triton/recurrent.py, whose kernel reads the state
in rows rather than strided by the value dim. The chunked
branch (per_channel.py, and float64's torch code) still computes delta,
delta * x and a factored [B, T, H, K] log-decay in torch, and adds the skip
term after its kernels; a log-decay that is a map of [B, T, H, K] and
[H, K] values (GLA's logsigmoid(gk) / 16) its cumsum kernel computes on
load (per_channel.py decay_map), and so does the scan: it takes the same
leaves (per token [B, T, H, K] by their strides, [H, K] and [H] params)
and computes the map as they load (the template's `a_map`), so neither
branch writes the mapped log-decay; the scan's backward recomputes it by
torch (MappedScanFn), and a decode step runs the chunked branch's
recurrence kernel that computes it on load (its `_mapped_step`).
"""

import hashlib
from dataclasses import dataclass, field

from mixerc import cost, ir
from mixerc.codegen.torch.emit import axes_of
from mixerc.codegen.torch.terms import chunked as torch_chunked
from mixerc.codegen.triton import prologue
from mixerc.plan import value_dims

from . import output, per_channel

# defaults from the static fitness table (`mixerc compile examples/mamba.mx
# --target sm_90a|sm_80`, N = 16): 32 heads at 4 warps take 80 registers on
# sm_90a, 85 on sm_80 with the log-decay's factors read; computing delta, the
# values' scale and the skip on load (MAP, SKIP) 127 and 117; no config spills (runtime/triton/scan.py scan_heads
# takes fewer heads where K is large: GLA's 128). The backward at N = 16 with
# the maps' chain rule in it (MAP, SKIP): 113 to 128 registers at 4 warps, 126
# to 190 at 2 and 8 (scan_bwd_maxnreg), no config spills; at GLA's K = 128 (where the cost model picks
# chunks) its 2- and 8-warp configs kept an 8 to 32-byte stack frame under
# ptxas's 128-register limit, which their launch raises (runtime/triton/scan.py
# scan_bwd_maxnreg: 176 to 182 registers, no spills). A decode step takes at
# most 32 heads per program (scan_decode_heads: 64 at 8 warps spilled on sm_90a)
DEFAULTS = {"algorithm": "auto", "scan_block_h": 32, "scan_warps": 4}
CHOICES = {"algorithm": ["auto", "scan", "chunks"], "scan_block_h": [16, 32, 64],
           "scan_warps": [2, 4, 8]}
KERNEL_KNOBS = ("scan_block_h", "scan_warps")


def handles(tp) -> bool:
    """Every per-channel decay term the chunked kernels take can scan."""
    return per_channel.handles(tp)


def _factors(node: ir.Node) -> tuple:
    """(the factors of a product: nested binary muls flattened, whether an
    odd number of negations wraps them)."""
    if isinstance(node, ir.Map) and node.op == "mul" and len(node.args) == 2:
        (a, neg_a), (b, neg_b) = _factors(node.args[0]), _factors(node.args[1])
        return a + b, neg_a != neg_b
    if isinstance(node, ir.Map) and node.op == "neg" and len(node.args) == 1:
        inner, neg = _factors(node.args[0])
        return inner, not neg
    return [node], False


def decay_factors(node: ir.Node, heads: tuple, dim: str):
    """(per-token factors, token-free factors, negated) of a log-decay
    -(...) or (...) whose every factor is either per token without the
    contracted dim `dim` (read at the heads) or token-free with dims among
    heads + (dim,), at least one of them with `dim`; None otherwise (the
    log-decay is then materialized)."""
    token, fixed = [], []
    factors, negated = _factors(node)
    for f in factors:
        dims = set(f.type.dims)
        if f.type.kind == ir.TOKEN and dims <= set(heads) and not f.type.contracted:
            token.append(f)
        elif f.type.kind == ir.STATIC and dims <= set(heads) | {dim}:
            fixed.append(f)
        else:
            return None
    if not any(dim in f.type.dims for f in fixed):
        return None
    return token, fixed, negated


@dataclass
class Maps:
    """What the scan computes on load: `dt` the log-decay's per-token factor
    and `w` the values' scale (None: read as given), maps of `leaves` (l0,
    l1, ...: "token" [B, T, H] or "head" [H], `kinds`); `value` the node
    the kernel reads as its values (the raw factor of a scaled value)."""

    dt: prologue.Map | None = None
    w: prologue.Map | None = None
    value: ir.Node | None = None
    leaves: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    dt_node: ir.Node | None = None  # the IR dt and w render from (their chain rule)
    w_node: ir.Node | None = None

    def grads(self) -> tuple:
        """Per leaf, the Triton source of its gradient through both maps,
        from the kernel's `g_step` (the decay step's gradient) and `g_w` (the
        values' scale's): the backward kernel's chain rule on load. One map
        serving as both (Mamba's delta) is differentiated once, on their sum."""
        if self.w is not None and self.w.triton == self.dt.triton:
            parts = [prologue.scalar_grads(self.dt_node, self.leaves, "(g_step + g_w)")]
        else:
            parts = [prologue.scalar_grads(self.dt_node, self.leaves, "g_step")]
            if self.w is not None:
                parts.append(prologue.scalar_grads(self.w_node, self.leaves, "g_w"))
        return tuple(" + ".join(f"({p[i]})" for p in parts if i in p) or "0.0"
                     for i in range(len(self.leaves)))

    def describe(self) -> str:
        """The maps in words, for explain."""
        names = {f"l{i}": x.name for i, x in enumerate(self.leaves)}
        out = []
        for label, m in (("decay_step", self.dt), ("values_scale", self.w)):
            if m is not None:
                out.append(f"{label} = " + prologue.with_names(m.torch, names))
        return "; ".join(out)


def _product(parts, negated=False):
    """One map of the product of maps (negated: its negation)."""
    tri = " * ".join(f"({m.triton})" for m in parts)
    tor = " * ".join(f"({m.torch})" for m in parts)
    return prologue.Map(f"-({tri})" if negated else tri, f"-({tor})" if negated else tor,
                        [x for m in parts for x in m.leaves])


def maps(tp, mp, groups) -> Maps | None:
    """The maps the scan computes on load, or None (the term's operands are
    then computed in torch and read as before): one term of one application
    at one head dim, values not changed by gates or wrappers, a factored
    log-decay, and something to compute (a per-token factor that is not an
    input as given, or values that are an input times a scale)."""
    if len(mp.terms) != 1 or len(mp.applies) != 1 or len(mp.heads) != 1 or \
            "in_scale" in tp.operands or "out_scale" in tp.operands or tp.wrappers:
        return None
    split = decay_factors(tp.operands["log_decay"].node, mp.heads, tp.flags["dim"])
    if split is None or not split[0]:
        return None
    out, memo = Maps(), {}
    parts = [prologue.scalar_map(t, mp.heads, out.leaves, out.kinds, memo) for t in split[0]]
    if None in parts:
        return None
    out.dt, out.dt_node = _product(parts), prologue.product_node(split[0])
    app = mp.applies[0]
    out.value = app.u
    if not isinstance(app.u, ir.Input):
        factors, negated = _factors(app.u)
        want = ("b", "t") + tuple(mp.heads) + tuple(value_dims(app, mp.heads, groups))
        raw = [f for f in factors if isinstance(f, ir.Input) and axes_of(f) == want]
        rest = [f for f in factors if not raw or f is not raw[-1]]
        if raw and rest:
            leaves, kinds = list(out.leaves), list(out.kinds)
            scale = [prologue.scalar_map(f, mp.heads, leaves, kinds, memo) for f in rest]
            if None not in scale:
                out.w, out.value = _product(scale, negated), raw[-1]
                out.w_node = prologue.product_node(rest, negated)
                out.leaves, out.kinds = leaves, kinds
    if out.w is None and all(isinstance(t, ir.Input) for t in split[0]):
        return None  # nothing to compute: the factors and values read as before
    return out


def fuses_skip(mp, groups) -> bool:
    """Whether the scan adds the matrix's skip term d * u (MatrixPlan.skip)
    in its epilogue: u is what it reads as its values (the values as given,
    or their raw factor when it scales them on load), one term, nothing
    between the values and the kernel or on its output. The chunked branch
    adds it in torch after its kernels."""
    if mp.skip is None or len(mp.terms) != 1 or len(mp.applies) != 1:
        return False
    tp = mp.terms[0]
    if not handles(tp) or tp.wrappers or any(n in tp.operands
                                             for n in ("in_scale", "out_scale")):
        return False
    m = maps(tp, mp, groups)
    return mp.skip[2] is (mp.applies[0].u if m is None else m.value)


def _read_heads(op, mp, groups) -> tuple:
    """The heads q or k is read at: none (one head for all: Mamba's B and C),
    its group dim, or the matrix's heads."""
    if not op.heads:
        return ()
    if len(mp.heads) == 1 and len(op.heads) == 1 and groups.get(op.heads[0]) == mp.heads[0]:
        return tuple(op.heads)
    return tuple(mp.heads)


def _fixed_code(w, f, heads, dim) -> str:
    """A token-free factor as an [H, K] float32 tensor expression."""
    shape = f"{w.size_expr(heads)}, {w.dim(dim)}"
    if w.is_number(f):
        return f"torch.full(({shape}), {w.value(f)}, dtype=torch.float32, device=DEVICE)"
    expr = w.convert(w.value(f), axes_of(f), tuple(heads) + (dim,), expand=True)
    return f"{expr}.reshape({shape})"


def emit(tp, mp, w, key, values):
    f = tp.flags
    dim = f["dim"]
    g = w.program.groups
    q = w.canon_mm(tp.operands["q"].node, _read_heads(tp.operands["q"], mp, g), (dim,),
                   hint="q_scan")
    k = w.canon_mm(tp.operands["k"].node, _read_heads(tp.operands["k"], mp, g), (dim,),
                   hint="k_scan")
    pro = maps(tp, mp, g)  # what the scan computes on load
    if pro is not None:  # the raw values (the scale's factor), as given
        vd = value_dims(mp.applies[0], mp.heads, g)
        x = w.canon_raw(pro.value, mp.heads, vd, hint="x_scan")
        v = x if vd else f"{x}[..., None]"
    elif "in_scale" in tp.operands or tp.wrappers:  # values the writer changed first
        v = w.assign(f"{values}.to(MM_DTYPE)", hint="values_mm")
    else:
        parts = []
        for app in mp.applies:
            vd = value_dims(app, mp.heads, g)
            x = w.canon_mm(app.u, mp.heads, vd, hint="x")
            parts.append(x if vd else f"{x}[..., None]")
        v = w.assign(parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)",
                     hint="values_mm")
    node = tp.operands["log_decay"].node
    split = decay_factors(node, mp.heads, dim)
    dm = per_channel.decay_map(tp, mp) if split is None else None
    reads, extra, runs = None, "", ""
    if dm is not None:  # a map of its leaves, which the scan computes on load (as the
        # chunked branch's cumsum kernel does): the leaves as given, no log-decay
        reads = ", ".join(per_channel.leaf_values(w, dm, mp, dim))
        dt, a = "None", "None"
        # a decode step: the chunked branch's kernels' step, the map on load
        step = per_channel.kernel_function(tp, mp, w, key, dm) + "_mapped_step"
        extra += f", leaves=[{reads}]"
    elif split is None:  # materialized: [B, T, H, K]; an input as given (the host widens it)
        dt, a = "None", w.canon_raw(node, mp.heads, (dim,), hint="log_decay")
    else:  # the factors, multiplied in the kernel
        token, fixed, negated = split
        if pro is not None:  # the per-token factor: computed from the leaves
            dt = "None"
        else:
            dt = " * ".join(w.canon(t, mp.heads, (), hint="decay_step") for t in token) or \
                "torch.ones(batch, time, {}, dtype=torch.float32, device=DEVICE)".format(
                    w.size_expr(mp.heads))
            dt = w.assign(dt, hint="decay_step")
        rate = " * ".join(_fixed_code(w, x, mp.heads, dim) for x in fixed)
        a = w.assign(f"-({rate})" if negated else rate, hint="decay_rate")
    if pro is not None:  # the maps' leaves as given: per token [b, t, H], per head [H]
        leaves = [w.canon_raw(x, mp.heads, (), hint=x.name) if kind == "token" else
                  w.per_head(x, mp.heads, hint=x.name) for x, kind in zip(pro.leaves, pro.kinds)]
        extra += f", leaves=[{', '.join(leaves)}]"
        runs += "".join(f", {x}" for x in leaves)
    skip = fuses_skip(mp, g)
    if skip:  # y = M @ u + d * u: d * u added in the scan's epilogue
        d = w.per_head(mp.skip[1], mp.heads, hint="skip")
        extra += f", skip={d}"
        runs += f", {d}"
    if output.writes_output(mp, w, skip, divides=False):  # a decode step: y in the inputs' dtype
        extra += ", out_dtype=MM_DTYPE"
    flags = dict(strict=f["strict"], factored=split is not None,
                 what=torch_chunked._term_name(w, mp, key), title=mp.info.cls,
                 maps=pro is not None, skip=skip,
                 a_map=(dm.map.triton, dm.map.torch) if dm else None,
                 a_kinds=tuple(dm.kinds) if dm else (),
                 a_names=tuple(x.name for x in dm.leaves) if dm else (),
                 a_step=step if dm else None,
                 leaf_kinds=tuple(pro.kinds) if pro else (),
                 leaf_names=tuple(x.name for x in pro.leaves) if pro else (),
                 dt_map=(pro.dt.triton, pro.dt.torch) if pro else None,
                 w_map=(pro.w.triton, pro.w.torch) if pro and pro.w else None,
                 leaf_grads=pro.grads() if pro else ())
    # the custom ops' name: a digest of what the kernels are rendered from
    digest = hashlib.sha256(repr(sorted(flags.items())).encode()).hexdigest()[:16]
    fn = w.function("triton_scan.py.jinja", base="per_channel_scan",
                    op=f"mixerc::scan_{digest}", **flags)
    w.kernel_dims[fn] = (key, (dim,), [value_dims(app, mp.heads, g) for app in mp.applies])
    read, write = w.state(key)
    scan_cost, chunks_cost = cost.gpu_per_channel_choice(tp, mp, g)
    chunk = w.config_key(key, "tri_chunk", tp)
    algorithm = w.fresh("algorithm")
    w.line("# the cost model (elementwise FLOPs per head and token) or the config: a scan "
           "or chunks")
    w.line(f"{algorithm} = scan_or_chunks({w.config_key(key, 'algorithm', tp)}, "
           f"{cost.as_python(scan_cost, chunk, w.dim)}, "
           f"{cost.as_python(chunks_cost, chunk, w.dim)})")
    y = w.fresh("y")
    knobs = ", ".join(w.config_key(key, p, tp) for p in KERNEL_KNOBS)
    w.line(f"if {algorithm} == 'scan' and scan_runs({q}, {k}, {v}, {dt}, {reads or a}, "
           f"{read}{runs}):")
    if pro is not None or skip or dm is not None:
        w.line(f"    # {_comment(pro, skip, dm)}")
    w.line(f"    {y}, {write} = {fn}({q}, {k}, {v}, {dt}, {a}, {read}, {knobs}{extra})")
    w.line("else:  # the chunked kernels (with their backward), or the torch backend for float64")
    # the chunked branch's values (the materialized log-decay) stay in it
    names, start = dict(w.names), len(w.lines)
    values = str(values)  # (built in this branch: the scan reads its own)
    y_chunks = per_channel.emit(tp, mp, w, key, values)
    if skip:  # the chunked kernels do not add it: torch after them
        u = mp.skip[2]
        vd = value_dims(mp.applies[0], mp.heads, g)
        x = w.canon(u, mp.heads, vd, hint="skip_u")
        y_chunks = w.assign(f"{y_chunks} + {d}[:, None] * {x if vd else x + '[..., None]'}",
                            hint="y")
    body = w.lines[start:]
    del w.lines[start:]
    w.names = names
    w.lines.extend("    " + ln for ln in body)
    w.line(f"    {y} = {y_chunks}")
    return y


def _comment(pro, skip, dm=None) -> str:
    """What the scan computes that the forward does not, in a comment."""
    parts = ["computed on load from the leaves: " + pro.describe()] if pro else []
    if dm is not None:
        parts.append("computed on load from the leaves: " + dm.describe())
    if skip:
        parts.append("the skip term added in the epilogue")
    return "; ".join(parts)


def space(tp):
    s = dict(per_channel.space(tp))
    s.update({p: (CHOICES[p], DEFAULTS[p]) for p in DEFAULTS})
    return s


def constraints(tp, key):
    return per_channel.constraints(tp, key)
