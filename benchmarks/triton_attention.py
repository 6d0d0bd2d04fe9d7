"""GPU benchmark of the Triton backend's softmax kernels (issue 10, item 7).
Not a test. Run through gpu.py:

    python benchmarks/gpu.py --backend triton [--quick] [--out FILE]
    python benchmarks/gpu.py --backend triton --dry-run     # no GPU: tiny shapes, interpreter

Sections (bf16 on CUDA, the sizes printed in the report):
  1. plain attention, causal and non-causal, at T in {1k, 4k, 16k}, D in {128,
     64}, B = 16384 // T, H = 2048 // D: mixerc's Triton kernels against torch
     SDPA restricted to its FlashAttention backend; forward (no grad) and
     forward + backward, in TFLOP/s (forward 4*B*H*T*T*D, half of it causal;
     backward 2.5x the forward);
  2. score modifications and masks written in the mixer language (ALiBi,
     tanh soft-capping, a document mask; all causal; D = 128, T in {4k, 16k})
     against FlexAttention (torch.compile'd flex_attention, block mask from
     create_block_mask), forward and forward + backward;
  3. decode: `step` after a prefill (`return_state=True`) of 1k..64k tokens,
     grouped heads, against SDPA of one query over the same cache: latency and
     GB/s of the K and V cache, next to a measured device copy bandwidth.

Every peer is first checked against our output (and gradients) on the very
inputs it is timed on; a row whose peer computes something else says MISMATCH
and the peer is not timed. Every row runs guarded: an error (no FlexAttention,
a compile error, out of memory) is printed in its row and the run goes on. A
time budget (--budget) skips the rows that would not fit, saying so.

--dry-run builds every mixer, compiles it with backend="triton" and runs every
row's code path once on tiny shapes on the CPU in Triton's interpreter
(re-executing itself with TRITON_INTERPRET=1), with the same equality checks
(SDPA's flash backend runs on the CPU; FlexAttention uncompiled, forward only).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

import mixerc
from mixerc.autotune.timer import TimerSettings, measure

HERE = Path(__file__).resolve().parent
SOFTCAP = 30.0
_QKV = "  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input v : [H, D]\n"
_S = "q @ k^T / sqrt(D)"
SOURCES = {  # name -> mixer source (the mixer language); "decode" is the stdlib's GQA attention
    "causal": "mixer causal {\n" + _QKV + f"  out y = softmax({_S}, mask = s <= t) @ v\n}}",
    "noncausal": "mixer noncausal {\n" + _QKV + f"  out y = softmax({_S}) @ v\n}}",
    "alibi": "mixer alibi {\n" + _QKV + "  param slope : [H]\n"
             f"  out y = softmax({_S} - slope * (t - s), mask = s <= t) @ v\n}}",
    "softcap": "mixer softcap {\n" + _QKV +
               f"  out y = softmax({SOFTCAP:g} * tanh({_S} / {SOFTCAP:g}), mask = s <= t) @ v\n}}",
    "document": "mixer document {\n" + _QKV + "  input doc : []\n"
                f"  out y = softmax({_S}, mask = s <= t and row(doc) == col(doc)) @ v\n}}",
    "decode": "attention",
}
VARIANTS = ("alibi", "softcap", "document")
DOCS_PER_SEQ = 8  # the document mask: about this many documents per sequence, random lengths


# ------------------------------------------------------------------ helpers
def fail(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg:
        msg = "out of memory"
    return f"{type(e).__name__}: {msg[:240]}"


def cleanup():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(a, b) -> float:
    """Largest relative error over the tensors of a and b (float64 norms)."""
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    out = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        out = max(out, float((x - y).norm() / y.norm().clamp_min(1e-300)))
    return out


def fmt(x, nd=3):
    if x is None:
        return "—"
    return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:,.0f}"


def kt(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


class Clock:
    """The run's time budget: rows start only while their section's share lasts."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, share: float = 1.0) -> float:
        return self.start + share * self.budget - time.perf_counter()


class Timer:
    """Median ms of fn(): CUDA events (mixerc.autotune.timer, as gpu.py) on a
    GPU; one wall-clock call in a dry run (the code path, not a speed)."""

    def __init__(self, dev: str, dry: bool, quick: bool):
        self.dev, self.dry = dev, dry
        self.settings = TimerSettings(warmup=2, min_repeats=5, max_repeats=30 if quick else 50,
                                      target_s=0.15 if quick else 0.25)

    def __call__(self, fn) -> float:
        if self.dry:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return measure(fn, self.dev, estimate_s=time.perf_counter() - t, settings=self.settings)


