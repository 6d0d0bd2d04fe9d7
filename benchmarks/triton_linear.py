"""GPU benchmark of the Triton backend on the chunked linear / state-space family
(issue 11, item 7). Not a test. Run through gpu.py, after the attention part:

    python benchmarks/gpu.py --backend triton [--family all|attention|linear] [--out FILE]
    python benchmarks/gpu.py --backend triton --family linear --linear-budget 300
    python benchmarks/gpu.py --backend triton --dry-run      # no GPU: tiny shapes, interpreter

Sections (bf16 on CUDA, B = --linear-tokens // T so that B x T (and B x H) fill
the chip; the sizes are printed in the report):
  1. forward (no grad) and forward + backward of the stdlib mixers retnet, ssd,
     gla, linear_attention and based, `mixerc.compile(name, backend="triton")`
     (terms without Triton kernels run on the torch backend inside the module),
     at T in {1k, 4k, 16k, 64k}, against flash-linear-attention's Triton kernels
     (`chunk_simple_gla` for retnet (g_gamma = log_gamma) and ssd (q = C,
     k = delta * B, g = -exp(A_log) * delta, plus D * x), `chunk_gla`,
     `chunk_linear_attn` on elu + 1 features with normalize=True,
     `parallel_based`), in ms, TFLOP/s and GB/s (bytes of inputs + outputs);
     and Mamba-1 (the per-channel scan, E=1536, N=16) alone: fla has no peer;
  2. decode: `m.step` after a prefill with `return_state=True`, each timed step
     continuing the newest state, at batch 1 and 64, against fla's
     `fused_recurrent_*` step from fla's own prefill state: latency and GB/s of
     the state (read + written), next to a measured device copy bandwidth.

Every peer is first checked against our output (and gradients) on the very
inputs it is timed on; a MISMATCH row does not time the peer. Rows run guarded
(an error lands in the row's notes) and within their own time budget
(--linear-budget): rows that would start later are listed as skipped.

--dry-run runs every row's code path once on tiny shapes on the CPU in Triton's
interpreter. fla's Triton kernels do not run there: its pure-PyTorch reference
functions (fla/ops/*/naive.py) stand in for them behind the same calls, which
checks our mapping of each mixer onto fla's arguments, not fla's kernels.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import triton_attention as ta  # noqa: E402  (the shared helpers: pair, Timer, Clock, ...)

import mixerc  # noqa: E402
from mixerc.autotune.timer import TimerSettings  # noqa: E402
from mixerc.inputs import decay_leaves  # noqa: E402

MIXERS = ("retnet", "ssd", "gla", "linear_attention", "based", "mamba")
SIZES = {  # fla's benchmark shapes: 16 heads of dim 128; Mamba-2's 32 heads of P=64, N=128
    "retnet": dict(H=16, K=128, V=128), "gla": dict(H=16, K=128, V=128),
    "linear_attention": dict(H=16, K=128, V=128),
    "ssd": dict(H=32, P=64, N=128, G=1),
    "based": dict(H=16, K=16, V=128),  # the Based paper's feature dim 16 (1 + 16 + 256 features)
    "mamba": dict(E=1536, N=16),  # Mamba-1 130m: d_inner 1536, state 16 per channel
}
DRY_SIZES = {
    "retnet": dict(H=2, K=16, V=16), "gla": dict(H=2, K=16, V=16),
    "linear_attention": dict(H=2, K=16, V=16), "ssd": dict(H=4, P=16, N=16, G=2),
    "based": dict(H=2, K=8, V=16), "mamba": dict(E=8, N=4),
}
PEER_LABEL = {
    "retnet": "fla chunk_simple_gla (g_gamma = log_gamma)",
    "ssd": "fla chunk_simple_gla (q = C, k = delta B, g = -exp(A_log) delta in torch) + D x",
    "gla": "fla chunk_gla",
    "linear_attention": "fla chunk_linear_attn (elu + 1 in torch, normalize=True)",
    "based": "fla parallel_based (use_norm=True)",
    "mamba": None,  # fla ships no Mamba-1 (selective scan) kernel: ours alone
}
STEP_LABEL = {
    "retnet": "fla fused_recurrent_simple_gla",
    "ssd": "fla fused_recurrent_simple_gla + D x",
    "gla": "fla fused_recurrent_gla",
    "linear_attention": "fla fused_recurrent_linear_attn (normalize=True)",
    "based": None,
    "mamba": None,
}
TARGET_MIXERS = ("ssd", "retnet", "gla", "linear_attention")
CHUNK = 64  # the chunk the FLOP count assumes (fla's)


# ------------------------------------------------------------------ fla
def fla_ops(dry: bool):
    """A namespace of fla's ops, or (None, why). In a dry run: fla's PyTorch
    references behind the kernels' signatures (the interpreter cannot run its kernels)."""
    import types

    if dry:
        try:
            return reference_ops(), None
        except Exception as e:  # noqa: BLE001
            return None, f"fla not installed ({ta.fail(e)})"
    if importlib.util.find_spec("fla") is None:
        return None, "fla not installed"
    ns = types.SimpleNamespace()
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        ns.chunk_simple_gla, ns.fused_recurrent_simple_gla = chunk_simple_gla, \
            fused_recurrent_simple_gla
    except Exception as e:  # noqa: BLE001  (kernels that do not import with this triton)
        return None, f"fla does not import here ({ta.fail(e)})"
    for mod, names in (("fla.ops.gla", ("chunk_gla", "fused_recurrent_gla")),
                       ("fla.ops.linear_attn", ("chunk_linear_attn",
                                                "fused_recurrent_linear_attn")),
                       ("fla.ops.based", ("parallel_based",))):
        for n in names:
            try:
                setattr(ns, n, getattr(importlib.import_module(mod), n))
            except Exception as e:  # noqa: BLE001
                setattr(ns, n, None)
                setattr(ns, n + "_why", f"{mod}.{n} unavailable ({ta.fail(e)})")
    return ns, None



