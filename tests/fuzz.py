"""Fuzz campaign for mixerc (issue 8): every input ends in a result or a MixerError.

    python -m tests.fuzz --cases 20000 [--seed S] [--jobs N] [--time-limit 5] [--out DIR]

Cases come from four generators (deterministic for a seed and a case number):
mutated examples/*.mx, token soups, random well-typed programs built by kind
(plus deep chains), and fixed hostile programs from issue 8. Each case runs
through load, check, explain, plan, torch codegen, dense and torch forward at
tiny sizes, a comparison, and prefill + decode steps for causal mixers.
Outcomes: ok, mixer_error, exception (anything not a MixerError, or a
MixerError without a source position from the checker), timeout, mismatch
(torch differs from dense on a well-conditioned case). Cases run in worker
processes, one at a time, killed past the time limit, under a memory cap.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.mx"))
STAGES = ("load", "check", "explain", "plan", "codegen", "inputs", "dense", "torch", "compare",
          "decode")
OUTCOMES = ("ok", "mixer_error", "exception", "timeout", "mismatch")

# ============================================================== generators
TOKENS = ["mixer", "dims", "divides", "input", "param", "kernel", "const", "let", "out", "and",
          "or", "not", "{", "}", "(", ")", "[", "]", ",", ":", "=", "+", "-", "*", "/", "^",
          "@", "^T", "<", "<=", ">", ">=", "==", "!=", "#", "\n", "x", "q", "k", "v", "H", "D",
          "G", "t", "s", "T", "M", "0", "1", "2", "1.5", "64", "-3", "exp", "log", "sqrt",
          "softplus", "sigmoid", "decay", "softmax", "mask", "shift", "rev", "conv", "toeplitz",
          "tril", "triu", "row", "col", "diag", "sum", "uniform", "normal", "k="]
ODD_CHARS = ["\x00", "\ufeff", "\u00e9", "\ud800", "\r", "\x0b", "\u2028", "\U0001f4a5", "\x7f",
             "\\", "$", "`", '"""', "'", "\t", "\x1b", "\u0130"]
HUGE_NUMBERS = ["1e400", "9" * 5000, "1e-400", "1e308", "2^1024", "0", "0.0", "1e12",
                "123456789012345678901234567890", "4294967296"]
HOSTILE_NAMES = ["v0", "v1", "lambda", "None", "def", "state", "sizes", "cfg", "batch", "time",
                 "DTYPE", "torch", "F", "math", "self", "inf", "nan", "True", "print", "_",
                 "__class__", "y0", "out0", "x_1"]
LEXEME = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\^T|<=|>=|==|!=|\S")


def mutated_example(r: random.Random) -> str:
    src = EXAMPLES[r.randrange(len(EXAMPLES))].read_text()
    if r.random() < 0.5:  # edits then land in the code, not in the header comment
        src = re.sub(r"#[^\n]*", "", src)
    for _ in range(r.randint(1, 3)):
        toks = [m.span() for m in LEXEME.finditer(src)] or [(0, 0)]
        i = r.randrange(len(toks))
        (a, b), end = toks[i], toks[min(len(toks) - 1, i + r.randint(0, 2))][1]
        p, n = r.randrange(len(src) + 1), r.choice([50, 300, 1000, 3000])
        lines = src.split("\n")
        j, k = r.randrange(len(lines)), r.randrange(len(lines))
        old = r.choice(re.findall(r"\b[A-Za-z_]\w*\b", src) or ["x"])
        src = r.choice([
            lambda: src[:a] + r.choice(TOKENS) + " " + src[a:],       # insert a token
            lambda: src[:a] + src[end:],                               # delete 1-3 tokens
            lambda: src[:a] + r.choice(TOKENS) + src[b:],              # replace a token
            lambda: src[:p] + r.choice(ODD_CHARS) + src[p:],           # an odd character
            lambda: src[:a] + r.choice(HUGE_NUMBERS) + src[b:],        # a hostile number
            lambda: src[:a] + "(" * n + src[a:b] + ")" * n + src[b:],  # deep nesting
            lambda: src[:a] + "-" * n + src[a:],
            lambda: src[:a] + "exp(" * n + src[a:b] + ")" * n + src[b:],
            # a name renamed everywhere, often to one the generated Python holds dear
            lambda: re.sub(rf"\b{old}\b", r.choice(HOSTILE_NAMES + ["t", "s", "exp"]), src),
            lambda: "\n".join(lines[:j] + lines[j + 1:]),             # drop a line
            lambda: "\n".join(lines[:j] + [lines[k]] + lines[j:]),     # duplicate a line
            lambda: src[:p],                                           # cut the file short
        ])()
    return src


