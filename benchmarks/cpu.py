"""CPU benchmark of the torch backend (issue 3, item 7). Not a test.

    python benchmarks/cpu.py [--quick | --smoke] [--mixers ssd,gla] [--T 1024,2048]
                             [--dense-T 256,512] [--out benchmarks/RESULTS.md]

Sections (float32, batch 1, torch threads = all cores, shapes in SIZES):
  1. forward time of `backend="torch"` per T, the log-log slope, and the dense
     float64 interpreter at the (small) T it can reach, with the speedup there;
  2. decode-step time (`m.step`) after a prefill of 1k / 4k / 16k tokens;
  3. peers measured in the same process, interleaved with ours, after checking
     on a small input that each computes what our mixer computes;
  4. mixers nobody shipped, one per class of the kernel plan (ALiBi, soft-capping,
     document and prefix-LM masks, a decay inside a window, non-causal linear
     attention, a decay times a polynomial kernel) against the standard mixer
     of their class (benchmarks/classes.py).
Calls over --max-call seconds stop a mixer's sweep (later T are reported as
skipped, never extrapolated). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import classes  # benchmarks/classes.py: section 4
import mixerc
from mixerc.inputs import default_sizes, random_inputs

# B=1, H=8, head dims 64; single-channel mixers use E = H * 64 = 512 channels.
SIZES = dict(
    attention=dict(H=8, G=8, D=64), sliding_window=dict(H=8, D=64),
    linear_attention=dict(H=8, K=64, V=64), based=dict(H=8, K=16, V=64),
    retnet=dict(H=8, K=64, V=64), gla=dict(H=8, K=64, V=64),
    ssd=dict(H=8, P=64, N=64, G=1), hydra=dict(H=8, P=64, N=64),
    mamba=dict(E=512, N=16), h3=dict(E=512, N=16), gated_conv=dict(E=512))
SMOKE_SIZES = {n: {d: (1 if d == "G" else 2 if d == "H" else 8) for d in s}
               for n, s in SIZES.items()}
SIZE_NOTES = ("based uses the Based paper's feature dim K=16 (its feature map has "
              "1 + K + K^2 = 273 features); ssd has one B/C group (G=1); attention "
              "has no key sharing (G=H); gated_conv's kernel has L = T taps in section "
              "1 (a long convolution) and L = {L} in section 2.")
MODES = {  # T sweep, dense T, decode contexts, repeats, decode steps, max seconds per call
    "full": dict(T=[1024, 2048, 4096, 8192, 16384], dense_T=[512, 2048],
                 ctx=[1024, 4096, 16384], repeats=3, steps=20, max_call=90.0,
                 class_T=[2048, 8192]),
    "quick": dict(T=[1024, 2048, 4096], dense_T=[256], ctx=[1024, 4096], repeats=2,
                  steps=10, max_call=20.0, class_T=[2048]),
    "smoke": dict(T=[64, 128], dense_T=[32], ctx=[16, 64], repeats=1, steps=3,
                  max_call=30.0, class_T=[64]),
}
FIT_LO, FIT_HI = 2048, 16384   # the scaling exponent's range (target: <= 1.15)
SLOW_CALL = 2.0                # seconds: longer calls are timed once


# ------------------------------------------------------------------ timing
def clock(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure(fn, repeats):
    """(median seconds, runs, last result): the first call is a warm-up unless
    it is slow, then it is the measurement."""
    first, out = clock(fn)
    if first > SLOW_CALL:
        return first, 1, out
    times = []
    for _ in range(repeats):
        t, out = clock(fn)
        times.append(t)
    return statistics.median(times), len(times), out


def measure_pair(fa, fb, repeats):
    """Medians of two functions timed alternately (the machine may be shared:
    interleaving exposes both to the same load). Slow calls: one timed pair."""
    ta, tb = [clock(fa)[0]], [clock(fb)[0]]  # warm-up
    for _ in range(1 if max(ta + tb) > SLOW_CALL else repeats):
        ta.append(clock(fa)[0])
        tb.append(clock(fb)[0])
    return statistics.median(ta), statistics.median(tb)


def slope(points):
    """Least-squares slope of log(time) against log(T)."""
    xs = [math.log(t) for t, _ in points]
    ys = [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def ms(sec):
    return "—" if sec is None else f"{sec * 1e3:.3g}" if sec < 0.1 else f"{sec * 1e3:,.0f}"


def times_x(r):
    return f"{r:.0f}x" if r >= 10 else f"{r:.2g}x"


def kt(T):
    return f"{T // 1024}k" if T >= 1024 and T % 1024 == 0 else str(T)


# ------------------------------------------------------------------ inputs
class Case:
    """One standard mixer at the benchmark's sizes."""

    def __init__(self, name, sizes):
        self.name = name
        self.torch = mixerc.compile(name, backend="torch")
        self.program = self.torch.program
        self.sizes = default_sizes(self.program, sizes)
        a = self.torch.analysis
        self.causal = a.causal
        self.quadratic = any(mi.cls == "softmax" and math.isinf(mi.band[1] - mi.band[0])
                             for mi in a.matrices)
        self.cls = a.cls

    def inputs(self, T, seed=0, kernel_len=None):
        return random_inputs(self.program, self.sizes, 1, T, seed=seed,
                             kernel_len=kernel_len or T)