def reference_ops():
    """fla's pure-PyTorch references (loaded file by file, as benchmarks/cpu.py
    does) behind the signatures of the Triton ops used here."""
    import types

    import cpu
    sg = cpu.fla_file("ops/simple_gla/naive.py").naive_recurrent_simple_gla
    gl = cpu.fla_file("ops/gla/naive.py").naive_recurrent_gla
    la = cpu.fla_file("ops/linear_attn/naive.py").naive_recurrent_linear_attn
    bs = cpu.fla_file("ops/based/naive.py").naive_parallel_based

    def simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                   output_final_state=False):
        if g is None:
            g = g_gamma.float().expand(q.shape[:3])
        return sg(q, k, v, g, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state)

    def gla(q, k, v, g=None, gk=None, scale=None, initial_state=None, output_final_state=False):
        g = g if g is not None else gk
        s = 1.0 if scale is None else scale * q.shape[-1] ** 0.5  # the reference scales by K^-0.5
        return gl(q * s, k, v, g, initial_state=initial_state,
                  output_final_state=output_final_state)

    def linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                    normalize=True):
        return la(q, k, v, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, normalize=normalize)

    def based(q, k, v, scale=None, use_norm=True):
        return bs(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale,
                  use_norm=use_norm).transpose(1, 2)
    return types.SimpleNamespace(
        chunk_simple_gla=simple_gla, fused_recurrent_simple_gla=simple_gla, chunk_gla=gla,
        fused_recurrent_gla=gla, chunk_linear_attn=linear_attn,
        fused_recurrent_linear_attn=linear_attn, parallel_based=based)


def phi(x):  # examples/linear_attention.mx's feature map
    return F.elu(x) + 1