def token_soup(r: random.Random) -> str:
    body = " ".join(r.choice(TOKENS + ODD_CHARS[:3] + HUGE_NUMBERS[:2])
                    for _ in range(r.randint(1, 60)))
    if r.random() < 0.6:
        return "mixer f {\n  dims H, D\n  input x : [H]\n  " + body + "\n}\n"
    return body


class Program:
    """A random program built by kind (token / static / matrix / predicate) from
    a random header, so that most of them type-check."""

    def __init__(self, r: random.Random):
        self.r = r
        self.group, self.n_dim = r.random() < 0.4, r.random() < 0.35
        self.scalar_param, self.scalar_input = r.random() < 0.5, r.random() < 0.2
        self.kernel, self.const = r.random() < 0.25, r.random() < 0.3
        dims = [r.choice(["H", "H", "H = 2", "H = 4"]), r.choice(["D", "D", "D = 3", "D = 1"])]
        dims += ["G divides H"] * self.group + ["N"] * self.n_dim + ["U"] * (r.random() < 0.04)
        r.shuffle(dims)
        lines = ["dims " + ", ".join(dims), "input x : [H]", "input z : [H]", "input q : [H, D]",
                 "input k : [H, D]", "input v : [H, D]"]
        lines += ["input kg : [G, D]", "input xg : [G]"] * self.group
        lines += ["input bn : [H, N]", "param A2 : [H, N]"] * self.n_dim
        lines += ["input c : []"] * self.scalar_input + ["kernel h : [H]"] * self.kernel
        lines += ["param a : [H]" + r.choice(["", " = 1", " = normal(0, 1)"]), "param w : [H, 3]"]
        lines += ["param b : []" + r.choice(["", " = 0.5"])] * self.scalar_param
        lines += [r.choice(["const c0 = 1 / sqrt(D)", "const c0 = 2 * D + 1"])] * self.const
        self.lets_m, self.lets_t = [], []
        for i in range(r.randint(0, 2)):
            lines.append(f"let M{i} = {self.matrix(2)}")
            self.lets_m.append(f"M{i}")
        if r.random() < 0.4:
            lines.append(f"let u0 = {self.token(2)}")
            self.lets_t.append("u0")
        for i in range(r.randint(1, 3)):
            body = self.token(3) if i else f"({self.matrix(3)}) @ {self.token(1)}"
            lines.append(f"out y{i} = {body}")
        self.lines = lines

    def source(self, name="f") -> str:
        return f"mixer {name} {{\n" + "".join(f"  {x}\n" for x in self.lines) + "}\n"

    def static(self) -> str:
        pool = ["2", "0.5", "1", "3", "1e-3", "sqrt(D)", "D", "a", "exp(a)", "-a", "softplus(a)"]
        return self.r.choice(pool + ["b", "exp(-b)"] * self.scalar_param + ["c0"] * self.const)

    def fill(self, form: str, d: int, wide=False) -> str:
        """form with each {slot} replaced by a fresh random value of that kind."""
        r = self.r
        slots = {"m": lambda: self.matrix(d - 1), "t": lambda: self.token(d - 1),
                 "u": lambda: self.token(d - 1, wide), "w": lambda: self.token(d - 1, True),
                 "c": self.static, "p": self.predicate, "k": lambda: str(r.randint(-2, 3)),
                 "n": lambda: str(r.randint(2, 4)), "op": lambda: r.choice("*+-"),
                 "lr": lambda: r.choice(["(q @ k^T)", "(q @ k^T / sqrt(D))"]
                                        + ["(q @ kg^T)"] * self.group),
                 "f": lambda: r.choice(["exp", "sigmoid", "silu", "tanh", "softplus", "relu",
                                        "elu", "abs", "logsigmoid", "shift", "rev", "sqrt", "log"]),
                 "mf": lambda: r.choice(["shift", "rev", "tril", "triu", "exp", "tanh"]),
                 "lift": lambda: r.choice(["row", "col", "diag"])}
        return re.sub(r"\{(\w+)\}", lambda m: slots[m.group(1)](), form)

    def token(self, d: int, wide: bool = False) -> str:
        """A token tensor with dims [H] (or [G]), or [H, D] when wide."""
        r = self.r
        if d <= 0 or r.random() < 0.3:
            pool = ["q", "k", "v", "silu(q)", "(x * v)"] if wide else \
                ["x", "z", "sum(q, D)", "sum(q * k, D)"] + self.lets_t
            pool += (["kg"] if wide else ["xg", "sum(kg, D)"]) * self.group
            return r.choice(pool + ["(x + c)"] * self.scalar_input)
        form = r.choice(["({u} {op} {u})", "({u} / {c})", "({u} * {c})", "{f}({u})",
                         "shift({u}, {k})", "conv({t}, w)", "(({m}) @ 1)", "(({m}) @ {u})",
                         "(({m}) @ {u})", "(({m}) @ {w})"])
        return self.fill(form, d, wide)

    def predicate(self) -> str:
        r = self.r
        lhs = r.choice(["t", "s", "t - s", "s - t", "t + 1", "2 * t", "t - 2 * s"])
        cmp = f"{lhs} {r.choice(['<', '<=', '>', '>=', '==', '!='])} " \
              f"{r.choice(['s', 't', str(r.randint(-3, 5))])}"
        return r.choice([cmp, "s <= t", "s < t", "t - s < 3", "0 <= t - s < 4",
                         f"{cmp} and s <= t", f"not ({cmp})", f"{cmp} or t == s"])

    def structured(self) -> str:
        """The classes the planner has fast strategies for, and sums of them."""
        r = self.r
        lr = r.choice(["(q @ k^T)", "(k @ q^T / sqrt(D))"] + ["(q @ kg^T)"] * self.group)
        dec = r.choice(["decay(-softplus(x))", "decay(a - 1)", "decay(-exp(a))"]
                       + ["decay(-softplus(xg))"] * self.group)
        mask = r.choice(["(s <= t)", "(s < t)", "(t - s < 3)", "(s <= t and t - s < 4)"])
        semi = f"{dec} * {lr}"
        quasi = f"shift({semi}) + rev(shift(decay(-softplus(rev(z))) * (rev(q) @ rev(k)^T))) " \
                "+ diag(z)"
        return "(" + r.choice([f"{lr} * {mask}", semi, quasi, f"{semi} * {mask}",
                               f"{semi} + {dec} * (v @ k^T)"]) + ")"

    def matrix(self, d: int) -> str:
        """A sequence matrix with dims [], [H] (or [G]) or [H, D] (per-channel)."""
        r = self.r
        if d <= 0 or r.random() < 0.25:
            if r.random() < 0.4:
                return self.structured()
            pool = ["(q @ k^T)", "(q @ v^T / sqrt(D))", "decay(-softplus(x))", "decay(a - 1)",
                    "decay(-exp(q))", "decay(-1)", "diag(x)", "row(z)", "col(x)",
                    f"({self.predicate()})", "(x @ z^T)"] + self.lets_m
            pool += ["(q @ kg^T)", "decay(-softplus(xg))"] * self.group
            pool += ["(bn @ bn^T)", "sum(decay(-exp(A2)) * A2, N)"] * self.n_dim
            pool += ["toeplitz(h)"] * self.kernel + ["decay(-softplus(b))"] * self.scalar_param
            return r.choice(pool)
        form = r.choice([
            "({m} {op} {m})", "({m} * ({p}))", "({m} / {c})", "softmax({m}, mask = {p})",
            "softmax({m})", "{mf}({m})", "tril({m}, k={k})", "triu({m}, {k})", "shift({m}, {k})",
            "({m})^T", "({m})^{n}", "(1 + {lr} + {lr}^2 / 2)", "(1 + {lr})^{n}",
            "(decay(-softplus({t})) * {lr})", "(decay(-exp(k)) * {lr})", "{lift}({t})",
            "({m} * row(sigmoid(x)))", "sum(decay(-exp(q)) * decay(-exp(k)), D)"])
        return self.fill(form, d)