# ------------------------------------------------------------------ 1. forward
def forward_section(cases, o):
    rows, prefills = {}, {}
    for c in cases:
        times, skipped = {}, None
        for T in o.T:
            if skipped:
                break
            args = c.inputs(T)
            call = (lambda a=args: c.torch(**a, return_state=True)) if c.causal else \
                (lambda a=args: (c.torch(**a), None))
            with torch.no_grad():
                sec, _, (_, state) = measure(call, o.repeats)
            times[T] = sec
            if T in o.ctx and not c.program.kernels:
                prefills[(c.name, T)] = (state, args)
            nxt = [t for t in o.T if t > T]
            if nxt and sec * nxt[0] / T > o.max_call:
                skipped = (f"T >= {kt(nxt[0])} skipped: T={kt(T)} took {sec:.1f} s, "
                           f"the next would pass --max-call {o.max_call:g} s")
        fit = [(T, s) for T, s in times.items() if FIT_LO <= T <= FIT_HI]
        if len(fit) < 2:
            fit = sorted(times.items())[-2:]
        exp = slope(fit) if len(fit) >= 2 else None
        impl = c.torch._impl  # the config of the last (largest) T: tuned or default
        cfg = list(getattr(impl, "_configs", {}).values())[-1:] or [impl.config]
        rows[c.name] = dict(times=times, exp=exp, config=cfg[0],
                            fit=(fit[0][0], fit[-1][0]) if fit else None, note=skipped)
        print(f"  forward {c.name:17s} " + " ".join(f"{kt(T)}:{ms(s)}ms" for T, s in
              times.items()) + (f"  exponent {exp:.2f}" if exp else "") +
              (f"  ({skipped})" if skipped else ""), flush=True)
    return rows, prefills


def dense_section(cases, o, fwd):
    rows = {}
    for c in cases:
        dense = mixerc.compile(c.name, backend="dense")
        out = []
        for T in o.dense_T:
            args = c.inputs(T)
            with torch.no_grad():
                td, _ = clock(lambda: dense(**args))
                tt = fwd[c.name]["times"].get(T) or measure(lambda: c.torch(**args),
                                                            o.repeats)[0]
            out.append((T, td, tt))
            print(f"  dense   {c.name:17s} T={T}: dense {ms(td)} ms, torch {ms(tt)} ms, "
                  f"{times_x(td / tt)}", flush=True)
            nxt = [t for t in o.dense_T if t > T]
            if nxt and td * (nxt[0] / T) ** 2 > o.max_call:  # dense is quadratic in T
                break
        exp = slope([(T, td) for T, td, _ in out]) if len(out) >= 2 else None
        rows[c.name] = dict(points=out, exp=exp)
    return rows


# ------------------------------------------------------------------ 2. decode
def state_numel(state):
    return sum(v.numel() for v in state.tensors.values() if isinstance(v, torch.Tensor))