def pair(ours, peer, tol, timer, peer_unavailable=None):
    """Run both once, compare, then time ours and (if it matched) the peer.
    Returns {ours, peer (ms), err, status, ours_error, peer_error}."""
    r = {"ours": None, "peer": None, "err": None, "status": None}
    a = b = None
    try:
        a = ours()
    except Exception as e:  # noqa: BLE001
        r["ours_error"] = fail(e)
        traceback.print_exc(limit=3)
    if peer is None:
        r["peer_error"] = peer_unavailable or "no peer"
    else:
        try:
            b = peer()
        except Exception as e:  # noqa: BLE001
            r["peer_error"] = fail(e)
            traceback.print_exc(limit=3)
    if a is not None and b is not None:
        try:
            r["err"] = rel_err(a, b)
        except Exception as e:  # noqa: BLE001  (shapes that do not line up, ...)
            r["err"], r["peer_error"] = math.inf, f"comparison failed: {fail(e)}"
        r["status"] = "ok" if r["err"] < tol else "MISMATCH"
    del a, b
    cleanup()
    if "ours_error" not in r:
        try:
            r["ours"] = timer(ours)
        except Exception as e:  # noqa: BLE001
            r["ours_error"] = fail(e)
    if r["status"] == "ok":
        try:
            r["peer"] = timer(peer)
        except Exception as e:  # noqa: BLE001
            r["peer_error"] = fail(e)
    cleanup()
    return r


def cell_err(r) -> str:
    if r is None:
        return "—"
    if r.get("status") == "MISMATCH":
        return f"MISMATCH {r['err']:.1e}"
    return "—" if r.get("err") is None else f"{r['err']:.1e}"


def cell_ratio(r) -> str:
    if r is None or r.get("ours") is None or r.get("peer") is None:
        return "—"
    return f"**{r['peer'] / r['ours']:.2f}**"  # ours / peer in throughput = peer ms / our ms


def errors(r) -> list:
    if r is None:
        return []
    return [f"{who}: {r[k]}" for who, k in (("ours", "ours_error"), ("peer", "peer_error"))
            if r.get(k) and r[k] != "no peer"]


def randn(shape, dtype, dev, seed, grad=False, scale=1.0):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * scale
    return x.to(dtype).requires_grad_(grad)


def grads_of(fn, leaves, dy):
    def run():
        y = fn()
        return torch.autograd.grad(y, leaves, dy)
    return run