def ssd_qkg(a):
    """chunk_simple_gla's q, k, g for ssd (B, C expanded to the heads of their group)."""
    H = a["x"].shape[2]
    delta = F.softplus(a["dt"].float() + a["dt_bias"].float())
    Bh, Ch = (a[n].repeat_interleave(H // a[n].shape[2], 2) for n in ("B", "C"))
    k = (Bh * delta[..., None]).to(a["x"].dtype)
    return Ch, k, (-torch.exp(a["A_log"].float()) * delta)


def peer_forward(name, ops):
    """fn(a) -> y with a = our inputs and params (one dict), or (None, why)."""
    if PEER_LABEL[name] is None:
        return None, "fla ships no kernel for this mixer"
    need = {"retnet": "chunk_simple_gla", "ssd": "chunk_simple_gla", "gla": "chunk_gla",
            "linear_attention": "chunk_linear_attn", "based": "parallel_based"}[name]
    if getattr(ops, need, None) is None:
        return None, getattr(ops, need + "_why", f"fla has no {need}")
    op = getattr(ops, need)
    if name == "retnet":
        return (lambda a: op(a["q"], a["k"], a["v"], g_gamma=a["log_gamma"].float(),
                             scale=1.0)[0]), None
    if name == "ssd":
        def run(a):
            q, k, g = ssd_qkg(a)
            y = op(q, k, a["x"], g=g, scale=1.0)[0]
            return (y + a["D"][:, None] * a["x"]).to(a["x"].dtype)
        return run, None
    if name == "gla":
        return (lambda a: op(a["q"], a["k"], a["v"], a["g"], scale=1.0)[0]), None
    if name == "linear_attention":
        return (lambda a: op(phi(a["q"]), phi(a["k"]), a["v"], scale=1.0,
                             normalize=True)[0]), None
    return (lambda a: op(a["q"], a["k"], a["v"], scale=a["q"].shape[-1] ** -0.5,
                         use_norm=True)), None


def peer_decode(name, ops):
    """(prefill(a) -> state, step(state, tok, prm) -> (y, state)) in fla, or (None, why)."""
    if STEP_LABEL[name] is None:
        return None, f"fla ships no recurrent step for {name.capitalize()}"
    chunk, step = {"retnet": ("chunk_simple_gla", "fused_recurrent_simple_gla"),
                   "ssd": ("chunk_simple_gla", "fused_recurrent_simple_gla"),
                   "gla": ("chunk_gla", "fused_recurrent_gla"),
                   "linear_attention": ("chunk_linear_attn", "fused_recurrent_linear_attn")}[name]
    for n in (chunk, step):
        if getattr(ops, n, None) is None:
            return None, getattr(ops, n + "_why", f"fla has no {n}")
    chunk, step = getattr(ops, chunk), getattr(ops, step)
    one = lambda d: {n: x[:, None] if x.dim() >= 2 else x for n, x in d.items()}  # noqa: E731

    if name == "retnet":
        def prefill(a):
            return chunk(a["q"], a["k"], a["v"], g_gamma=a["log_gamma"].float(), scale=1.0,
                         output_final_state=True)[1]

        def stp(s, tok, prm):
            t = one(tok)
            y, s = step(t["q"], t["k"], t["v"], g_gamma=prm["log_gamma"].float(), scale=1.0,
                        initial_state=s, output_final_state=True)
            return y[:, 0], s
    elif name == "ssd":
        def prefill(a):
            q, k, g = ssd_qkg(a)
            return chunk(q, k, a["x"], g=g, scale=1.0, output_final_state=True)[1]

        def stp(s, tok, prm):
            a = {**one(tok), **prm}
            q, k, g = ssd_qkg(a)
            y, s = step(q, k, a["x"], g=g, scale=1.0, initial_state=s, output_final_state=True)
            return (y[:, 0] + prm["D"][:, None] * tok["x"]).to(tok["x"].dtype), s
    elif name == "gla":
        def prefill(a):
            return chunk(a["q"], a["k"], a["v"], a["g"], scale=1.0, output_final_state=True)[1]

        def stp(s, tok, prm):
            t = one(tok)
            y, s = step(t["q"], t["k"], t["v"], gk=t["g"], scale=1.0, initial_state=s,
                        output_final_state=True)
            return y[:, 0], s
    else:
        def prefill(a):
            return chunk(phi(a["q"]), phi(a["k"]), a["v"], scale=1.0, normalize=True,
                         output_final_state=True)[1]

        def stp(s, tok, prm):
            t = one(tok)
            y, s = step(phi(t["q"]), phi(t["k"]), t["v"], scale=1.0, normalize=True,
                        initial_state=s, output_final_state=True)
            return y[:, 0], s
    return (prefill, stp), None


# ------------------------------------------------------------------ inputs and counts
def make_args(m, sizes, B, T, dtype, dev, seed, grad=False):
    """(inputs, params) on the device: inputs [B, T, ...] in dtype (grad leaves if
    asked), params float32, drawn as mixerc.inputs.random_inputs draws them (a
    log-decay in (-0.51, -0.01) per step), but on the device."""
    p = m.program
    neg = decay_leaves(p)
    gen = torch.Generator(device=dev).manual_seed(seed)
    ins, prm = {}, {}
    for name, dims in p.inputs.items():
        x = torch.randn((B, T) + tuple(sizes[d] for d in dims), generator=gen, device=dev)
        if name in neg:
            x = -torch.sigmoid(x) * 0.5 - 0.01
        ins[name] = x.to(dtype).requires_grad_(grad)
    for name, dims in p.params.items():
        x = torch.randn(tuple(sizes[d] for d in dims), generator=gen, device=dev)
        if name in neg:
            x = -torch.sigmoid(x) * 0.5 - 0.01
        prm[name] = x * 0.5
    return ins, prm


def gbs(nb, ms):
    return None if nb is None or ms is None else ta.gbs(nb, ms)


def nbytes(xs) -> int:
    return sum(x.numel() * x.element_size() for x in xs)


def state_bytes(s) -> int:
    if isinstance(s, torch.Tensor):
        return nbytes([s])
    if isinstance(s, dict):
        return sum(state_bytes(v) for v in s.values())
    if isinstance(s, (tuple, list)):
        return sum(state_bytes(v) for v in s)
    if hasattr(s, "tensors"):
        return state_bytes(s.tensors)
    return 0


def flops(name, sizes, B, T) -> float:
    """Forward FLOPs of the chunked algorithm (chunk 64, full intra-chunk tiles):
    per token and head 2 C (K + V) for the intra-chunk scores and their product
    with V, and 4 K V for the state read and update; K = 1 + K + K^2 features for
    based. Elementwise work not counted; the same count for ours and the peer.
    mamba (a scan): 6 per token, channel and state entry (decay, update, read)."""
    s = sizes
    if name == "mamba":
        return 6.0 * B * T * s["E"] * s["N"]
    H = s["H"]
    K, V = (s["N"], s["P"]) if name == "ssd" else (s["K"], s["V"])
    if name == "based":
        K = 1 + K + K * K
    return B * T * H * (2.0 * CHUNK * (K + V) + 4.0 * K * V)


BWD_MULT = 3.0  # forward + backward counted as 3x the forward


# ------------------------------------------------------------------ section 1
def section_forward(o, ms, ops, why, timer, clock):
    rows = []
    # the targets' lengths first (4k, 16k), then 1k, then 64k: a run cut short by the
    # budget keeps what the targets need; the table lists rows by mixer and T
    for T in sorted(o.T, key=lambda T: (not 4096 <= T <= 16384, T)):
        for name in o.mixers:
            sizes = o.sizes[name]
            B = max(1, o.tokens // T)
            row = dict(mixer=name, T=T, B=B, H=sizes.get("H", sizes.get("E")), sizes=sizes)
            rows.append(row)
            if clock.left(o.share_forward) < 0:
                row["skipped"] = "time budget"
                continue
            t = time.perf_counter()
            try:
                forward_row(o, ms.get(name), row, ops, why, timer)
            except Exception as e:  # noqa: BLE001
                row["error"] = ta.fail(e)
                traceback.print_exc(limit=3)
            ta.cleanup()
            row["flops"] = flops(name, sizes, B, T)
            print(f"  {name:16s} T={ta.kt(T)} B={B}: " + progress(row)
                  + f" [{time.perf_counter() - t:.1f} s]", flush=True)
    return rows


def fits(o, nb) -> str | None:
    """Why a row whose inputs + outputs take nb bytes would not fit, or None."""
    if o.dev != "cuda":
        return None
    ta.cleanup()  # what the caching allocator holds counts as free here
    free, _ = torch.cuda.mem_get_info()
    need = o.mem_factor * nb
    if need > free:
        return f"memory: ~{need / 2**30:.0f} GiB estimated, {free / 2**30:.0f} GiB free"
    return None


def forward_row(o, m, row, ops, why, timer):
    m = ta.need(m)
    name, T, B, sizes = row["mixer"], row["T"], row["B"], row["sizes"]
    ins, prm = make_args(m, sizes, B, T, o.dtype, o.dev, seed=1, grad=True)
    y_like = ins["v"] if "v" in ins else ins["x"]  # the output has the values' shape
    row["bytes_fwd"] = nbytes(ins.values()) + nbytes(prm.values()) + nbytes([y_like])
    leaves = tuple(ins.values())
    # backward: dy read, one gradient per input written
    row["bytes_bwd"] = row["bytes_fwd"] + nbytes([y_like]) + nbytes(leaves)
    dy = ta.randn(tuple(y_like.shape), o.dtype, o.dev, 9)
    too_big = fits(o, row["bytes_bwd"])
    if too_big:
        row["skipped"] = too_big
        return
    peer, peer_why = (None, why) if ops is None else peer_forward(name, ops)
    a = {**ins, **prm}
    ours = lambda: m(**ins, **prm)  # noqa: E731
    theirs = None if peer is None else (lambda: peer(a))
    with torch.no_grad():
        row["fwd"] = ta.pair(ours, theirs, o.tol, timer, peer_why)
    row["bwd"] = ta.pair(ta.grads_of(ours, leaves, dy),
                         None if theirs is None else ta.grads_of(theirs, leaves, dy),
                         o.grad_tol, timer, peer_why)


def progress(row) -> str:
    if "error" in row:
        return f"error {row['error']}"
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    out = []
    for key, mult, nb in (("fwd", 1.0, row.get("bytes_fwd")),
                          ("bwd", BWD_MULT, row.get("bytes_bwd"))):
        r = row.get(key)
        if r is None:
            continue
        f = row["flops"] * mult
        out.append(f"{key} ours {ta.fmt(r['ours'])} ms ({ta.fmt(ta.tflops(f, r['ours']))} TF/s, "
                   f"{ta.fmt(gbs(nb, r['ours']))} GB/s) fla {ta.fmt(r['peer'])} ms "
                   f"err {ta.cell_err(r)} ratio {ta.cell_ratio(r)}"
                   + (" [" + "; ".join(ta.errors(r)) + "]" if ta.errors(r) else ""))
    return " | ".join(out)


# ------------------------------------------------------------------ section 2: decode
def section_decode(o, ms, ops, why, timer, clock):
    rows = []
    for name in o.mixers:
        for B in o.dec_B:
            sizes = o.sizes[name]
            row = dict(mixer=name, B=B, ctx=o.ctx, sizes=sizes)
            rows.append(row)
            if clock.left(1.0) < 0:
                row["skipped"] = "time budget"
                continue
            try:
                with torch.no_grad():
                    decode_row(o, ms.get(name), row, ops, why, timer)
            except Exception as e:  # noqa: BLE001
                row["error"] = ta.fail(e)
                traceback.print_exc(limit=3)
            ta.cleanup()
            r = row.get("r") or {}
            print(f"  decode {name:16s} B={B}: " + (
                f"error {row['error']}" if "error" in row else
                f"ours {ta.fmt(r.get('ours'))} ms ({ta.fmt(gbs(row.get('bytes'), r.get('ours')))}"
                f" GB/s), fla {ta.fmt(r.get('peer'))} ms, err {ta.cell_err(r)} "
                + "; ".join(ta.errors(r))), flush=True)
    return rows


def decode_row(o, m, row, ops, why, timer):
    m = ta.need(m)
    name, B, ctx, sizes = row["mixer"], row["B"], row["ctx"], row["sizes"]
    ins, prm = make_args(m, sizes, B, ctx, o.dtype, o.dev, seed=1)
    t = time.perf_counter()
    y, state = m(**ins, **prm, return_state=True)  # prefill
    if o.dev == "cuda":
        torch.cuda.synchronize()
    row["prefill_s"] = time.perf_counter() - t
    del y
    nxt, _ = make_args(m, sizes, B, 1, o.dtype, o.dev, seed=5)
    tok = {n: x[:, 0] for n, x in nxt.items()}
    row["bytes"] = 2 * state_bytes(state)  # read + written per step
    newest = [state]  # each call continues the newest state

    def ours():
        y, newest[0] = m.step(newest[0], **tok, **prm)
        return y
    peer, peer_why = (None, why) if ops is None else peer_decode(name, ops)
    fs = [None]  # fla's newest state

    def theirs():
        y, fs[0] = peer[1](fs[0], tok, prm)
        return y
    if peer is not None:
        try:
            fs[0] = peer[0]({**ins, **prm})  # fla's prefill
            row["peer_bytes"] = 2 * state_bytes(fs[0])
        except Exception as e:  # noqa: BLE001
            peer, peer_why = None, f"fla prefill failed: {ta.fail(e)}"
    del ins
    row["r"] = ta.pair(ours, None if peer is None else theirs, o.tol, timer, peer_why)


# ------------------------------------------------------------------ report
def header(o, bw, elapsed) -> list:
    L = ta.header(o, bw, elapsed)
    L[0] = f"## Triton backend: linear / state-space family, {datetime.date.today()}"
    L[2] = (L[2].replace("Device copy", "fla-core " + fla_version() + ". Device copy")
            .replace("Our configs", f"B = {o.tokens} // T sequences. Based's form: "
                     f"{o.linear_based_form}. Our configs"))
    if o.dry:
        L[2] += (" Peers in this dry run: fla's PyTorch references (fla/ops/*/naive.py) "
                 "behind the calls of its Triton kernels (a check of our mapping onto fla's "
                 "arguments; its kernels do not run in the interpreter).")
    return L


def fla_version() -> str:
    try:
        return importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def shape(name, s) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items())


def cells(r, f, nb) -> list:
    """ms (TFLOP/s, GB/s) ours, fla, ratio, err."""
    if r is None:
        return ["—"] * 4

    def one(ms):
        if ms is None:
            return "—"
        return f"{ta.fmt(ms)} ({ta.fmt(ta.tflops(f, ms))}, {ta.fmt(gbs(nb, ms))})"
    peer = one(r["peer"])
    if r["peer"] is None and r.get("status") is None and r.get("peer_error"):
        peer = r["peer_error"].replace("|", "/")  # fla not installed, no such op, ...
    return [one(r["ours"]), peer, ta.cell_ratio(r), ta.cell_err(r)]


def table_forward(rows) -> list:
    L = ["### 1. Chunked linear / state-space mixers vs flash-linear-attention", "",
         "ms (TFLOP/s, GB/s). FLOPs: the chunked algorithm's matmuls at chunk 64 with full "
         "intra-chunk tiles, per token and head 2*64*(K + V) + 4*K*V (based: K = 1 + K + K^2 "
         f"features), the same count for both sides; fwd+bwd = {BWD_MULT:g}x forward. GB/s: "
         "bytes of the inputs, params and output (fwd+bwd: plus dy and the input gradients) "
         "/ time. Forward without grad; fwd+bwd: gradients of every input (not of the params). "
         "err: relative error of our output (fwd) / gradients (fwd+bwd) against fla's on the "
         "timed inputs. Peers: "
         + "; ".join(f"{k}: {v}" for k, v in PEER_LABEL.items() if v) + ".", "",
         "| mixer | sizes | T | B | fwd ours | fwd fla | fwd ratio | fwd err | "
         "fwd+bwd ours | fwd+bwd fla | fwd+bwd ratio | grad err | notes |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {n: i for i, n in enumerate(MIXERS)}
    for r in sorted(rows, key=lambda r: (order.get(r["mixer"], len(order)), r["T"])):
        f = r.get("flops") or flops(r["mixer"], r["sizes"], r["B"], r["T"])
        L.append(f"| {r['mixer']} | {shape(r['mixer'], r['sizes'])} | {ta.kt(r['T'])} | {r['B']} | "
                 + " | ".join(cells(r.get("fwd"), f, r.get("bytes_fwd"))) + " | "
                 + " | ".join(cells(r.get("bwd"), BWD_MULT * f, r.get("bytes_bwd")))
                 + f" | {ta.row_note(r)} |")
    return L


def table_decode(rows, bw) -> list:
    L = ["### 2. Decode step (fixed-state mixers)", "",
         "`m.step(state, ...)` after a prefill with `return_state=True`; each timed step "
         "continues the newest state. GB/s: bytes of the state read + written per step / time "
         "(ours: our state; fla: its own state, float32 [B, H, K, V]); % of the device copy "
         "bandwidth. Peer: fla's fused_recurrent step from fla's own prefill state "
         "(chunk kernel with output_final_state=True); err compares the first step's outputs.", "",
         "| mixer | B | prefill | state MB | prefill s | step ours ms | GB/s | % copy BW | "
         "peer | peer ms | peer GB/s | ratio | err | notes |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r.get("r") or {}
        nb = r.get("bytes") or 0
        ours_bw = gbs(nb, x.get("ours"))
        pct = "—" if ours_bw is None or not bw else f"{100 * ours_bw / bw:.0f}%"
        L.append(f"| {r['mixer']} | {r['B']} | {ta.kt(r['ctx'])} | {nb / 2 / 1e6:.2f} | "
                 f"{ta.fmt(r.get('prefill_s'))} | {ta.fmt(x.get('ours'))} | {ta.fmt(ours_bw)} | "
                 f"{pct} | {STEP_LABEL[r['mixer']] or '—'} | {peer_ms(x)} | "
                 f"{ta.fmt(gbs(r.get('peer_bytes'), x.get('peer')))} | {ta.cell_ratio(x)} | "
                 f"{ta.cell_err(x)} | {ta.row_note(r)} |")
    return L


def peer_ms(x) -> str:
    if x.get("peer") is None and x.get("status") is None and x.get("peer_error"):
        return x["peer_error"].replace("|", "/")
    return ta.fmt(x.get("peer"))


def targets(fwd, dec, bw) -> list:
    """Issue 11's acceptance targets, met or missed, from the rows measured."""
    L = ["### Targets (issue 11)", ""]

    def ratio(r):
        return None if not r or r.get("ours") is None or r.get("peer") is None \
            else r["peer"] / r["ours"]
    for key, what in (("fwd", "forward"), ("bwd", "forward+backward")):
        for name in TARGET_MIXERS:
            rs = [r for r in fwd if r["mixer"] == name and r["T"] >= 4096]
            got = [(r["T"], ratio(r.get(key))) for r in rs if ratio(r.get(key)) is not None]
            head = f"- {name} {what} >= 1.0x fla at T >= 4k: "
            if not got:
                L.append(head + "not measured")
                continue
            worst = min(got, key=lambda z: z[1])
            miss = len(rs) - len(got)
            L.append(head + ("met" if all(x >= 1.0 for _, x in got) else "missed")
                     + f" (lowest {worst[1]:.2f}x at T={ta.kt(worst[0])}; "
                     + ", ".join(f"{ta.kt(T)}: {x:.2f}x" for T, x in got) + ")"
                     + (f"; {miss} rows not measured" if miss else ""))
    pcts = []
    for r in dec:
        x = (r.get("r") or {}).get("ours")
        if r["B"] == 64 and x and bw and r.get("bytes"):
            pcts.append((r["mixer"], gbs(r["bytes"], x) / bw))
    if pcts:
        ok = all(p >= 0.7 for _, p in pcts)
        L.append("- decode step at batch 64 >= 70% of the measured bandwidth: "
                 f"{'met' if ok else 'missed'} (" + ", ".join(
                     f"{n}: {100 * p:.0f}%" for n, p in pcts) + ")")
    else:
        L.append("- decode step at batch 64 >= 70% of the measured bandwidth: not measured")
    return L


def report(o, bw, fwd, dec, clock, compile_errors) -> str:
    L = header(o, bw, clock.elapsed())
    if fwd is not None:
        L += table_forward(fwd) + [""]
    if dec is not None:
        L += table_decode(dec, bw) + [""]
    if o.dry:
        L += ["### Targets (issue 11)", "",
              "- not judged in a dry run (tiny shapes, interpreter, fla's references as peers)"]
    else:
        L += targets(fwd or [], dec or [], bw)
    if compile_errors:
        L += ["", "Mixers that did not compile: " + "; ".join(
            f"{k}: {v}" for k, v in compile_errors.items())]
    return "\n".join(L)


# ------------------------------------------------------------------ main
def parser(standalone: bool = True):
    p = argparse.ArgumentParser(
        prog="triton_linear.py" if standalone else "gpu.py --backend triton (linear part)",
        description="Benchmark of the Triton backend on retnet, ssd, gla, linear_attention "
                    "and based against flash-linear-attention (bf16, CUDA).")
    p.add_argument("--linear-T", default="1024,4096,16384,65536", help="sequence lengths")
    p.add_argument("--linear-tokens", type=int, default=65536, help="B = max(1, tokens // T)")
    p.add_argument("--linear-mixers", default=",".join(MIXERS))
    p.add_argument("--linear-ctx", type=int, default=1024, help="decode: prefill tokens")
    p.add_argument("--linear-decode-B", default="1,64", help="decode batch sizes")
    p.add_argument("--linear-sections", default="forward,decode",
                   help="comma-separated subset of forward,decode")
    p.add_argument("--linear-no-fla", action="store_true",
                   help="do not use fla (as if it were not installed): only ours are timed")
    p.add_argument("--linear-budget", type=float, default=200.0,
                   help="seconds for the linear part: rows that would start later are skipped "
                        "(forward rows the first 75%%, decode the rest)")
    p.add_argument("--grace", type=float, default=45.0,
                   help="past budget + grace seconds a watchdog prints the report so far and "
                        "exits (status 3)")
    p.add_argument("--linear-based-form", default="quadratic",
                   choices=["cost", "quadratic", "features"],
                   help="based: the knob form (quadratic: our Triton quadratic-form kernels, "
                        "the algorithm of fla's parallel_based; features: the chunked feature "
                        "map; cost: the cost model's choice per call)")
    p.add_argument("--quick", action="store_true", help="a subset: T 1k, 4k")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: tiny shapes on the CPU in Triton's interpreter")
    p.add_argument("--out", help="append the markdown report to FILE (rewritten after each "
                                 "section)")
    return p


def parse(argv, standalone=True):
    p = parser(standalone)
    if standalone:
        o = p.parse_args(argv)
    else:  # gpu.py passes the attention part's options too
        o, _ = p.parse_known_args(argv)
    if o.quick:
        o.linear_T = "1024,4096"
    o.dry = o.dry_run
    o.T = [int(x) for x in o.linear_T.split(",")]
    o.tokens, o.ctx = o.linear_tokens, o.linear_ctx
    o.dec_B = [int(x) for x in o.linear_decode_B.split(",")]
    o.mixers = [x for x in o.linear_mixers.split(",") if x]
    o.sections = set(o.linear_sections.split(","))
    o.budget = o.linear_budget
    o.sizes = dict(SIZES)
    if o.dry:  # tiny shapes: T not a multiple of the chunk, batch > 1, B/C groups
        o.T, o.tokens, o.ctx, o.dec_B = [40], 80, 24, [1, 2]
        o.sizes = dict(DRY_SIZES)
    o.share_forward = 0.75
    o.mem_factor = 12  # a row's peak memory estimated as its inputs + outputs + gradients x this
    # (an out-of-memory error is caught in the row anyway)
    return p, o


def main(argv=None, standalone=True):
    argv = sys.argv[1:] if argv is None else list(argv)
    p, o = parse(argv, standalone)
    if o.dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="1")  # before triton loads
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              env=env).returncode
    if not o.dry and not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark times Triton kernels on a GPU "
                "(--dry-run checks it on the CPU)")
    clock = ta.Clock(o.budget)
    o.dev = "cpu" if o.dry else "cuda"
    o.dtype, o.tol, o.grad_tol = torch.bfloat16, 2e-2, 5e-2
    if o.dry and not ta.interpreter_bf16_dots():
        o.dtype, o.tol, o.grad_tol = torch.float32, 1e-4, 1e-4
        print("dry run in float32 (the interpreter's bf16 dot patch did not apply)")
    if not o.dry:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    timer = ta.Timer(o.dev, o.dry, o.quick)
    timer.settings = TimerSettings(warmup=1, min_repeats=3, max_repeats=30,
                                   target_s=0.1 if o.quick else 0.2)
    base = Path(o.out).read_text() if o.out and Path(o.out).exists() else ""

    ms, compile_errors = {}, {}
    for name in o.mixers:
        try:
            ms[name] = mixerc.compile(name, backend="triton")
            if name == "based" and o.linear_based_form != "cost":  # the form fla's peer has
                ms[name]._impl.pin_config(form=o.linear_based_form)
        except Exception as e:  # noqa: BLE001
            compile_errors[name] = ta.fail(e)
            print(f"  compile {name}: {compile_errors[name]}", flush=True)
    ops, why = (None, "fla not installed (--linear-no-fla)") if o.linear_no_fla \
        else fla_ops(o.dry)
    if why:
        print(f"  peers: {why}", flush=True)
    bw = None
    try:
        bw = ta.copy_bandwidth(o, timer)
    except Exception as e:  # noqa: BLE001
        print(f"  copy bandwidth: {ta.fail(e)}", flush=True)
    print(header(o, bw, 0)[2], flush=True)
    results = {"forward": None, "decode": None}

    def emit():
        try:
            text = report(o, bw, results["forward"], results["decode"], clock, compile_errors)
        except Exception as e:  # noqa: BLE001  (a row half written when the watchdog fired)
            text = f"(linear report failed: {ta.fail(e)})"
        if o.out:
            Path(o.out).write_text(base + ("\n" if base else "") + text + "\n")
        return text

    def hard_stop():
        print(f"\nhard time limit ({o.budget + o.grace:.0f} s) reached: the report so far\n"
              + emit(), flush=True)
        os._exit(3)
    watchdog = threading.Timer(max(1.0, o.budget + o.grace - clock.elapsed()), hard_stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        for key, title, fn in (("forward", "1. linear family: forward, fwd+bwd vs fla",
                                section_forward),
                               ("decode", "2. linear family: decode step", section_decode)):
            if key not in o.sections:
                continue
            print(f"{title} ({clock.elapsed():.0f} s in)", flush=True)
            try:
                results[key] = fn(o, ms, ops, why, timer, clock)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(limit=4)
                print(f"  section failed: {ta.fail(e)}", flush=True)
                results[key] = []
            lines = table_forward(results[key]) if key == "forward" else \
                table_decode(results[key], bw)
            print("\n" + "\n".join(lines) + "\n", flush=True)
            emit()
        text = emit()
    finally:
        watchdog.cancel()
    print("\n" + text, flush=True)
    if o.dry:
        bad = list(compile_errors.values())
        for rows in results.values():
            for r in rows or []:
                if r.get("error"):
                    bad.append(f"{r['mixer']}: {r['error']}")
                for key in ("fwd", "bwd", "r"):
                    x = r.get(key) or {}
                    # fla's references stand in for every peer but Based's step
                    label = STEP_LABEL if key == "r" else PEER_LABEL
                    expected = ops is not None and label[r["mixer"]] is not None
                    if x.get("ours_error") or x.get("status") == "MISMATCH" or \
                            (x and expected and x.get("peer_error")):
                        bad.append(f"{r['mixer']} {key}: " + (x.get("ours_error") or (
                            "MISMATCH" if x.get("status") == "MISMATCH" else x["peer_error"])))
        if bad:
            print("linear dry run FAILED: " + " | ".join(bad), flush=True)
            return 1
        print("linear dry run OK", flush=True)
    return 0


# ------------------------------------------------------------------ gpu.py --backend triton
def split_argv(argv):
    """(attention argv, linear argv): --linear-* options only to the linear part."""
    att = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--linear-"):
            i += 1 if "=" in a or a == "--linear-no-fla" else 2
            continue
        att.append(a)
        i += 1
    return att, list(argv)


def gpu_main(argv):
    """`gpu.py --backend triton [--family attention|linear|all]`: the attention
    part (triton_attention.py), then this one."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family", choices=("attention", "linear", "all"), default="all")
    known, rest = pre.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print("gpu.py --backend triton [--family attention|linear|all (default all)] "
              "[attention options] [linear options]\n")
        if known.family in ("attention", "all"):
            try:
                ta.main(["--help"])
            except SystemExit:
                pass
        if known.family in ("linear", "all"):
            parser(False).print_help()
        return 0
    dry = "--dry-run" in rest
    if dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):  # one interpreter process
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, str(HERE / "gpu.py"), "--backend", "triton",
                               *argv], env=env).returncode
    att, lin = split_argv(rest)
    rc = 0
    if known.family in ("attention", "all"):
        if known.family == "all" and not any(a == "--budget" or a.startswith("--budget=")
                                             for a in att):
            att = ["--budget", str(ALL_ATTENTION_BUDGET)] + att  # the whole run in ~8 minutes
        rc = ta.main(att) or 0
    if known.family in ("linear", "all"):
        if known.family == "all" and not any(a == "--linear-budget" or
                                             a.startswith("--linear-budget=") for a in lin):
            lin = ["--linear-budget", str(ALL_LINEAR_BUDGET)] + lin
        rc = main(lin, standalone=False) or rc
    return rc


ALL_ATTENTION_BUDGET = 270.0  # --family all: the attention part's default --budget (alone: 380)
ALL_LINEAR_BUDGET = 180.0     # --family all: the linear part's default --linear-budget (alone: 200)


if __name__ == "__main__":
    sys.exit(main())
