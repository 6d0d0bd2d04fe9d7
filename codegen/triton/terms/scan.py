"""Per-channel decay terms (Mamba-1, GLA, H3's modal kernel) on the Triton
backend: per call, the cost model (mixerc/cost.py gpu_per_channel_choice)
or the config's `algorithm` knob picks a scan
(templates/triton_scan.py.jinja: the state in registers, no tensor cores;
a small value dim per head) or the chunked kernels of terms/per_channel.py
(tensor-core dots; GLA's K = V = 128). The scan runs without gradients;
with them (or for float64) the chunked branch's code runs, which hands
them to the torch backend.

The scan reads q and k at their own heads (Mamba's B and C: one head) and
a log-decay that is a product of per-token factors without the contracted
dim and token-free factors with it (Mamba's delta [B, T, E] times
-exp(A_log) [E, N]) as the two factors, multiplied in the kernel: the
[B, T, E, N] product is never materialized. Any other log-decay is read as
a [B, T, H, K] tensor.
"""

import hashlib

from mixerc import cost, ir
from mixerc.codegen.torch.emit import axes_of
from mixerc.codegen.torch.terms import chunked as torch_chunked
from mixerc.plan import value_dims

from . import per_channel

# defaults from the static fitness table (`mixerc compile examples/mamba.mx
# --target sm_90a|sm_80`, N = 16): 32 heads at 4 warps take 80 registers on
# sm_90a, 72 on sm_80; no config spills (runtime/triton/scan.py scan_heads
# takes fewer heads where K is large: GLA's 128)
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
    if "in_scale" in tp.operands or tp.wrappers:  # values the writer changed first
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
    if split is None:  # materialized: [B, T, H, K]
        dt, a = "None", w.canon(node, mp.heads, (dim,), hint="log_decay")
    else:  # the factors, multiplied in the kernel
        token, fixed, negated = split
        dt = " * ".join(w.canon(t, mp.heads, (), hint="decay_step") for t in token) or \
            "torch.ones(batch, time, {}, dtype=torch.float32, device=DEVICE)".format(
                w.size_expr(mp.heads))
        dt = w.assign(dt, hint="decay_step")
        rate = " * ".join(_fixed_code(w, x, mp.heads, dim) for x in fixed)
        a = w.assign(f"-({rate})" if negated else rate, hint="decay_rate")
    flags = dict(strict=f["strict"], factored=split is not None,
                 what=torch_chunked._term_name(w, mp, key), title=mp.info.cls)
    # the custom op's name: a digest of what the kernel is rendered from
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
    w.line(f"if {algorithm} == 'scan' and scan_forward({q}, {k}, {v}, {dt}, {a}, {read}):")
    w.line(f"    {y}, {write} = {fn}({q}, {k}, {v}, {dt}, {a}, {read}, {knobs})")
    w.line("else:  # the chunked kernels (with their backward), or the torch backend for float64")
    # the chunked branch's values (the materialized log-decay) stay in it
    names, start = dict(w.names), len(w.lines)
    y_chunks = per_channel.emit(tp, mp, w, key, values)
    body = w.lines[start:]
    del w.lines[start:]
    w.names = names
    w.lines.extend("    " + ln for ln in body)
    w.line(f"    {y} = {y_chunks}")
    return y


def space(tp):
    s = dict(per_channel.space(tp))
    s.update({p: (CHOICES[p], DEFAULTS[p]) for p in DEFAULTS})
    return s


def constraints(tp, key):
    return per_channel.constraints(tp, key)
