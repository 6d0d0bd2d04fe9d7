"""GPU benchmark of the torch backend (the path every user has until the Triton
backend lands). Not a test.

    python benchmarks/gpu.py [--mixers ssd,gla] [--T 1024,4096] [--out FILE]
    python benchmarks/gpu.py --backend triton [...]   # the Triton backend: triton_attention.py,
                                                      # then triton_linear.py (--family)

Sections (batch 1, the shapes of benchmarks/cpu.py: H=8 heads of dim 64, E=512):
  1. forward (no grad) in float32 and with bfloat16 inputs (computed in float32),
     per T, with the log-log slope over the T measured;
  2. forward + backward in float32;
  3. decode step (`m.step`) after a prefill of 1k and 16k tokens;
  4. peers, timed in the same process on the same inputs after checking that
     each computes our mixer's output: torch SDPA for attention (float32 and
     bf16: FlashAttention-2 kernels), flash-linear-attention's Triton kernels
     (chunk_linear_attn, chunk_simple_gla, chunk_gla) where they run here.
Times are CUDA-event medians (mixerc.autotune.timer) after a warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu  # noqa: E402  (the shapes, the cases, the fla reference loader)

import mixerc  # noqa: E402
from mixerc.autotune.timer import TimerSettings, measure  # noqa: E402

DEV = "cuda"
TIMER = TimerSettings(warmup=2, min_repeats=5, max_repeats=50, target_s=0.3)


def cuda_ms(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t
    return measure(fn, DEV, estimate_s=est, settings=TIMER)


def fmt(x):
    return "—" if x is None else f"{x:.3g}" if x < 100 else f"{x:,.0f}"


class Case(cpu.Case):
    def inputs(self, T, seed=0, kernel_len=None, dtype=torch.float32, grad=False):
        a = super().inputs(T, seed=seed, kernel_len=kernel_len)
        return {k: v.to(DEV, dtype).requires_grad_(grad) for k, v in a.items()}


# ------------------------------------------------------------------ sections
def forward_rows(cases, o):
    rows = {}
    for c in cases:
        row = {"f32": {}, "bf16": {}, "fwdbwd": {}}
        for T in o.T:
            for key, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
                a = c.inputs(T, dtype=dt)
                with torch.no_grad():
                    row[key][T] = cuda_ms(lambda: c.torch(**a))
            if T <= o.bwd_max_T:
                a = c.inputs(T, grad=True)
                row["fwdbwd"][T] = cuda_ms(lambda: c.torch(**a).sum().backward())
            print(f"  {c.name:17s} T={cpu.kt(T)}: fwd f32 {fmt(row['f32'][T])} ms, "
                  f"bf16 in {fmt(row['bf16'][T])} ms, fwd+bwd {fmt(row['fwdbwd'].get(T))} ms",
                  flush=True)
            if row["f32"][T] / 1e3 * 4 > o.max_call:
                break
        pts = [(T, s) for T, s in row["f32"].items() if T >= 4096]
        row["exp"] = cpu.slope(pts) if len(pts) >= 2 else None
        rows[c.name] = row
    return rows


def decode_rows(cases, o):
    rows = {}
    for c in (c for c in cases if c.causal):
        per = {}
        for ctx in o.ctx:
            a = c.inputs(ctx, kernel_len=1024)
            with torch.no_grad():
                _, state = c.torch(**a, return_state=True)
                tok = {n: v[:, -1] for n, v in c.inputs(1, seed=3).items()
                       if n in c.program.inputs}
                fixed = {n: a[n] for n in list(c.program.params) + list(c.program.kernels)}
                per[ctx] = cuda_ms(lambda: c.torch.step(state, **tok, **fixed))
        rows[c.name] = per
        print(f"  decode {c.name:17s} " + " ".join(f"{cpu.kt(k)}:{fmt(v)}ms"
                                                  for k, v in per.items()), flush=True)
    return rows


def fla_ops():
    from fla.ops.gla import chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla
    return chunk_linear_attn, chunk_simple_gla, chunk_gla


def peers(c):
    """[(label, fn(args) -> y)] for this mixer; fla import failures are reported."""
    out = []
    if c.name == "attention":
        out.append(("torch SDPA", cpu.peer_sdpa))
    try:
        la, sgla, gla = fla_ops()
    except Exception as e:  # noqa: BLE001  (no fla, or its kernels do not import here)
        return out + [(f"fla Triton: unavailable ({type(e).__name__}: {e})", None)]
    if c.name == "linear_attention":
        out.append(("fla chunk_linear_attn",
                    cpu.linear_attention_with(lambda *args, **kw: la(*args, **kw)[0])))
    if c.name == "retnet":
        out.append(("fla chunk_simple_gla", cpu.retnet_with(sgla)))
    if c.name == "ssd":
        out.append(("fla chunk_simple_gla + D x (B/C, Δ prepared in torch)", cpu.ssd_with(sgla)))
    if c.name == "gla":
        out.append(("fla chunk_gla", lambda a: gla(
            a["q"], a["k"], a["v"], a["g"], scale=1.0)[0]))
    return out


def peer_rows(cases, o):
    rows = []
    for c in cases:
        for label, fn in peers(c):
            if fn is None:
                rows.append((c.name, label, None, None, {}))
                continue
            for dname, dt, tol in (("f32", torch.float32, 5e-3), ("bf16", torch.bfloat16, 3e-2)):
                a = c.inputs(256, seed=1, dtype=dt)
                try:
                    with torch.no_grad():
                        err = cpu.rel_err(fn(a), c.torch(**a))
                except Exception as e:  # noqa: BLE001
                    rows.append((c.name, f"{label}: failed ({type(e).__name__}: "
                                 f"{str(e)[:120]})", dname, None, {}))
                    continue
                times = {}
                if err < tol:
                    for T in o.T:
                        a = c.inputs(T, dtype=dt)
                        with torch.no_grad():
                            times[T] = (cuda_ms(lambda: c.torch(**a)), cuda_ms(lambda: fn(a)))
                rows.append((c.name, label, dname, err, times))
                print(f"  peer {c.name:17s} {label} {dname}: err {err:.1e} " + " ".join(
                    f"{cpu.kt(T)}:{fmt(x)}/{fmt(y)}" for T, (x, y) in times.items()), flush=True)
    return rows


# ------------------------------------------------------------------ report
def report(o, cases, fwd, dec, prs, elapsed):
    p = torch.cuda.get_device_properties(0)
    try:
        fla = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        fla = "not installed"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    L = [f"## GPU benchmark of the torch backend, {datetime.date.today()}", "",
         f"Device: {p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, "
         f"triton {tv}, fla-core {fla}, mixerc {mixerc.__version__}. TF32 off. "
         f"{elapsed / 60:.1f} min in all. Batch 1; sizes as in the CPU benchmark. "
         "Times: ms, median of CUDA-event timings after a warm-up.", "",
         "### 1. Forward and backward (ms)", "",
         "| mixer | class | " + " | ".join(f"T={cpu.kt(T)} f32 / bf16-in / fwd+bwd"
                                          for T in o.T) + " | exponent (4k+) |",
         "|---|---|" + "---|" * (len(o.T) + 1)]
    for c in (c for c in cases if c.name in fwd):
        r = fwd[c.name]
        cells = [f"{fmt(r['f32'].get(T))} / {fmt(r['bf16'].get(T))} / "
                 f"{fmt(r['fwdbwd'].get(T))}" for T in o.T]
        L.append(f"| {c.name} | {c.cls} | " + " | ".join(cells) + " | "
                 + ("—" if r["exp"] is None else f"{r['exp']:.2f}") + " |")
    L += ["", "### 2. Decode step (ms per token, float32)", "",
          "| mixer | " + " | ".join(f"ctx {cpu.kt(x)}" for x in o.ctx) + " |",
          "|---|" + "---|" * len(o.ctx)]
    for name, per in dec.items():
        L.append(f"| {name} | " + " | ".join(fmt(per.get(x)) for x in o.ctx) + " |")
    L += ["", "### 3. Peers (ms: ours / peer = ratio; > 1: the peer is faster)", "",
          "| mixer | peer | inputs | rel. err (T=256) | " + " | ".join(
              f"T={cpu.kt(T)}" for T in o.T) + " |", "|---|---|---|---|" + "---|" * len(o.T)]
    for name, label, dname, err, times in prs:
        cells = [f"{fmt(times[T][0])} / {fmt(times[T][1])} = {times[T][0] / times[T][1]:.2f}"
                 if T in times else "—" for T in o.T]
        L.append(f"| {name} | {label} | {dname or '—'} | "
                 f"{'—' if err is None else f'{err:.1e}'} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", choices=("torch", "triton"), default="torch")
    known, rest = pre.parse_known_args(argv)
    if known.backend == "triton":  # softmax kernels vs SDPA / FlexAttention, then the linear family vs fla
        import triton_linear
        return triton_linear.gpu_main(rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("torch", "triton"), default="torch",
                   help="triton: benchmarks/triton_attention.py then triton_linear.py "
                        "(--family attention|linear|all; their options: --backend triton --help)")
    p.add_argument("--mixers")
    p.add_argument("--T", default="1024,4096,16384,65536")
    p.add_argument("--ctx", default="1024,16384")
    p.add_argument("--bwd-max-T", type=int, default=16384)
    p.add_argument("--max-call", type=float, default=20.0)
    p.add_argument("--sections", default="forward,decode,peers",
                   help="comma-separated subset of forward,decode,peers")
    p.add_argument("--out")
    o = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark times the torch backend on a GPU "
                "(benchmarks/cpu.py is the CPU one)")
    o.T = [int(x) for x in o.T.split(",")]
    o.ctx = [int(x) for x in o.ctx.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    names = o.mixers.split(",") if o.mixers else mixerc.stdlib_names()
    start = time.perf_counter()
    cases = [Case(n, cpu.SIZES[n]) for n in names]
    sections = set(o.sections.split(","))
    print("1. forward / backward", flush=True)
    fwd = forward_rows(cases, o) if "forward" in sections else {}
    print("2. decode", flush=True)
    dec = decode_rows(cases, o) if "decode" in sections else {}
    print("3. peers", flush=True)
    prs = peer_rows(cases, o) if "peers" in sections else []
    text = report(o, cases, fwd, dec, prs, time.perf_counter() - start)
    print("\n" + text)
    if o.out:
        Path(o.out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