def decode_section(cases, o, prefills, fwd):
    rows = {}
    for c in (c for c in cases if c.causal):
        per_ctx = {}
        for ctx in o.ctx:
            got = prefills.get((c.name, ctx))
            if got is None and ctx in o.T and ctx not in fwd[c.name]["times"]:
                per_ctx[ctx] = None  # its forward was over --max-call: so is the prefill
                continue
            if got is None:
                args = c.inputs(ctx, kernel_len=o.decode_L)
                t0 = time.perf_counter()
                with torch.no_grad():
                    _, state = c.torch(**args, return_state=True)
                if time.perf_counter() - t0 > o.max_call:
                    per_ctx[ctx] = None
                    break
            else:
                state, args = got
            toks = c.inputs(o.steps + 1, seed=7)
            fixed = {**{n: args[n] for n in c.program.params},
                     **{n: args[n] for n in c.program.kernels}}
            numel, times = state_numel(state), []
            with torch.no_grad():
                for i in range(o.steps + 1):
                    step = {n: toks[n][:, i] for n in c.program.inputs}
                    t, (_, state) = clock(lambda: c.torch.step(state, **step, **fixed))
                    times.append(t)
            per_ctx[ctx] = (statistics.median(times[1:]), numel)
        rows[c.name] = per_ctx
        print(f"  decode  {c.name:17s} " + " ".join(
            f"{kt(x)}:{'—' if v is None else ms(v[0])}ms" for x, v in per_ctx.items()),
            flush=True)
    return rows


