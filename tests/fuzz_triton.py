"""Fuzz the Triton backend against the dense interpreter (the meaning of a program).

    python tests/fuzz_triton.py --seed N --cases M [--classes flash,scalar,...] [--time-limit S]

Random programs of each class the Triton kernels cover: softmax with score
mods and masks (flash), scalar-decay low rank (linear attention, RetNet, SSD,
Hydra's passes), per-channel decay (GLA, Mamba-1), polynomial kernels of
degree <= 2 (Based) and sums of them; random head dims (not powers of 2),
groups on q/k/B/C, row/col gates, strict and non-strict masks, decays from
params and from token inputs (softplus / sigmoid / log), skip terms
(`+ D * x`), normalizers (`(M @ v) / (M @ 1)`), shift/rev. Each case draws T
(1, 2, odd, up to ~200), batch 1-3 and float32/float16, and checks against
dense (float64 on the same rounded values):

  forward            fp32 < 1e-4, fp16 < 2e-2 relative to the output's norm
  gradients          of every input and param, fp32 < 1e-3, fp16 < 3e-2
  state              causal mixers: prefill, a block with initial_state,
                     then decode steps, each against dense on the whole input
  finite             outputs finite where dense is finite
  errors             refusals are MixerErrors, never a bare exception

Outcomes per case: ok, refused (a MixerError), skipped (dense itself is not
finite / ill-conditioned), fail (mismatch or non-MixerError), timeout.
Runs one case at a time in-process (TRITON_INTERPRET=1 when there's no GPU).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import time
import traceback
import warnings

try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
except ImportError:  # pragma: no cover
    pass

import torch

import mixerc
from mixerc.errors import MixerError

f64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CLASSES = ("flash", "scalar", "per_channel", "poly", "sum")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 3e-2}


# ============================================================== programs
HEAD = """mixer fz {{
  dims H, G divides H, D, V, N
  input q : [{qh}, D]
  input k : [{kh}, D]
  input v : [H, V]
  input x : [H, V]
  input u : [H]
  input w : [H]
  input f : [H, D]
  input dt : [H]
  param a : [H]
  param slope : [H]
  param cap : [H]
  param Dp : [H]
  param A2 : [H, D]
{body}
}}
"""

SCORE_MODS = ["S", "S - slope * abs(t - s)", "S - abs(slope) * (t - s)", "cap * tanh(S / cap)",
              "S + row(u)", "S + col(w)", "S * sigmoid(row(u))", "S - 0.1 * (t - s) * (t - s)"]
MASKS = [None, "s <= t", "s < t", "s <= t and t - s < 5", "0 <= t - s < 11", "s <= t or s < 4",
         "s <= t and t < 20 + s", "2 <= t - s < 9"]


class Gen:
    def __init__(self, r: random.Random):
        self.r = r
        self.qh = self.kh = "H"
        self.lets = []

    def lr(self):
        """q @ k^T, with q or k on the groups."""
        r = self.r
        g = r.random()
        if g < 0.25:
            self.kh = "G"
        elif g < 0.35:
            self.qh = "G"
        scale = r.choice(["", " / sqrt(D)", " * 0.5"])
        return r.choice([f"(q @ k^T{scale})", f"(q @ k^T{scale})", "(k @ q^T)"
                         if self.qh == self.kh else f"(q @ k^T{scale})"])

    def scalar_rate(self):
        return self.r.choice(["-softplus(u)", "-softplus(u + a)", "log(sigmoid(u + 2))",
                              "-exp(a)", "-exp(a) * softplus(dt)", "a - 1", "-0.1",
                              "-exp(a - 1) * softplus(dt + a)"])

    def channel_rate(self):
        return self.r.choice(["log(sigmoid(f + 2))", "-softplus(f)", "-exp(A2) * softplus(dt)",
                              "-softplus(f) * 0.5", "-exp(A2)"])

    def mask(self, strict_ok=True):
        return self.r.choice(["(s <= t)", "(s < t)" if strict_ok else "(s <= t)", None,
                              f"(0 <= t - s < {self.r.randint(2, 40)})"])

    def gated(self, m):
        r = self.r
        if r.random() < 0.25:
            m = f"row(sigmoid(u)) * {m}"
        if r.random() < 0.25:
            m = f"{m} * col(sigmoid(w))"
        return m

    def value(self, M):
        """y = M @ v, with a skip term, a normalizer, or values through a function."""
        r = self.r
        c = r.random()
        if c < 0.2:
            return f"({M}) @ v + Dp * x"
        if c < 0.35:
            return f"({M}) @ (softplus(dt) * v)"
        if c < 0.5:
            # |row sums| + 3: random-sign q . k would put the denominator near 0
            return f"(({M}) @ v) / (abs(({M}) @ 1) + 3)"
        return f"({M}) @ v"

    def flash(self):
        r = self.r
        mod = r.choice(SCORE_MODS).replace("S", "(q @ k^T / sqrt(D))")
        if r.random() < 0.3:
            self.kh = "G"
        if r.random() < 0.15:
            self.qh = "G"
        mask = r.choice(MASKS)
        if "col(w)" in mod and self.kh == "G":
            pass  # w is per head
        sm = f"softmax({mod}, mask = {mask})" if mask else f"softmax({mod})"
        body = f"({sm}) @ v"
        if r.random() < 0.2:
            body += " + Dp * x"
        if r.random() < 0.1:
            body = f"shift({body}, {r.randint(1, 3)})"
        return body

    def scalar(self):
        r = self.r
        lr = self.lr()
        kind = r.random()
        if kind < 0.15:  # plain linear attention
            M = f"{lr}"
            m = self.mask()
            M = f"{M} * {m}" if m else f"{M} * (s <= t)"
        elif kind < 0.3:  # hydra-like quasiseparable
            rate = self.scalar_rate()
            fwd = f"shift(decay({rate}) * {lr} * col(softplus(dt)))"
            bwd = "rev(shift(decay(rev(-softplus(w))) * (rev(q) @ rev(k)^T)))"
            self.qh = self.kh = "H"
            return self.value(f"{fwd} + {bwd} + diag(u)")
        else:
            M = f"decay({self.scalar_rate()}) * {lr}"
            m = self.mask()
            if m:
                M += f" * {m}"
        M = self.gated(M)
        if r.random() < 0.1:
            return f"shift(({M}) @ v)"
        return self.value(M)

    def per_channel(self):
        r = self.r
        if r.random() < 0.3:
            self.kh = r.choice(["G", "H"])
            self.qh = r.choice([self.kh, "H"]) if self.kh == "G" else "H"
        M = f"decay({self.channel_rate()}) * (q @ k^T{r.choice(['', ' / sqrt(D)'])})"
        m = self.mask()
        if m:
            M += f" * {m}"
        M = self.gated(M)
        return self.value(M)

    def poly(self):
        """The quadratic form needs `let z = q @ k^T ...` (the planner does not
        identify two spelled-out copies of q @ k^T as one product)."""
        r = self.r
        c = [round(r.uniform(-1, 2), 2) for _ in range(3)]
        if r.random() < 0.2:
            c[0] = 0
        if r.random() < 0.2:
            c[2] = 0
        self.lets.append(f"let z = q @ k^T{r.choice(['', ' / sqrt(D)', ' * 0.5'])}")
        if r.random() < 0.25:
            self.kh = "G"
        terms = [f"{c[0]}"] * (c[0] != 0) + [f"{c[1]} * z"] + [f"{c[2]} * z^2"] * (c[2] != 0)
        if r.random() < 0.4:  # Based: normalized, positive
            terms = ["1", "z", "z^2 / 2"]
        M = f"({' + '.join(terms)})"
        m = self.mask()
        M = f"{M} * {m}" if m else M
        if r.random() < 0.2:
            M = f"decay({self.scalar_rate()}) * {M}" + ("" if m else " * (s <= t)")
        if terms[0] == "1" and r.random() < 0.7:
            return f"(({M}) @ v) / (({M}) @ 1)"
        # no normalizer: random coefficients' row sums cross zero (ill-conditioned)
        return f"({M}) @ v" + r.choice(["", " + Dp * x"])

    def sum(self):
        r = self.r
        parts = r.sample(["scalar", "per_channel", "flash", "poly"], 2)
        if "poly" in parts and "per_channel" in parts:
            parts = ["poly", "scalar"]
        bodies = [getattr(self, p)() for p in parts]
        return " + ".join(f"({b})" for b in bodies)

    def program(self, cls):
        body = getattr(self, cls)()
        if self.qh == "G" and self.kh == "H":
            self.qh = "H"
        lines = self.lets[:1] + [f"out y = {body}"]
        return HEAD.format(qh=self.qh, kh=self.kh, body="".join(f"  {x}\n" for x in lines))


# ============================================================== running
class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout()


def rel(a, b):
    a, b = a.detach().to(f64).cpu(), b.detach().to(f64).cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_args(m, r: random.Random, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    p = m.program
    heads = {"H": r.choice([2, 3, 4]), "D": r.choice([3, 5, 7, 12, 20]),
             "V": r.choice([2, 5, 6, 9, 17]), "N": 3}
    heads["G"] = r.choice([d for d in (1, 2, 3, 4) if heads["H"] % d == 0])
    args = {}
    for name, dims in p.inputs.items():
        args[name] = torch.randn(B, T, *(heads[d] for d in dims), generator=g, dtype=f64)
        if name in ("q", "k"):
            args[name] *= 0.6
    for name, dims in p.params.items():
        args[name] = torch.randn(*(heads[d] for d in dims), generator=g, dtype=f64) * 0.5
    if "a" in args:  # a log-rate (`a - 1`): growth (a > 1) overflows float32, not a decay
        args["a"] = -args["a"].abs()
    if "cap" in args:
        args["cap"] = args["cap"].abs() * 3 + 1
    if "slope" in args:
        args["slope"] = args["slope"].abs()
    return args, heads


def outs(y):
    return y if isinstance(y, tuple) else (y,)


def check_case(src: str, r: random.Random, seed: int, log, grads=True, states=True):
    """Raises AssertionError on a mismatch; returns an outcome string."""
    try:
        dense = mixerc.compile(src, backend="dense")
    except MixerError:
        return "refused-check"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tri = mixerc.compile(src, backend="triton")
            tri.explain()
    except MixerError:
        return "refused"
    fallback = any("dense interpreter" in str(w.message) for w in caught)
    B = r.randint(1, 3)
    T = r.choice([1, 2, 3, 5, 17, 31, 33, 63, 65, 77, 100, 129, 150, 200])
    dtype = r.choice([torch.float32, torch.float32, torch.float16])
    args, sizes = make_args(dense, r, B, T, seed)
    tokens = set(dense.program.inputs)
    rounded = {n: x.to(dtype if n in tokens else torch.float32).to(f64) for n, x in args.items()}
    try:
        want = outs(dense(**rounded))
    except MixerError:
        return "skipped"
    if any(not torch.isfinite(w).all() or w.abs().max() > 1e4 for w in want):
        return "skipped"
    dev = {n: x.to(device=DEVICE, dtype=dtype if n in tokens else torch.float32)
           for n, x in args.items()}
    log(f"  B={B} T={T} dtype={dtype} sizes={sizes}")
    try:
        got = outs(tri(**dev))
    except MixerError:
        return "refused-call"
    tol = TOL[dtype]
    for gg, w in zip(got, want):
        assert gg.dtype == dtype, f"output dtype {gg.dtype} != {dtype}"
        assert torch.isfinite(gg).all(), "non-finite output where dense is finite"
        e = rel(gg, w)
        assert e < tol, f"forward rel err {e:.3g} (tol {tol})"

    if grads and T <= (129 if dtype == torch.float32 else 65):
        leaves = {n: x.clone().requires_grad_(True) for n, x in dev.items()}
        dl = {n: x.clone().requires_grad_(True) for n, x in rounded.items()}
        try:
            yt = outs(tri(**leaves))
        except MixerError:
            return "refused-grad"
        yd = outs(dense(**dl))
        g = torch.Generator().manual_seed(seed + 1)
        cot = [torch.randn(w.shape, generator=g, dtype=f64) for w in yd]
        torch.autograd.backward([y.float() for y in yt], [c.float() for c in cot])
        torch.autograd.backward(list(yd), cot)
        for n in leaves:
            gt, gd = leaves[n].grad, dl[n].grad
            if gd is None or gd.norm() == 0:
                continue
            assert gt is not None, f"no gradient for {n}"
            assert torch.isfinite(gt).all(), f"non-finite gradient of {n}"
            # a gradient that is 0 in exact arithmetic (softmax's invariance to
            # row(u)) is rounding noise: measured against a floor
            floor = GRAD_TOL[dtype] * gd.numel() ** 0.5  # O(1) gradients: unit cotangents
            e = float((gt.double().cpu() - gd).norm() / max(float(gd.norm()), floor))
            assert e < GRAD_TOL[dtype], f"gradient of {n}: rel err {e:.3g}"

    if states and dense.causal and tri.causal:  # decode from the first token on
        step = lambda t: {n: (x[:, t] if n in tokens else x) for n, x in dev.items()}  # noqa
        st = None
        for t in range(min(T, 3)):
            try:
                yt, st = tri.step(st, **step(t))
            except MixerError:
                return "refused-state"
            for gg, w in zip(outs(yt), want):
                assert torch.isfinite(gg).all(), f"non-finite step {t} from no state"
                err = rel(gg, w[:, t]) if w[:, t].norm() > 1e-3 else float((gg.cpu() - w[:, t]).norm())
                assert err < tol * 3, f"step {t} from no state: rel err {err:.3g}"

    if states and dense.causal and T >= 3 and tri.causal:
        t1 = r.randint(1, T - 2)
        t2 = r.randint(t1 + 1, min(T - 1, t1 + 40))
        block = lambda a, b: {n: (x[:, a:b] if n in tokens else x) for n, x in dev.items()}  # noqa
        step = lambda t: {n: (x[:, t] if n in tokens else x) for n, x in dev.items()}  # noqa
        try:
            y0, st = tri(**block(0, t1), return_state=True)
            y1, st = tri(**block(t1, t2), initial_state=st, return_state=True)
            ys = [outs(y0), outs(y1)]
            for t in range(t2, min(T, t2 + 6)):
                yt, st = tri.step(st, **step(t))
                ys.append(tuple(y[:, None] for y in outs(yt)))
            end = min(T, t2 + 6)
            if end < T:  # a block after decode steps (a cache appended in place)
                y2, st = tri(**block(end, T), initial_state=st, return_state=True)
                ys.append(outs(y2))
        except MixerError:
            return "refused-state"
        for i, w in enumerate(want):
            gcat = torch.cat([y[i] for y in ys], 1)
            scale = w.norm() / (w.numel() ** 0.5)
            for lo, hi, what in ((0, t1, "prefill"), (t1, t2, "continued block"),
                                 (t2, end, "decode steps"), (end, T, "block after steps")):
                a, b = gcat[:, lo:hi], w[:, lo:hi]
                assert torch.isfinite(a).all(), f"non-finite {what}"
                err = float((a.double().cpu() - b).norm() / (b.norm() + scale * 1e-3))
                assert err < tol * 3, f"{what} [{lo}:{hi}] rel err {err:.3g}"
    if states and dense.causal and tri.causal and B >= 2 and T >= 4:
        # sequences of different lengths in one batch: separate prefills, then
        # one state (stack_states) and steps, each sequence at its own time
        lens = [r.randint(1, T - 3) for _ in range(B)]
        one = lambda b, lo, hi: {n: (x[b:b + 1, lo:hi] if n in tokens else x)  # noqa: E731
                                 for n, x in dev.items()}
        try:
            st = tri.stack_states([tri(**one(b, 0, lens[b]), return_state=True)[1]
                                   for b in range(B)])
            for j in range(2):
                tok = {n: (torch.stack([x[b, lens[b] + j] for b in range(B)]) if n in tokens
                           else x) for n, x in dev.items()}
                yt, st = tri.step(st, **tok)
                for gg, w in zip(outs(yt), want):
                    wt = torch.stack([w[b, lens[b] + j] for b in range(B)])
                    assert torch.isfinite(gg).all(), "non-finite step after stack_states"
                    err = float((gg.double().cpu() - wt).norm() / (wt.norm() + 1e-3))
                    assert err < tol * 3, f"step {j} after stack_states {lens}: rel err {err:.3g}"
        except MixerError:
            return "refused-stack"

    if T >= 4 and B == 1:  # packed sequences (cu_seqlens): each on its own
        cut = r.randint(1, T - 1)
        try:
            got = outs(tri(**dev, cu_seqlens=torch.tensor([0, cut, T])))
        except MixerError:
            return "refused-varlen"
        for lo, hi in ((0, cut), (cut, T)):
            part = {n: (x[:, lo:hi] if n in tokens else x) for n, x in rounded.items()}
            for gg, w in zip(got, outs(dense(**part))):
                err = float((gg[:, lo:hi].double().cpu() - w).norm() / (w.norm() + 1e-3))
                assert err < tol * 3, f"cu_seqlens piece [{lo}:{hi}]: rel err {err:.3g}"
    return "ok-dense-term" if fallback else "ok"


def run(seed: int, cases: int, classes=CLASSES, time_limit=120, verbose=False, grads=True,
        states=True, only=None):
    counts = collections.Counter()
    fails = []
    for i in (range(cases) if only is None else [only]):
        cls = classes[i % len(classes)]
        r = random.Random(f"{seed}-{i}")
        src = Gen(r).program(cls)
        lines = []
        log = lines.append
        t0 = time.time()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(time_limit)
        try:
            out = check_case(src, r, seed * 1000 + i, log, grads, states)
        except Timeout:
            out = "timeout"
        except AssertionError as e:
            out = "fail"
            fails.append((seed, i, cls, src, lines, str(e)))
        except MixerError as e:  # a refusal on a path the checks above did not guard
            out = "refused-late"
            lines.append(f"  {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001
            if "Timeout()" in str(e):  # the alarm went off inside Triton's interpreter
                counts[cls, "timeout"] += 1
                print(f"[{seed}:{i}] {cls} timeout", flush=True)
                continue
            out = "fail"
            fails.append((seed, i, cls, src, lines,
                          f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"))
        finally:
            signal.alarm(0)
        counts[cls, out] += 1
        if verbose or out in ("fail", "timeout"):
            print(f"[{seed}:{i}] {cls} {out} {time.time() - t0:.1f}s", flush=True)
            if out == "fail":
                print(src + "\n".join(lines) + "\n  => " + fails[-1][-1], flush=True)
    return counts, fails


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--classes", default=",".join(CLASSES),
                    help=f"comma-separated, of {', '.join(CLASSES)} (Hydra-like "
                         "quasiseparable programs are in sum)")
    ap.add_argument("--time-limit", type=int, default=120)
    ap.add_argument("--no-grads", action="store_true")
    ap.add_argument("--no-states", action="store_true")
    ap.add_argument("--only", type=int, help="run case number ONLY of the seed (a repro)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.classes.split(",")) - set(CLASSES))
    if unknown:
        ap.error(f"unknown class(es) {', '.join(unknown)}; the classes: {', '.join(CLASSES)}")
    torch.set_num_threads(1)
    counts, fails = run(a.seed, a.cases, tuple(a.classes.split(",")), a.time_limit,
                        a.verbose, not a.no_grads, not a.no_states, a.only)
    for (cls, out), n in sorted(counts.items()):
        print(f"{cls:12s} {out:14s} {n}")
    print(f"{len(fails)} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
