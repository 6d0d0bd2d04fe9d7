"""Chunked terms with a decay per channel of the contracted dim (GLA,
Mamba-1, H3's modal kernel: strategy `chunked`, flags["per_channel"]) as a
Triton forward kernel (templates/triton_per_channel.py.jinja): chunks in log
space, sub-chunks with exact pairwise decays on the diagonal sub-blocks and
rebased tensor-core dots below them, the state passed between chunks in
registers; initial state in, final state out. Its backward
(triton_per_channel_bwd.py.jinja) runs the adjoint state back over the
chunks, then dq, dk and the log-decay's gradient per chunk; a custom op's
autograd joins them (runtime/triton/per_channel.py), opaque to torch.compile. Without gradients a call of a few
tokens is a decode step on runtime/triton/recurrent.py (state updated in
place). float64 inputs run the torch backend's chunked code
(codegen/torch/terms/chunked.py), which autograd differentiates.
These kernels read q, k and the values materialized: where the scan computes
maps on load (terms/scan.py `maps`: Mamba's delta, delta * x, the skip term),
this branch computes them in torch first and adds the skip after its kernels.

A log-decay that is an elementwise map of per-token [B, T, H, K] values
and [H, K] or [H] params (fla's GLA gate: logsigmoid(gk) / 16) is computed
by the chunk-cumsum kernel as it loads them (`decay_map`, rendered by
codegen/triton/prologue.py's scalar_map at the heads and the contracted
dim), so the only [B, T, H, K] float32 tensor written is the cumulative
sum; the backward's cumulative sums come from the leaves by the same kernel,
and where a leaf needs a gradient it recomputes the map by torch ops and
chains the log-decay's gradient through it (runtime/triton/per_channel.py
MappedPerChannelFn). A decode step is one launch of a recurrence kernel
that computes the map on load too (the template's `_fwd_step`, which the
scan's decode steps launch as well: terms/scan.py); torch.compile with a
gradient computes it in torch.
"""

import hashlib
from dataclasses import dataclass, field

from mixerc import ir
from mixerc.codegen.torch.terms import chunked as torch_chunked
from mixerc.codegen.triton import prologue
from mixerc.plan import value_dims

from . import output

# defaults from the static fitness table (`mixerc compile examples/gla.mx
# --target sm_90a|sm_80`, K = V = 128, bf16): no spills on both, HGMMA on
# sm_90a (chunks of 64 rows; registers are tight there: block_v = 64 spills).
# bwd_block_k: the K channels of one backward dq/dk program (each recomputes
# do v^T); only 16: 32 and 64 spill (triton 3.9, V = 128, bf16, the default
# blocks: 32 spills 56 B on sm_80 at K = 32, 64 and 128; 64 spills 504 B on
# sm_80 and 80 B on sm_90a at K = 64 and 128), 16 fits both. block_v: the
# kernels cap it at large K (runtime/triton/per_channel.py per_channel_block_v).
# float32 inputs launch chunks of at most 32 and the state kernels over K blocks
# of 32 (runtime/triton/per_channel.py FP32_CHUNK, FP32_BLOCK: IEEE dots spill
# otherwise)
DEFAULTS = {"tri_chunk": 64, "tri_sub": 16, "block_v": 32, "num_warps": 8, "num_stages": 2,
            "bwd_block_k": 16}
CHOICES = {"tri_chunk": [32, 64], "tri_sub": [16, 32], "block_v": [32, 64, 128],
           "num_warps": [4, 8], "num_stages": [1, 2, 3], "bwd_block_k": [16]}
FORWARD = ("tri_chunk", "tri_sub", "block_v", "num_warps", "num_stages")  # the host's args


def handles(tp) -> bool:
    """A chunked term whose decay carries the contracted dim (no feature map)."""
    f = tp.flags
    return (tp.strategy == "chunked" and f.get("per_channel", False) and f["has_decay"]
            and f["features"] is None)


@dataclass
class DecayMap:
    """The log-decay as a map of `leaves` (l0, l1, ...: "token" [B, T, H, K],
    "head" [H, K] or "per_head" [H], `kinds`) that the cumsum kernel
    computes on load."""

    map: prologue.Map
    leaves: list = field(default_factory=list)
    kinds: list = field(default_factory=list)

    def describe(self) -> str:
        """The map in words, for explain and the forward's comment."""
        names = {f"l{i}": x.name for i, x in enumerate(self.leaves)}
        return "log_decay = " + prologue.with_names(self.map.torch, names)


def decay_map(tp, mp) -> DecayMap | None:
    """The log-decay's map the cumsum kernel computes on load, or None (it
    is then computed in torch and read as given): one head dim, a log-decay
    that is not an input as given, and an elementwise map (prologue.OPS) of
    values per token at the heads and the contracted dim (at least one) and
    of params at them or at the heads alone."""
    node = tp.operands["log_decay"].node
    if len(mp.heads) != 1 or isinstance(node, ir.Input):
        return None
    out = DecayMap(None)
    m = prologue.scalar_map(node, tuple(mp.heads) + (tp.flags["dim"],), out.leaves, out.kinds,
                            extra={tuple(mp.heads): "per_head"})
    if m is None or "token" not in out.kinds:
        return None
    out.map = m
    return out