def interpreter_bf16_dots() -> bool:
    """Triton's interpreter computes bf16 dots on raw bits: upcast their
    operands (a GPU's tensor cores take bf16 as it is). Dry runs only; the
    tests' patch (runtime/triton/interpreter.py). False when it cannot apply."""
    try:
        from mixerc.runtime.triton.interpreter import bf16_dots_patch
        setattr(*bf16_dots_patch())
        return True
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------ section 1: SDPA
def sdpa_flash(q, k, v, causal, dev):
    """torch SDPA restricted to its FlashAttention backend, on [B, T, H, D]
    tensors (FlashAttention's own layout: the transposes are views)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return y.transpose(1, 2)


def attention_flops(B, H, T, D, causal):
    return 4 * B * H * T * T * D / (2 if causal else 1)


def section_sdpa(o, ms, timer, clock):
    rows = []
    for D in o.D:
        for causal in (True, False):
            m = ms.get("causal" if causal else "noncausal")
            for T in o.T:
                B, H = max(1, o.tokens // T), max(1, o.width // D)
                row = dict(D=D, causal=causal, T=T, B=B, H=H)
                rows.append(row)
                if clock.left(o.share_sdpa) < 0:
                    row["skipped"] = "time budget"
                    continue
                try:
                    sdpa_row(o, m, row, timer)
                except Exception as e:  # noqa: BLE001
                    row["error"] = fail(e)
                cleanup()
                flops = attention_flops(B, H, T, D, causal)
                row["flops"] = flops
                print(f"  sdpa D={D} {'causal' if causal else 'full  '} T={kt(T)}: "
                      + progress(row, flops), flush=True)
    return rows


def need(m):
    if m is None:
        raise RuntimeError("the mixer did not compile (see the end of the report)")
    return m


def sdpa_row(o, m, row, timer):
    m = need(m)
    B, T, H, D, causal = row["B"], row["T"], row["H"], row["D"], row["causal"]
    q, k, v = (randn((B, T, H, D), o.dtype, o.dev, s, grad=True) for s in (1, 2, 3))
    dy = randn((B, T, H, D), o.dtype, o.dev, 4)
    ours = lambda: m(q=q, k=k, v=v)  # noqa: E731
    peer = lambda: sdpa_flash(q, k, v, causal, o.dev)  # noqa: E731
    with torch.no_grad():
        row["fwd"] = pair(ours, peer, o.tol, timer)
    row["bwd"] = pair(grads_of(ours, (q, k, v), dy), grads_of(peer, (q, k, v), dy),
                      o.grad_tol, timer)


def progress(row, flops) -> str:
    if "error" in row:
        return f"error {row['error']}"
    out = []
    for key, mult in (("fwd", 1.0), ("bwd", 3.5)):
        r = row.get(key)
        if r is None:
            continue
        out.append(f"{key} ours {fmt(r['ours'])} ms ({fmt(tflops(flops * mult, r['ours']))} "
                   f"TF/s) peer {fmt(r['peer'])} ms err {cell_err(r)} ratio {cell_ratio(r)}"
                   + (" [" + "; ".join(errors(r)) + "]" if errors(r) else ""))
    return " | ".join(out)


def tflops(flops, ms):
    return None if ms is None else flops / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------ section 2: FlexAttention
def flex_parts(variant, B, T, H, slope, doc_ids, dev):
    """(score_mod, mask_mod) of a variant for flex_attention."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    if variant == "alibi":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slope[h] * (q_idx - kv_idx)
        return score_mod, causal
    if variant == "softcap":
        def score_mod(score, b, h, q_idx, kv_idx):
            return SOFTCAP * torch.tanh(score / SOFTCAP)
        return score_mod, causal

    def document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    return None, document