def well_typed(r: random.Random) -> str:
    src = Program(r).source()
    if r.random() < 0.12:  # names the generated Python must not confuse with its own
        old = r.choice(["x", "z", "q", "k", "v", "a", "w", "H", "D", "y0", "f"])
        src = re.sub(rf"\b{old}\b", r.choice(HOSTILE_NAMES), src)
    return src


def deep_chain(r: random.Random) -> str:
    n = r.choice([100, 400, 500, 1000, 2000])
    body = r.choice([" + ".join(["x"] * n), "-" * n + "x", " * ".join(["x"] * n),
                     r.choice(["exp(", "shift(", "relu(", "rev("]) * n + "x" + ")" * n,
                     "(" * n + "x" + ")" * n, "(" + " * ".join(["(q @ k^T)"] * n) + ") @ x",
                     "(" + " + ".join(["(q @ k^T)", "decay(-1)", "diag(x)"] * (n // 3)) + ") @ x"])
    lets = [f"let l{i} = l{i - 1} + x" if i else "let l0 = x" for i in range(n // 4)]
    header = Program(r).lines[:12]
    lines = [x for x in header if not x.startswith(("let", "out"))]
    lines += lets if r.random() < 0.2 else []
    lines.append(f"out y = {body}")
    return "mixer deep {\n" + "".join(f"  {x}\n" for x in lines) + "}\n"


def _hostile() -> list:
    head = "mixer f {\n  dims H, D\n  input x : [H]\n  input q : [H, D]\n  input k : [H, D]\n"
    outs = ["y = " + "-" * 1000 + "x", "y = " + " + ".join(["x"] * 1000),
            "y = " + "relu(" * 500 + "x" + ")" * 500,
            "y = (" + " * ".join(["(q @ k^T)"] * 400) + ") @ x", "y = x * " + "9" * 5000,
            "y = shift(x, 1e400)", "y = tril(q @ k^T, k=1e400) @ x",
            "y = softmax(q @ k^T, mask = t - s < 1e400) @ x", "y = (q @ k^T)^1e400 @ x",
            "y = x * 1e400", "y = x * 2^1024", "y = (diag(x) / 0) @ x",
            "y = (decay(-1) * (2 > 1)) @ x", "y = (decay(-softplus(x)) / (0 < a)) @ x",
            "y = ((t - s < 1e12) * (q @ k^T)) @ x", "y = ((1 + q @ k^T)^16) @ x",
            "y = ((q @ k^T)^100000) @ x", "y = ((1 + q @ k^T / 2)^100000 * (s <= t)) @ x",
            "y = ((q @ k^T)^1e300 * (s <= t)) @ x"]
    progs = [head + "  param a : [H]\n  out " + o + "\n}\n" for o in outs]
    progs += ["mixer f {\n  dims H, U\n  input x : [H]\n  out y = exp(x)\n}\n",
              "mixer f {\n  dims H\n  param a : [H]\n  out y = (s <= t) @ a\n}\n",
              "mixer f {\n  dims H\n  input v0 : [H]\n  input v1 : [H]\n  out a = exp(v0)\n"
              "  out b = v1\n}\n",
              "mixer f {  # \\xi C:\\Users\n  dims H\n  input x : [H]\n  out y = x\n}\n",
              "a" * 5000]
    return progs + [f"mixer f {{\n  dims H, {d}\n  input {n} : [H, {d}]\n  out y = exp({n})\n}}\n"
                    for n, d in [("lambda", "D"), ("None", "D"), ("state", "F"),
                                 ("sizes", "math"), ("torch", "D"), ("cfg", "DTYPE")]]


HOSTILE = _hostile()
GENERATORS = {"mutation": mutated_example, "soup": token_soup, "well_typed": well_typed,
              "deep": deep_chain}
WEIGHTS = {"mutation": 35, "soup": 12, "well_typed": 50, "deep": 3}


def make_case(seed: int, i: int) -> dict:
    """Case i of a campaign: the hostile programs first, then random ones."""
    if i < len(HOSTILE):
        return {"id": i, "gen": "hostile", "source": HOSTILE[i]}
    r = random.Random(f"{seed}:{i}")
    gen = r.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    return {"id": i, "gen": gen, "source": GENERATORS[gen](r)}


# ============================================================== one case (in a worker)
class Mismatch(Exception):
    """torch and dense disagree on a well-conditioned case; kind (count, shape,
    values, causal) goes into the dedup key."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _project_frame(frames) -> str:
    """The innermost frame in mixerc's own code (or a generated module): the
    dedup key of a failure. frames: (filename, function) pairs, outermost first."""
    for filename, func in reversed(list(frames)):
        if re.search(r"mixer_[0-9a-f]+\.py$", filename):
            return f"<generated>:{func}"
        path = Path(filename).resolve()
        if path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / "tests"):
            return f"{path.relative_to(ROOT)}:{func}"
    return "<outside mixerc>"


def _sizes(program, r: random.Random) -> dict:
    sizes = {d.name: d.size for d in program.dims.values() if d.size is not None}
    for d in program.dims.values():
        if d.divides:
            if d.divides in sizes and d.name not in sizes:
                sizes[d.name] = r.choice([g for g in range(1, 5) if sizes[d.divides] % g == 0])
            sizes.setdefault(d.name, r.randint(1, 2))
            sizes.setdefault(d.divides, sizes[d.name] * r.randint(1, 2))
    for d in program.dims.values():
        sizes.setdefault(d.name, r.randint(1, 4))
    return sizes


def _inputs(program, sizes, batch, T, seed) -> dict:
    import torch
    from mixerc.inputs import decay_leaves

    g, negative = torch.Generator().manual_seed(seed), decay_leaves(program)
    kernel_len = seed % 4 + 1

    def sample(name, shape, scale=1.0):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        return -torch.sigmoid(x) * 0.5 - 0.01 if name in negative else x * scale
    out = {n: sample(n, (batch, T) + tuple(sizes[d] for d in dims))
           for n, dims in program.inputs.items()}
    out |= {n: sample(n, tuple(sizes[d] for d in dims), 0.5) for n, dims in program.params.items()}
    out |= {n: sample(n, (kernel_len,) + tuple(sizes[d] for d in dims), 0.5)
            for n, dims in program.kernels.items()}
    return out


def _compare(got, want, what: str):
    import torch
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want):
        raise Mismatch("count", f"{what}: {len(got)} outputs, dense has {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise Mismatch("shape", f"{what}: output {i} has shape {tuple(g.shape)}, dense "
                           f"{tuple(w.shape)}")
        if w.numel() == 0:
            continue
        err = float((g.double() - w).abs().max()) / max(1.0, float(w.abs().max()))
        if not (torch.isfinite(g).all() and err <= 1e-8):
            raise Mismatch("values", f"{what}: output {i} differs from dense by {err:.3g} "
                           "(relative)")


def run_case(case: dict, progress=lambda stage: None) -> dict:
    """Run one case through every stage; the record says how it ended."""
    import torch

    from mixerc import plan as planner
    from mixerc.api import CompiledMixer, load_source
    from mixerc.checker import check_source
    from mixerc.errors import MixerError

    rec = {"outcome": "ok", "stage": None, "etype": "", "message": "", "frame": "", "tb": ""}

    def at(stage):
        rec["stage"] = stage
        progress(stage)

    try:
        time.sleep(case.get("sleep", 0))  # a test's stand-in for a hang
        at("load")
        text, file = load_source(case["source"])
        at("check")
        program = check_source(text, "fuzz.mx")
        at("explain")
        dense = CompiledMixer(program, "dense")
        dense.explain()
        at("plan")
        planner.describe(planner.plan(program, dense.analysis))
        at("codegen")
        fast = CompiledMixer(program, "torch")
        at("inputs")  # the harness's own step: a failure here is a fuzz bug
        r = random.Random(case["id"])
        sizes, batch = _sizes(program, r), r.randint(1, 2)
        T = r.randint(1, 9) if r.random() > 0.05 else 0  # T = 0 rarely: it hides the rest
        args = _inputs(program, sizes, batch, T, case["id"])
        at("dense")
        want = dense(**args)
        outs = want if isinstance(want, tuple) else (want,)
        if any(not torch.isfinite(w).all() or (w.numel() and w.abs().max() > 1e6) for w in outs):
            at("torch")  # ill-conditioned: nothing to compare, but it must still run
            fast(**args)
            return rec
        at("torch")
        got = fast(**args)
        at("compare")
        _compare(got, want, "forward")
        if dense.causal != fast.causal:
            raise Mismatch("causal", f"dense says causal={dense.causal}, torch {fast.causal}")
        if dense.causal and T >= 2:
            at("decode")
            t0 = r.randint(1, T - 1)
            head = {n: (x[:, :t0] if n in program.inputs else x) for n, x in args.items()}
            y, state = fast(**head, return_state=True)
            _compare(y, tuple(w[:, :t0] for w in outs), "prefill")
            for t in range(t0, T):
                tok = {n: (x[:, t] if n in program.inputs else x) for n, x in args.items()}
                y, state = fast.step(state, **tok)
                _compare(y, tuple(w[:, t] for w in outs), f"step {t}")
    except MixerError as e:
        rec.update(outcome="mixer_error", etype=type(e).__name__, message=str(e)[:300])
        try:
            e.render()
            if rec["stage"] == "check" and (e.loc is None or min(e.loc.line, e.loc.col) < 1):
                rec.update(_exception(e), etype=f"{type(e).__name__} (no source position)")
        except Exception as inner:  # noqa: BLE001 - a diagnostic that cannot render
            rec.update(_exception(inner))
    except Mismatch as e:
        strategies = sorted({x for m in fast.plan.matrices for x in m.strategies})
        rec.update(outcome="mismatch", etype="mismatch", message=str(e),
                   frame=f"{e.kind} with {', '.join(strategies) or 'no matrix'}")
    except Exception as e:  # noqa: BLE001 - that is what we look for
        rec.update(_exception(e))
    return rec


def _exception(e: BaseException) -> dict:
    frame = _project_frame((f.filename, f.name) for f in traceback.extract_tb(e.__traceback__))
    if frame.startswith("<"):  # generated code or not ours: the message tells bugs apart
        first = str(e).split("\n")[0]
        frame += " | " + re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'_'", first))[:50]
    return {"outcome": "exception", "etype": type(e).__name__, "message": str(e)[:300],
            "frame": frame, "tb": "".join(traceback.format_exception(e))[-4000:]}


def _worker(conn, home: str, time_limit: float, memory_gb: float):
    """Runs cases sent over conn, one at a time, reporting each stage it enters."""
    import faulthandler
    import resource
    import warnings

    os.environ["MIXERC_CACHE_DIR"] = os.path.join(home, "cache")
    os.makedirs(os.path.join(home, "cwd"))
    os.chdir(os.path.join(home, "cwd"))  # text without '{' is read as a path: find nothing
    limit = int(memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a huge allocation fails, here
    warnings.simplefilter("ignore")  # MixerPerformanceWarning and friends are fine
    import torch
    torch.set_num_threads(1)
    import mixerc.codegen.torch.module  # noqa: F401 - import once, not in the first case's time
    with open(os.path.join(home, "hang.txt"), "w+") as dump:
        conn.send(("ready",))
        while (case := conn.recv()) is not None:
            dump.seek(0)
            dump.truncate()
            faulthandler.dump_traceback_later(time_limit * 0.9, file=dump)  # a hang's stack
            rec = run_case(case, lambda stage: conn.send(("stage", stage)))
            faulthandler.cancel_dump_traceback_later()
            # the next case starts from an empty JIT cache: outcomes never depend on order
            shutil.rmtree(os.environ["MIXERC_CACHE_DIR"], ignore_errors=True)
            for name in [m for m in sys.modules if m.startswith("mixerc_generated_")]:
                del sys.modules[name]
            conn.send(("done", rec))


# ============================================================== campaign (parent)
class _Slot:
    """One worker process and the case it is running."""

    def __init__(self, ctx, root: str, time_limit: float, memory_gb: float):
        self.home = tempfile.mkdtemp(dir=root)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.home, time_limit, memory_gb),
                                daemon=True)
        self.proc.start()
        child.close()
        self.ready, self.case, self.stage, self.started, self.done = False, None, None, 0.0, 0

    def stop(self, kill=False):
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(10)
        self.conn.close()


def _timeout_record(slot: _Slot, time_limit: float) -> dict:
    try:
        stack = Path(slot.home, "hang.txt").read_text()
    except OSError:
        stack = ""
    frames = re.findall(r'File "(.*)", line \d+ in (\S+)', stack)[::-1]  # outermost first
    return {"outcome": "timeout", "stage": slot.stage, "etype": "timeout",
            "message": f"over {time_limit:g} s", "frame": _project_frame(frames), "tb": stack}


def campaign(cases, jobs: int = 2, time_limit: float = 5.0, memory_gb: float = 4.0,
             on_result=None) -> list:
    """Run the cases (an iterable of make_case dicts); one record per case."""
    ctx = mp.get_context("spawn")
    todo, results = iter(cases), []
    upcoming = next(todo, None)
    with tempfile.TemporaryDirectory(prefix="mixerc-fuzz-") as root:
        slots = [_Slot(ctx, root, time_limit, memory_gb) for _ in range(jobs)]

        def finish(i, slot, rec):
            rec.update(id=slot.case["id"], gen=slot.case["gen"], source=slot.case["source"],
                       seconds=round(time.monotonic() - slot.started, 3))
            results.append(rec)
            if on_result:
                on_result(rec)
            slot.case, slot.done = None, slot.done + 1
            dead = rec["outcome"] == "timeout" or not slot.proc.is_alive()
            if dead or slot.done >= 1000:  # a fresh worker now and then: memory stays bounded
                slot.stop(kill=dead)
                slots[i] = _Slot(ctx, root, time_limit, memory_gb)

        while upcoming is not None or any(s.case for s in slots):
            for s in slots:
                if s.ready and s.case is None and upcoming is not None:
                    s.case, s.stage, upcoming = upcoming, None, next(todo, None)
                    s.conn.send(s.case)
                    s.started = time.monotonic()
            readable = wait([s.conn for s in slots], timeout=0.1)
            for i, s in enumerate(list(slots)):
                if s.conn in readable:
                    try:
                        msg = s.conn.recv()
                    except (EOFError, OSError):  # the worker died: a crash is a finding
                        if s.case is None:
                            raise RuntimeError("a fuzz worker died before its first case")
                        s.proc.join(10)
                        finish(i, s, {"outcome": "exception", "stage": s.stage,
                                      "etype": f"worker died (exit {s.proc.exitcode})",
                                      "message": "", "frame": "", "tb": ""})
                        continue
                    if msg[0] == "ready":
                        s.ready = True
                    elif msg[0] == "stage":
                        s.stage = msg[1]
                    else:
                        finish(i, s, msg[1])
                elif s.case and time.monotonic() - s.started > time_limit:
                    finish(i, s, _timeout_record(s, time_limit))
        for s in slots:
            s.stop()
    return sorted(results, key=lambda rec: rec["id"])


# ============================================================== reporting
FAILURES = ("exception", "timeout", "mismatch")


def table(results, row: str) -> str:
    """Counts per outcome, one line per value of rec[row] (the stage or the generator)."""
    grid = collections.defaultdict(collections.Counter)
    for rec in results:
        grid[rec[row] or "-"][rec["outcome"]] += 1
    order = [k for k in STAGES if k in grid] + sorted(k for k in grid if k not in STAGES)
    lines = [f"{row:<12}" + "".join(f"{o:>13}" for o in OUTCOMES)]
    lines += [f"{k:<12}" + "".join(f"{grid[k][o]:>13}" for o in OUTCOMES) for k in order]
    total = collections.Counter(rec["outcome"] for rec in results)
    lines.append(f"{'total':<12}" + "".join(f"{total[o]:>13}" for o in OUTCOMES))
    return "\n".join(lines)


def failure_groups(results) -> dict:
    """Failing cases grouped by (stage, exception type, innermost mixerc frame),
    shortest source first."""
    groups = collections.defaultdict(list)
    for rec in results:
        if rec["outcome"] in FAILURES:
            groups[rec["stage"], rec["etype"], rec["frame"]].append(rec)
    return {k: sorted(v, key=lambda rec: len(rec["source"])) for k, v in
            sorted(groups.items(), key=lambda kv: -len(kv[1]))}


def write_failures(results, out: Path) -> list:
    """One .mx (the shortest source) and one .txt (its traceback) per distinct
    failure, index.json describing them, failures.jsonl holding every failing case."""
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for n, ((stage, etype, frame), recs) in enumerate(failure_groups(results).items()):
        first = recs[0]
        stem = f"{n:03d}_{stage}_{re.sub(r'[^A-Za-z0-9]+', '_', etype)[:40]}"
        (out / f"{stem}.mx").write_bytes(first["source"].encode("utf-8", "surrogatepass"))
        (out / f"{stem}.txt").write_text(f"{first['message']}\n\n{first['tb']}")
        index.append({"file": f"{stem}.mx", "stage": stage, "etype": etype, "frame": frame,
                      "count": len(recs), "message": first["message"],
                      "gens": dict(collections.Counter(r["gen"] for r in recs)),
                      "case_ids": [r["id"] for r in recs][:50], "source": first["source"]})
    (out / "index.json").write_text(json.dumps(index, indent=1))
    with open(out / "failures.jsonl", "w") as f:  # every failing case, for a closer look
        for rec in results:
            if rec["outcome"] in FAILURES:
                f.write(json.dumps({k: v for k, v in rec.items() if k != "tb"}) + "\n")
    return index


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=5.0, help="seconds per case")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="address-space cap per worker")
    ap.add_argument("--first", type=int, default=0, help="first case number (to resume)")
    ap.add_argument("--out", type=Path, default=None, help="write failing cases here")
    args = ap.parse_args(argv)
    start, done = time.monotonic(), []

    def progress(rec):
        done.append(rec["outcome"] in FAILURES)
        if len(done) % 500 == 0:
            print(f"{len(done)} cases, {sum(done)} failing, {time.monotonic() - start:.0f} s",
                  flush=True)

    cases = (make_case(args.seed, i) for i in range(args.first, args.first + args.cases))
    results = campaign(cases, args.jobs, args.time_limit, args.memory_gb, progress)
    print(table(results, "stage") + "\n\n" + table(results, "gen"))
    groups = failure_groups(results)
    print(f"\n{len(groups)} distinct failures in {time.monotonic() - start:.0f} s:")
    for (stage, etype, frame), recs in groups.items():
        print(f"  {len(recs):6d}  {stage:<8} {etype:<32} {frame}")
    if args.out:
        write_failures(results, args.out)
        print(f"wrote {len(groups)} failing cases to {args.out}")
    return 1 if groups else 0


if __name__ == "__main__":
    raise SystemExit(main())