def leaf_values(w, dm, mp, dim) -> list:
    """The map's leaves as the kernel reads them: per token [b, t, H, K] as
    given (its dtype and strides), params [H * K] or [H]."""
    return [w.canon_raw(x, mp.heads, (dim,), hint=x.name) if kind == "token" else
            w.per_head(x, tuple(mp.heads) + ((dim,) if kind == "head" else ()), hint=x.name)
            for x, kind in zip(dm.leaves, dm.kinds)]


def kernel_function(tp, mp, w, key, dm=None) -> str:
    """The rendered host of the term's kernels (the name); dm: the log-decay's
    map its cumsum kernel computes on load (None: read as given)."""
    f = tp.flags
    what = torch_chunked._term_name(w, mp, key)
    flags = dict(strict=f["strict"], what=what, title=mp.info.cls, a_map=None)
    if dm is not None:
        flags.update(a_map=(dm.map.triton, dm.map.torch), leaf_kinds=tuple(dm.kinds),
                     leaf_names=tuple(x.name for x in dm.leaves))
    # the custom ops' name: a digest of what the kernels are rendered from
    digest = hashlib.sha256(repr(sorted(flags.items())).encode()).hexdigest()[:16]
    return w.function("triton_per_channel.py.jinja", base="per_channel",
                      op=f"mixerc::per_channel_{digest}", **flags)


def emit(tp, mp, w, key, values):
    f = tp.flags
    dim = f["dim"]
    g = w.program.groups
    dm = decay_map(tp, mp)
    ops = {n: tp.operands[n].node for n in ("q", "k", "log_decay")}
    if dm is not None:  # the log-decay: computed by the cumsum kernel (or float64's branch)
        del ops["log_decay"]
    for n, node in ops.items():  # every node value outside the branches below
        if not w.is_number(node):
            w.value(node, hint=n)
    q = w.canon_mm(ops["q"], mp.heads, (dim,), hint="q")
    k = w.canon_mm(ops["k"], mp.heads, (dim,), hint="k")
    if dm is None:
        # the log-decay as given where it is an input (the cumsum kernel reads any dtype)
        a = w.canon_raw(ops["log_decay"], mp.heads, (dim,), hint="log_decay")
        reads, extra = a, ""
    else:  # its map's leaves as given
        leaves = leaf_values(w, dm, mp, dim)
        a, reads = "None", ", ".join(leaves)
        extra = f", leaves=[{reads}]"
    parts = []
    for app in mp.applies:  # the values in the matmuls' dtype
        vd = value_dims(app, mp.heads, g)
        x = w.canon_mm(app.u, mp.heads, vd, hint="x")
        parts.append(x if vd else f"{x}[..., None]")
    vals = w.assign(parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)",
                    hint="values_mm")
    fn = kernel_function(tp, mp, w, key, dm)
    w.kernel_dims[fn] = (key, (dim,), [value_dims(app, mp.heads, g) for app in mp.applies])
    read, write = w.state(key)
    knobs = ", ".join(w.config_key(key, p, tp) for p in FORWARD)
    bwd_k = w.config_key(key, "bwd_block_k", tp)
    # the torch backend's code, for float64: its lines (and the values only
    # they compute: a mapped log-decay) stay in the else branch
    names, start = dict(w.names), len(w.lines)
    y_torch = torch_chunked.emit(tp, mp, w, key, values)
    body = w.lines[start:]
    del w.lines[start:]
    w.names = names
    if output.writes_output(mp, w, False, divides=False):  # a decode step: y in the inputs' dtype
        extra += ", out_dtype=MM_DTYPE"
    y = w.fresh("y")
    w.line(f"if per_channel_kernels({q}, {k}, {vals}, {reads}, {read}):  # Triton kernels")
    if dm is not None:
        w.line(f"    # computed on load by the cumsum kernel: {dm.describe()}")
    w.line(f"    {y}, {write} = per_channel_apply(")
    w.line(f"        {fn}, {q}, {k}, {vals}, {a}, {read}, ({knobs}), {bwd_k}{extra})")
    w.line("else:  # float64: the torch backend's chunked code, autograd")
    s_in = w.fresh("state_in")
    w.line(f"    {s_in} = torch_state({read})")
    w.lines.extend("    " + ln.replace(read, s_in) for ln in body)
    w.line(f"    {y} = {y_torch}")
    return y


def space(tp):
    s = dict(torch_chunked.space(tp))
    s.update({p: (CHOICES[p], DEFAULTS[p]) for p in DEFAULTS})
    return s


def constraints(tp, key):
    out = list(torch_chunked.constraints(tp, key))
    c = f"cfg[{key + '.tri_chunk'!r}]"
    out.append(f"cfg[{key + '.tri_sub'!r}] <= {c}")
    out.append(f"({c} < 2 * max(T, 16) or {c} == {DEFAULTS['tri_chunk']})")
    return out