def document_ids(B, T, dev, seed=7):
    """[B, T] int32: documents of random lengths, about DOCS_PER_SEQ per sequence."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < DOCS_PER_SEQ / T
    starts[:, 0] = True
    return (starts.cumsum(1) - 1).to(torch.int32).to(dev)


def section_flex(o, ms, timer, clock):
    rows = []
    flex = None
    why = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if o.dry:
            flex = flex_attention  # eager (CPU: forward only); the GPU run compiles it
        else:
            from torch import _dynamo
            for knob in ("cache_size_limit", "recompile_limit"):  # one graph per variant and T
                if hasattr(_dynamo.config, knob):
                    setattr(_dynamo.config, knob, 64)
            flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        why = f"FlexAttention unavailable ({fail(e)})"
        print("  " + why, flush=True)
    D = o.variant_D
    for T in o.variant_T:
        for variant in VARIANTS:
            B, H = max(1, o.tokens // T), max(1, o.width // D)
            row = dict(variant=variant, D=D, T=T, B=B, H=H)
            rows.append(row)
            if clock.left(1.0) < o.min_flex_s:
                row["skipped"] = "time budget"
                continue
            try:
                flex_row(o, ms.get(variant), row, timer, flex, create_block_mask, why)
            except Exception as e:  # noqa: BLE001
                row["error"] = fail(e)
                traceback.print_exc(limit=3)
            cleanup()
            row["flops"] = attention_flops(B, H, T, D, True)
            print(f"  flex {variant:8s} D={D} T={kt(T)}: " + progress(row, row["flops"]),
                  flush=True)
    return rows


def flex_row(o, m, row, timer, flex, create_block_mask, why):
    m = need(m)
    variant, B, T, H, D = row["variant"], row["B"], row["T"], row["H"], row["D"]
    q, k, v = (randn((B, T, H, D), o.dtype, o.dev, s, grad=True) for s in (1, 2, 3))
    dy = randn((B, T, H, D), o.dtype, o.dev, 4)
    extra = {}
    slope = doc_ids = None
    if variant == "alibi":  # the ALiBi slopes 2^(-8 (h + 1) / H)
        slope = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=o.dev)
        extra["slope"] = slope
    if variant == "document":
        doc_ids = document_ids(B, T, o.dev)
        extra["doc"] = doc_ids.to(o.dtype)  # small integers: exact in bf16
    ours = lambda: m(q=q, k=k, v=v, **extra)  # noqa: E731
    peer = peer_b = None
    why_b = "FlexAttention has no backward on the CPU" if o.dev == "cpu" else why
    if flex is not None:
        # the peer's own layout [B, H, T, D], contiguous, same values
        fq, fk, fv = (x.detach().transpose(1, 2).contiguous().requires_grad_(o.dev != "cpu")
                      for x in (q, k, v))
        fdy = dy.transpose(1, 2).contiguous()
        score_mod, mask_mod = flex_parts(variant, B, T, H, slope, doc_ids, o.dev)
        bm = create_block_mask(mask_mod, B if variant == "document" else None, None, T, T,
                               device=o.dev)

        def flex_fwd():
            return flex(fq, fk, fv, score_mod=score_mod, block_mask=bm).transpose(1, 2)

        def flex_fwd_bwd():
            return tuple(g.transpose(1, 2) for g in torch.autograd.grad(
                flex(fq, fk, fv, score_mod=score_mod, block_mask=bm), (fq, fk, fv), fdy))
        peer = flex_fwd
        peer_b = None if o.dev == "cpu" else flex_fwd_bwd
    # forward with inputs that require grad, as in training (one compiled
    # FlexAttention graph per variant and T serves both rows)
    with (torch.no_grad() if o.dev == "cpu" else torch.enable_grad()):
        row["fwd"] = pair(ours, peer, o.tol, timer, why)
    row["bwd"] = pair(grads_of(ours, (q, k, v), dy), peer_b, o.grad_tol, timer, why_b)


# ------------------------------------------------------------------ section 3: decode
def copy_bandwidth(o, timer):
    """GB/s of a device-to-device copy of 1 GiB (read + write), the HBM figure
    the decode rows are compared with."""
    n = (1 << 30) // 2 if not o.dry else 1 << 16
    src = torch.empty(n, dtype=torch.bfloat16, device=o.dev)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def sdpa_decode(qt, K, V, expanded):
    """One query per sequence over the cache: qt [B, H, D], K, V [B, G, S, D]."""
    kw = {} if expanded else {"enable_gqa": True}
    return torch.nn.functional.scaled_dot_product_attention(qt[:, :, None], K, V, **kw)[:, :, 0]


def section_decode(o, ms, timer, clock):
    rows = []
    m = ms.get("decode")
    B, H, G, D = o.dec_B, o.dec_H, o.dec_G, o.dec_D
    for ctx in o.ctx:
        row = dict(ctx=ctx, B=B, H=H, G=G, D=D)
        rows.append(row)
        if clock.left(o.share_decode) < 0:
            row["skipped"] = "time budget"
            continue
        try:
            with torch.no_grad():
                decode_row(o, m, row, timer)
        except Exception as e:  # noqa: BLE001
            row["error"] = fail(e)
            traceback.print_exc(limit=3)
        cleanup()
        row["bytes"] = 2 * B * (ctx + 1) * G * D * torch.finfo(o.dtype).bits // 8
        r = row.get("r") or {}
        print(f"  decode ctx={kt(ctx)}: " + (f"error {row['error']}" if "error" in row else
              f"ours {fmt(r.get('ours'))} ms ({fmt(gbs(row['bytes'], r.get('ours')))} GB/s), "
              f"peer {fmt(r.get('peer'))} ms, err {cell_err(r)} "
              + "; ".join(errors(r))), flush=True)
    return rows


def decode_row(o, m, row, timer):
    m = need(m)
    B, H, G, D, ctx = row["B"], row["H"], row["G"], row["D"], row["ctx"]
    q = randn((B, ctx, H, D), o.dtype, o.dev, 1)
    k, v = (randn((B, ctx, G, D), o.dtype, o.dev, s) for s in (2, 3))
    t = time.perf_counter()
    y, state = m(q=q, k=k, v=v, return_state=True)  # prefill
    if o.dev != "cpu":
        torch.cuda.synchronize()
    row["prefill_s"] = time.perf_counter() - t
    del y, q
    qt = randn((B, H, D), o.dtype, o.dev, 4)
    kt_, vt = (randn((B, G, D), o.dtype, o.dev, s) for s in (5, 6))
    # the peer reads the same cache, the new token appended beforehand
    K, V = (torch.cat([x, xt[:, None]], 1).transpose(1, 2).contiguous()
            for x, xt in ((k, kt_), (v, vt)))
    del k, v  # the state holds the cache
    expanded = False
    try:
        sdpa_decode(qt, K, V, False)
    except Exception:  # noqa: BLE001  (no enable_gqa here: K, V at H heads)
        expanded = True
        K, V = (x.repeat_interleave(H // G, 1) for x in (K, V))
    row["peer_label"] = "SDPA (K, V expanded to H heads)" if expanded else "SDPA enable_gqa"
    newest = [state]  # each call continues the newest state: the cache is appended in place

    def ours():
        y, newest[0] = m.step(newest[0], q=qt, k=kt_, v=vt)
        return y
    # the first call (the one compared) attends over the cache and the new token;
    # the timed calls each add a token (a few dozen on a cache of ctx)
    row["r"] = pair(ours, lambda: sdpa_decode(qt, K, V, expanded), o.tol, timer)


def gbs(nbytes, ms):
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------ report
def header(o, bw, elapsed) -> list:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not importable"
    if o.dry:
        dev = "CPU (dry run: TRITON_INTERPRET=1, tiny shapes; times are not speeds)"
        driver = "—"
    else:
        p = torch.cuda.get_device_properties(0)
        dev = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
        driver = nvidia_driver()
    rev = git_rev()
    return [f"## Triton backend: softmax attention, {datetime.date.today()}", "",
            f"Device: {dev}; driver {driver}; CUDA {torch.version.cuda}; torch "
            f"{torch.__version__}; triton {tv}; mixerc {mixerc.__version__}"
            + (f" (git {rev})" if rev else "") + f". Inputs {str(o.dtype).split('.')[-1]}. "
            f"Device copy bandwidth {fmt(bw)} GB/s (1 GiB copy, read + write). "
            f"{elapsed / 60:.1f} min in all. Times: ms, CUDA-event medians after a warm-up; "
            "ratio = ours / peer in throughput (> 1: ours is faster). Our configs: the "
            "defaults (or what `mixerc autotune` cached for the shape).", ""]


def nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # e.g. 12080: the CUDA version the driver supports
        return f"(nvidia-smi unavailable; driver supports CUDA {v // 1000}.{v % 1000 // 10})"
    except Exception:  # noqa: BLE001
        return "unknown"


def git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=HERE)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def row_note(row) -> str:
    bits = []
    if row.get("skipped"):
        bits.append(f"skipped ({row['skipped']})")
    if row.get("error"):
        bits.append(f"error: {row['error']}")
    for key in ("fwd", "bwd", "r"):
        bits += [f"{key} {e}" for e in errors(row.get(key))]
    return "; ".join(bits).replace("|", "/") or ""


def cells(r, flops) -> list:
    """ms (TFLOP/s) ours, peer, ratio, err."""
    if r is None:
        return ["—"] * 4
    ours = "—" if r["ours"] is None else f"{fmt(r['ours'])} ({fmt(tflops(flops, r['ours']))})"
    peer = "—" if r["peer"] is None else f"{fmt(r['peer'])} ({fmt(tflops(flops, r['peer']))})"
    return [ours, peer, cell_ratio(r), cell_err(r)]


def table_sdpa(rows) -> list:
    L = ["### 1. Plain attention vs torch SDPA (FlashAttention backend)", "",
         "ms (TFLOP/s); forward without grad; fwd+bwd FLOPs = 3.5x forward; causal counts "
         "half. err: relative error of our output (fwd) / gradients (fwd+bwd) against the "
         "peer's on the timed inputs.", "",
         "| D | mask | T | B x H | fwd ours | fwd SDPA | fwd ratio | fwd err | "
         "fwd+bwd ours | fwd+bwd SDPA | fwd+bwd ratio | grad err | notes |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r.get("flops") or attention_flops(r["B"], r["H"], r["T"], r["D"], r["causal"])
        L.append(f"| {r['D']} | {'causal' if r['causal'] else 'none'} | {kt(r['T'])} | "
                 f"{r['B']} x {r['H']} | " + " | ".join(cells(r.get("fwd"), f)) + " | "
                 + " | ".join(cells(r.get("bwd"), 3.5 * f)) + f" | {row_note(r)} |")
    return L


def table_flex(rows) -> list:
    L = ["### 2. Score modifications and masks vs FlexAttention", "",
         f"All causal. ALiBi: `- slope * (t - s)`, slopes 2^(-8(h+1)/H); soft-capping: "
         f"`{SOFTCAP:g} * tanh(S / {SOFTCAP:g})`; document: `row(doc) == col(doc)`, about "
         f"{DOCS_PER_SEQ} documents of random lengths per sequence. FlexAttention: "
         "torch.compile(flex_attention, dynamic=False), block mask from create_block_mask "
         "(built once, outside the timing; ours lists its blocks inside every call). "
         "Both forwards run with inputs that require grad (one compiled graph per variant "
         "and T). ms (TFLOP/s counted as plain causal attention).", "",
         "| variant | D | T | B x H | fwd ours | fwd Flex | fwd ratio | fwd err | "
         "fwd+bwd ours | fwd+bwd Flex | fwd+bwd ratio | grad err | notes |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r.get("flops") or attention_flops(r["B"], r["H"], r["T"], r["D"], True)
        L.append(f"| {r['variant']} | {r['D']} | {kt(r['T'])} | {r['B']} x {r['H']} | "
                 + " | ".join(cells(r.get("fwd"), f)) + " | "
                 + " | ".join(cells(r.get("bwd"), 3.5 * f)) + f" | {row_note(r)} |")
    return L


def table_decode(rows, bw) -> list:
    L = ["### 3. Decode step", "",
         "`m.step(state, ...)` after a prefill with `return_state=True` (stdlib `attention`, "
         "grouped heads); each timed step continues the newest state, so our step writes "
         "its token into the cache in place and runs one split-K launch (plus the combine); "
         "the peer is SDPA of one query over the same cache (new token already appended). "
         "GB/s: bytes of the K and V cache / time; % of the device copy bandwidth.", "",
         "| context | B, H, G, D | cache MB | prefill s | step ours ms | GB/s | % copy BW | "
         "peer | peer ms | peer GB/s | ratio | err | notes |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r.get("r") or {}
        nb = r.get("bytes") or 0
        ours_bw = gbs(nb, x.get("ours"))
        pct = "—" if ours_bw is None or not bw else f"{100 * ours_bw / bw:.0f}%"
        L.append(f"| {kt(r['ctx'])} | {r['B']}, {r['H']}, {r['G']}, {r['D']} | "
                 f"{nb / 1e6:.1f} | {fmt(r.get('prefill_s'))} | {fmt(x.get('ours'))} | "
                 f"{fmt(ours_bw)} | {pct} | {r.get('peer_label', '—')} | {fmt(x.get('peer'))} | "
                 f"{fmt(gbs(nb, x.get('peer')))} | {cell_ratio(x)} | {cell_err(x)} | "
                 f"{row_note(r)} |")
    return L


def targets(sdpa, flex, dec, bw) -> list:
    """Issue 10's acceptance targets, met or missed, from the rows measured."""
    L = ["### Targets (issue 10)", ""]

    def ratio(r):
        return None if not r or r.get("ours") is None or r.get("peer") is None \
            else r["peer"] / r["ours"]

    hit = [r for r in sdpa if r["causal"] and r["T"] == 4096 and r["D"] == 128]
    x = ratio(hit[0].get("fwd")) if hit else None
    L.append("- causal forward, T=4k, D=128 >= 0.9x SDPA flash: " + (
        "not measured" if x is None else f"{x:.2f}x, {'met' if x >= 0.9 else 'missed'}"))
    for key, name in (("fwd", "forward"), ("bwd", "forward+backward")):
        xs = [(r["variant"], r["T"], ratio(r.get(key))) for r in flex]
        got = [(v, T, x) for v, T, x in xs if x is not None]
        if not got:
            L.append(f"- score-mod / mask variants, {name}, >= 1.0x FlexAttention: not measured")
            continue
        worst = min(got, key=lambda z: z[2])
        ok = all(x >= 1.0 for *_, x in got)
        missing = len(xs) - len(got)
        L.append(f"- score-mod / mask variants, {name}, >= 1.0x FlexAttention: "
                 f"{'met' if ok else 'missed'} on the {len(got)} rows measured (lowest "
                 f"{worst[2]:.2f}x, {worst[0]} at T={kt(worst[1])})"
                 + (f"; {missing} rows not measured (see the table)" if missing else ""))
    pcts = [(r["ctx"], gbs(r["bytes"], (r.get("r") or {}).get("ours")) / bw)
            for r in dec if r["ctx"] >= 16384 and (r.get("r") or {}).get("ours") and bw]
    if pcts:
        ok = all(p >= 0.7 for _, p in pcts)
        L.append("- decode >= 70% of the measured bandwidth at 16k+: "
                 f"{'met' if ok else 'missed'} (" + ", ".join(
                     f"{kt(c)}: {100 * p:.0f}%" for c, p in pcts) + ")")
    else:
        L.append("- decode >= 70% of the measured bandwidth at 16k+: not measured")
    return L