# ------------------------------------------------------------------ 3. peers
def fla_file(rel):
    """One pure-PyTorch reference file of fla-core, loaded on its own: fla's
    package __init__ imports triton kernels, which may not import here."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        raise ImportError("fla-core is not installed (pip install fla-core)")
    path = Path(spec.submodule_search_locations[0]) / rel
    mod_spec = importlib.util.spec_from_file_location("fla_ref_" + rel.replace("/", "_")[:-3],
                                                      path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def peer_sdpa(a):
    q, k, v = (x.transpose(1, 2) for x in (a["q"], a["k"], a["v"]))
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=gqa).transpose(1, 2)


# Our mixers through an fla function (its pure-PyTorch reference here, its
# Triton kernel in gpu.py): fn(args) -> y. `ref` returns y (linear attention)
# or (y, final state) (simple GLA), as fla's references do.
def linear_attention_with(ref):  # phi = elu + 1 as in examples/linear_attention.mx
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    return lambda a: ref(phi(a["q"]), phi(a["k"]), a["v"], scale=1.0, normalize=True)


def retnet_with(ref):  # simple GLA, g = log_gamma
    return lambda a: ref(a["q"], a["k"], a["v"],
                         g=a["log_gamma"].expand(a["q"].shape[:3]).contiguous(), scale=1.0)[0]


def ssd_with(ref):  # simple GLA, q = C, k = delta * B, g = A * delta; plus D x
    def run(a):
        H = a["x"].shape[2]
        delta = F.softplus(a["dt"] + a["dt_bias"])
        Bh, Ch = (a[n].repeat_interleave(H // a[n].shape[2], 2) for n in ("B", "C"))
        y = ref(Ch, (Bh * delta[..., None]).to(a["x"].dtype), a["x"],
                g=(-torch.exp(a["A_log"]) * delta).float(), scale=1.0)[0]
        return y + a["D"][:, None] * a["x"]
    return run


def peer_linear_attention(a):
    return linear_attention_with(fla_file("ops/linear_attn/naive.py").naive_chunk_linear_attn)


def peer_retnet(a):
    return retnet_with(fla_file("ops/simple_gla/naive.py").naive_chunk_simple_gla)


def peer_ssd(a):
    return ssd_with(fla_file("ops/simple_gla/naive.py").naive_chunk_simple_gla)


def peer_gla(a):  # fla ships no pure-PyTorch chunked GLA: its recurrent reference
    ref = fla_file("ops/gla/naive.py").naive_recurrent_gla
    return lambda a: ref(a["q"] * a["q"].shape[-1] ** 0.5, a["k"], a["v"], a["g"])[0]


PEERS = {  # mixer -> (peer name, builder of fn(args) -> y)
    "attention": ("torch SDPA (is_causal)", lambda a: peer_sdpa),
    "linear_attention": ("fla naive_chunk_linear_attn", peer_linear_attention),
    "retnet": ("fla naive_chunk_simple_gla (g = log_gamma)", peer_retnet),
    "ssd": ("fla naive_chunk_simple_gla (g = A*delta) + D x", peer_ssd),
    "gla": ("fla naive_recurrent_gla", peer_gla),
}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def peer_section(cases, o):
    rows = {}
    for c in (c for c in cases if c.name in PEERS):
        label, build = PEERS[c.name]
        row = dict(peer=label, times={}, fail=None, note=None)
        rows[c.name] = row
        check_T = 256 if o.mode != "smoke" else 128
        a = c.inputs(check_T, seed=1)
        try:
            fn = build(a)
            with torch.no_grad():
                err = rel_err(fn(a), c.torch(**a))
        except Exception as e:  # missing package, API change: say so, keep going
            row["fail"] = f"unavailable: {type(e).__name__}: {e}"
            print(f"  peer    {c.name:17s} {row['fail']}", flush=True)
            continue
        row["err"] = err
        if not err < 1e-4:
            row["fail"] = f"MISMATCH: relative error {err:.2e} at T={check_T}; not timed"
            print(f"  peer    {c.name:17s} {row['fail']}", flush=True)
            continue
        for T in o.peer_T:
            a = c.inputs(T)
            with torch.no_grad():
                row["times"][T] = measure_pair(lambda: c.torch(**a), lambda: fn(a), o.repeats)
            ours, theirs = row["times"][T]
            print(f"  peer    {c.name:17s} T={kt(T)}: ours {ms(ours)} ms, {label} "
                  f"{ms(theirs)} ms, ratio {ours / theirs:.2f}", flush=True)
            nxt = [t for t in o.peer_T if t > T]
            if nxt and max(ours, theirs) * nxt[0] / T * 2 > o.max_call:
                row["note"] = f"T >= {kt(nxt[0])} skipped (--max-call)"
                break
    return rows


# ------------------------------------------------------------------ report
def machine_info():
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    try:
        fla = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        fla = "not installed"
    root = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    env = [f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                            "LD_PRELOAD", "MIXERC_AUTOTUNE") if k in os.environ]
    return dict(cpu=model, cores=os.cpu_count(), threads=torch.get_num_threads(),
                env=", ".join(env) or "none of MALLOC_*, LD_PRELOAD, MIXERC_AUTOTUNE set",
                torch=torch.__version__, python=platform.python_version(), fla=fla,
                mixerc=f"{mixerc.__version__} ({git})")


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def report(o, cases, fwd, dense, dec, peers, info, load, elapsed):
    by = {c.name: c for c in cases}
    lines = [f"## CPU benchmark ({o.mode}), {datetime.date.today().isoformat()}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
             f"({info['threads']} thread{'s' if info['threads'] > 1 else ''}), Python {info['python']}, fla-core {info['fla']}, "
             f"mixerc {info['mixerc']}. Environment: {info['env']}. Load average {load[0]:.1f} at the start, "
             f"{load[1]:.1f} at the end ({'shared machine: other processes ran' if max(load) > info['cores'] else 'idle'}). "
             f"{elapsed / 60:.0f} min in all.", "",
             "float32, batch 1; configs: the autotune cache's where it has one (MIXERC_AUTOTUNE "
             "as set), else the defaults (column `config`). Sizes: " +
             "; ".join(f"{n} " + ",".join(f"{k}={v}" for k, v in by[n].sizes.items()
                                          if not k.isdigit()) for n in by) + ". " +
             (SIZE_NOTES.format(L=o.decode_L) if o.mode != "smoke" else "Tiny sizes: a smoke run "
              "checks the script, its numbers mean nothing."), ""]
    lines += ["### 1. Forward (ms, median)", "",
              f"Exponent: log-log slope of time vs T over T={kt(FIT_LO)}..{kt(FIT_HI)} "
              "(the measured part of it). Dense: the float64 interpreter "
              "(`backend=\"dense\"`), one call at each T shown (a T whose call would pass "
              "--max-call, estimated as quadratic, is skipped); its exponent is measured "
              "between those T. Nothing is extrapolated.", ""]
    head = ["mixer", "class"] + [f"T={kt(T)}" for T in o.T] + ["exponent", "dense", "config"]
    rows = []
    for n, r in fwd.items():
        d = dense.get(n)
        dtxt = "; ".join(f"T={T}: {ms(td)} ms = {times_x(td / tt)} torch" for T, td, tt in
                         d["points"]) + (f" (exp {d['exp']:.2f})" if d and d["exp"] else "") \
            if d else "—"
        exp = f"{r['exp']:.2f} ({kt(r['fit'][0])}–{kt(r['fit'][1])})" if r["exp"] else "—"
        rows.append([n, by[n].cls + (" (quadratic)" if by[n].quadratic else "")] +
                    [ms(r["times"].get(T)) for T in o.T] +
                    [exp, dtxt, " ".join(f"{k}={v}" for k, v in r["config"].items())])
    lines += [table(head, rows)]
    notes = [f"{n}: {r['note']}" for n, r in fwd.items() if r["note"]]
    lines += [""] + [f"- {x}" for x in notes] + [""]
    if dec:
        lines += decode_table(o, dec)
    if peers:
        lines += peer_table(o, peers)
    lines += ["### Targets (issue 3)", ""] + [f"- {t}" for t in targets(o, by, fwd, dense, dec,
                                                                         peers)] + [""]
    return "\n".join(lines)


def decode_table(o, dec):
    lines = ["### 2. Decode step (ms per token, median of "
              f"{o.steps} steps after a prefill of the given context)", ""]
    head = ["mixer"] + [f"ctx {kt(x)}" for x in o.ctx] + ["state elements", "last / first"]
    rows = []
    for n, per in dec.items():
        vals = [per.get(x) for x in o.ctx]
        have = [v for v in vals if v]
        ratio = f"{have[-1][0] / have[0][0]:.2f}" if len(have) >= 2 else "—"
        sizes = sorted({v[1] for v in have})
        rows.append([n] + [ms(v[0]) if v else "—" for v in vals] +
                    [" → ".join(f"{s:,}" for s in sizes), ratio])
    return lines + [table(head, rows), ""]


def peer_table(o, peers):
    lines = ["### 3. Peers (ms, median, ours and theirs timed alternately)", "",
              "Each peer is first checked to compute our mixer's output on a small input "
              "(relative error shown); ratio = ours / peer (< 1: ours is faster).", ""]
    head = ["mixer", "peer", "rel. err"] + [f"T={kt(T)}" for T in o.peer_T]
    rows = []
    for n, r in peers.items():
        if r["fail"]:
            rows.append([n, r["peer"], r["fail"]] + ["—"] * len(o.peer_T))
            continue
        rows.append([n, r["peer"], f"{r['err']:.1e}"] + [
            f"{ms(r['times'][T][0])} / {ms(r['times'][T][1])} = "
            f"{r['times'][T][0] / r['times'][T][1]:.2f}" if T in r["times"] else "—"
            for T in o.peer_T])
    return lines + [table(head, rows), ""]


FLAT = 1.25  # decode "flat": the step at the longest context within 25% of the shortest


def targets(o, by, fwd, dense, dec, peers):
    """Each acceptance target with what was measured: met, missed, or not measured."""
    out = []
    sub = [n for n in fwd if not by[n].quadratic]
    full_fit = all(r["fit"] == (FIT_LO, FIT_HI) for n, r in fwd.items() if n in sub)
    bad = [f"{n} {fwd[n]['exp']:.3f}" for n in sub if fwd[n]["exp"] and fwd[n]["exp"] > 1.15]
    part = [f"{n} ({kt(fwd[n]['fit'][0])}–{kt(fwd[n]['fit'][1])})" for n in sub
            if fwd[n]["fit"] and fwd[n]["fit"] != (FIT_LO, FIT_HI)]
    out.append(f"exponent <= 1.15 ({kt(FIT_LO)}–{kt(FIT_HI)}) for every sub-quadratic mixer: "
               + ("MISSED: " + ", ".join(bad) if bad else "met" if full_fit else
                  "met where measured") + ("; fitted on a shorter range: " + ", ".join(part)
                                           if part else ""))
    if dense:  # each mixer at the largest T its dense call was measured at
        sp = {n: d["points"][-1] for n, d in dense.items() if n in sub and d["points"]}
        low = [f"{n} {times_x(td / tt)} (T={T})" for n, (T, td, tt) in sp.items()
               if td / tt < 20]
        out.append(">= 20x dense at T=8192: NOT MEASURED at 8192 (dense calls there take "
                   "minutes to hours each); at the largest T measured: " +
                   ("below 20x: " + ", ".join(low) if low else "every sub-quadratic mixer "
                    f">= 20x (min {times_x(min(td / tt for _, td, tt in sp.values()))})"
                    if sp else "none measured"))
    for n in ("ssd", "retnet", "gla"):
        r = peers.get(n)
        if r and r["times"]:
            worst = max(a / b for a, b in r["times"].values())
            out.append(f"{n} at least as fast as {r['peer']}: "
                       f"{'met' if worst <= 1 else 'MISSED'} (worst ours/peer {worst:.2f})")
        elif r:
            out.append(f"{n} vs fla: not measured ({r['fail'] or 'no T'})")
    r = peers.get("attention")
    if r and r["times"]:
        worst = max(a / b for a, b in r["times"].values())
        out.append(f"attention within 1.5x of SDPA: {'met' if worst <= 1.5 else 'MISSED'} "
                   f"(worst ours/SDPA {worst:.2f})")
    flat, grow = [], []
    for n, per in dec.items():
        have = [v for v in per.values() if v]
        if len(have) < 2:
            continue
        if len({v[1] for v in have}) > 1:
            continue  # a growing state (KV cache): not a fixed-state mixer
        ratio = have[-1][0] / have[0][0]
        (flat if ratio <= FLAT else grow).append(f"{n} {ratio:.2f}")
    if dec:
        out.append(f"decode flat in context for fixed-state mixers (step at the longest context "
                   f"/ shortest <= {FLAT}): " + ("MISSED: " + ", ".join(grow) if grow else
                                                 "met") + (f" ({', '.join(flat)})" if flat else ""))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="T up to 4k, dense at T=256 (~5 min)")
    g.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for the tests)")
    p.add_argument("--mixers", help="comma-separated (default: the standard library)")
    p.add_argument("--T", help="comma-separated sequence lengths")
    p.add_argument("--dense-T", help="comma-separated T for the dense interpreter")
    p.add_argument("--ctx", help="comma-separated decode context lengths")
    p.add_argument("--decode-L", type=int, default=1024,
                   help="kernel length of kernel mixers in the decode section")
    p.add_argument("--max-call", type=float, help="seconds; longer calls end a sweep")
    p.add_argument("--sections", default="forward,dense,decode,peers,classes",
                   help="comma-separated subset of forward,dense,decode,peers,classes")
    p.add_argument("--class-T", help="comma-separated T of the classes section")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--out", help="markdown file to write (default: print only)")
    o = p.parse_args(argv)
    o.mode = "smoke" if o.smoke else "quick" if o.quick else "full"
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    for k, v in MODES[o.mode].items():
        given = getattr(o, k, None)
        setattr(o, k, ints(given) if isinstance(given, str) else given if given else v)
    o.peer_T = o.T
    if o.smoke:
        o.decode_L = 8
    torch.set_num_threads(o.threads or (1 if o.smoke else os.cpu_count()))  # smoke: tiny
    torch.manual_seed(0)
    names = o.mixers.split(",") if o.mixers else mixerc.stdlib_names()
    unknown = sorted(set(names) - set(SIZES))
    if unknown:
        p.error(f"unknown mixers {unknown}; choose from {sorted(SIZES)}")
    sizes = SMOKE_SIZES if o.smoke else SIZES
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    cases = [Case(n, sizes[n]) for n in names]
    sections = set(o.sections.split(","))
    print("1. forward", flush=True)
    fwd, prefills = forward_section(cases, o)  # always: the other sections reuse it
    dense = dense_section(cases, o, fwd) if "dense" in sections else {}
    print("2. decode", flush=True)
    dec = decode_section(cases, o, prefills, fwd) if "decode" in sections else {}
    print("3. peers", flush=True)
    peers = peer_section(cases, o) if "peers" in sections else {}
    print("4. classes", flush=True)
    cls = classes.class_section(o, sizes, measure_pair, ms, kt) if "classes" in sections else {}
    text = report(o, cases, fwd, dense, dec, peers, machine_info(),
                  (load0, os.getloadavg()[0]), time.perf_counter() - start)
    if cls:
        text += "\n" + "\n".join(classes.class_table(o, cls, table, ms, kt))
    print("\n" + text)
    if o.out:
        Path(o.out).write_text(text + "\n")
        print(f"wrote {o.out}")


if __name__ == "__main__":
    main()