def report(o, bw, sdpa, flex, dec, clock) -> str:
    L = header(o, bw, clock.elapsed())
    if sdpa is not None:
        L += table_sdpa(sdpa) + [""]
    if flex is not None:
        L += table_flex(flex) + [""]
    if dec is not None:
        L += table_decode(dec, bw) + [""]
    if o.dry:
        L += ["### Targets (issue 10)", "", "- not judged in a dry run (tiny shapes, interpreter)"]
    else:
        L += targets(sdpa or [], flex or [], dec or [], bw)
    return "\n".join(L)


# ------------------------------------------------------------------ main
def parse(argv):
    p = argparse.ArgumentParser(
        prog="gpu.py --backend triton",
        description="Benchmark of the Triton backend's softmax kernels against SDPA's "
                    "FlashAttention, FlexAttention and SDPA decode (bf16, CUDA).")
    p.add_argument("--T", default="1024,4096,16384", help="sequence lengths of section 1")
    p.add_argument("--D", default="128,64", help="head dims of section 1")
    p.add_argument("--tokens", type=int, default=16384, help="B = max(1, tokens // T)")
    p.add_argument("--width", type=int, default=2048, help="H = width // D")
    p.add_argument("--variant-T", default="4096,16384", help="sequence lengths of section 2")
    p.add_argument("--variant-D", type=int, default=128)
    p.add_argument("--ctx", default="1024,4096,16384,65536", help="decode contexts")
    p.add_argument("--decode", default="8,16,4,128", help="decode B,H,G,D")
    p.add_argument("--sections", default="sdpa,flex,decode",
                   help="comma-separated subset of sdpa,flex,decode")
    p.add_argument("--budget", type=float, default=380.0,
                   help="seconds for the whole run: rows that would start later are skipped "
                        "(section 1 gets the first 35%%, decode runs until 50%%, FlexAttention "
                        "the rest)")
    p.add_argument("--grace", type=float, default=45.0,
                   help="past budget + grace seconds a watchdog prints the report so far and "
                        "exits (status 3): a compile that hangs cannot eat the whole call")
    p.add_argument("--quick", action="store_true",
                   help="a subset: T 1k,4k; D 128; variants at 4k; decode at 1k, 16k")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: tiny shapes on the CPU in Triton's interpreter (every mixer "
                        "built and compiled, every row's code path and check run once)")
    p.add_argument("--out", help="append the markdown report to FILE (rewritten after each "
                                 "section, so a cut-short run keeps what it measured)")
    o = p.parse_args(argv)
    if o.quick:
        o.T, o.D, o.variant_T, o.ctx = "1024,4096", "128", "4096", "1024,16384"
    if o.dry_run:  # tiny shapes: T not a multiple of the blocks, batch > 1, grouped heads
        o.T, o.D, o.tokens, o.width = "40", "128,64", 80, 128
        o.variant_T, o.variant_D, o.ctx, o.decode = "40", 64, "24,40", "2,4,2,64"
    o.T = [int(x) for x in o.T.split(",")]
    o.D = [int(x) for x in o.D.split(",")]
    o.variant_T = [int(x) for x in o.variant_T.split(",")]
    o.ctx = [int(x) for x in o.ctx.split(",")]
    o.dec_B, o.dec_H, o.dec_G, o.dec_D = (int(x) for x in o.decode.split(","))
    o.sections = set(o.sections.split(","))
    o.dry = o.dry_run
    o.share_sdpa, o.share_decode = 0.35, 0.5
    o.min_flex_s = 0.0 if o.dry else 40.0  # a FlexAttention compile takes tens of seconds
    return p, o


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p, o = parse(argv)
    if o.dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # the interpreter is chosen when a kernel is defined: set it before triton loads
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              env=env).returncode
    if not o.dry and not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark times Triton kernels on a GPU "
                "(--dry-run checks it on the CPU)")
    clock = Clock(o.budget)
    o.dev = "cpu" if o.dry else "cuda"
    o.dtype, o.tol, o.grad_tol = torch.bfloat16, 2e-2, 5e-2
    if o.dry and not interpreter_bf16_dots():
        o.dtype, o.tol, o.grad_tol = torch.float32, 1e-4, 1e-4
        print("dry run in float32 (the interpreter's bf16 dot patch did not apply)")
    if not o.dry:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    timer = Timer(o.dev, o.dry, o.quick)
    base = Path(o.out).read_text() if o.out and Path(o.out).exists() else ""

    ms, compile_errors = {}, {}
    for name, src in SOURCES.items():
        try:
            ms[name] = mixerc.compile(src, backend="triton")
        except Exception as e:  # noqa: BLE001
            compile_errors[name] = fail(e)
            print(f"  compile {name}: {compile_errors[name]}", flush=True)
    bw = None
    try:
        bw = copy_bandwidth(o, timer)
    except Exception as e:  # noqa: BLE001
        print(f"  copy bandwidth: {fail(e)}", flush=True)
    print(header(o, bw, 0)[2], flush=True)
    results = {"sdpa": None, "flex": None, "decode": None}

    def emit():
        try:
            text = report(o, bw, results["sdpa"], results["flex"], results["decode"], clock)
        except Exception as e:  # noqa: BLE001  (a row half written when the watchdog fired)
            text = f"(report failed: {fail(e)})"
        if compile_errors:
            text += "\n\nMixers that did not compile: " + "; ".join(
                f"{k}: {v}" for k, v in compile_errors.items())
        if o.out:
            Path(o.out).write_text(base + ("\n" if base else "") + text + "\n")
        return text

    def hard_stop():  # a compile that outlasts the budget: report what was measured, exit
        print(f"\nhard time limit ({o.budget + o.grace:.0f} s) reached: the report so far\n"
              + emit(), flush=True)
        os._exit(3)
    watchdog = threading.Timer(max(1.0, o.budget + o.grace - clock.elapsed()), hard_stop)
    watchdog.daemon = True
    watchdog.start()

    # the expensive FlexAttention compiles run last, with whatever time is left
    for key, title, fn, tab in (
            ("sdpa", "1. plain attention vs SDPA flash", section_sdpa, table_sdpa),
            ("decode", "3. decode step", section_decode, None),
            ("flex", "2. score mods / masks vs FlexAttention", section_flex, table_flex)):
        if key not in o.sections:
            continue
        print(f"{title} ({clock.elapsed():.0f} s in)", flush=True)
        try:
            results[key] = fn(o, ms, timer, clock)
        except Exception as e:  # noqa: BLE001  (a mixer that did not compile, ...)
            traceback.print_exc(limit=4)
            print(f"  section failed: {fail(e)}", flush=True)
            results[key] = []
        lines = tab(results[key]) if tab else table_decode(results[key], bw)
        print("\n" + "\n".join(lines) + "\n", flush=True)
        emit()
    text = emit()
    watchdog.cancel()  # gpu.py runs the linear part (triton_linear.py) next, in this process
    print("\n" + text, flush=True)
    if o.dry:  # the dry run fails on what a GPU run would: our errors, a peer mismatch
        bad = [e for e in compile_errors.values()]
        for rows in results.values():
            for r in rows or []:
                if r.get("error"):
                    bad.append(r["error"])
                for key in ("fwd", "bwd", "r"):
                    x = r.get(key) or {}
                    if x.get("ours_error") or x.get("status") == "MISMATCH":
                        bad.append(f"{key}: {x.get('ours_error') or 'MISMATCH'}")
        if bad:
            print("dry run FAILED: " + " | ".join(bad), flush=True)
            return 1
        print("dry run OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
