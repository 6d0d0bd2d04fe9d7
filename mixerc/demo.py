"""`mixerc demo`: compile the standard library, run every mixer on random CPU
inputs with the torch backend, check it against the dense float64
interpreter and token-by-token decode, and print a table."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .api import compile as compile_mixer
from .api import stdlib_names
from .inputs import default_sizes, random_inputs


def _ms(fn) -> tuple:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run_demo(T: int = 256, batch: int = 2, console: Console | None = None) -> list:
    console = console or Console(width=None if Console().is_terminal else 140)
    table = Table(title=f"mixerc standard library on the CPU: torch backend (float32) vs the "
                  f"dense float64 interpreter, batch={batch}, T={T}")
    for col in ("mixer", "class", "algorithm", "decode state", "torch ms", "dense ms",
                "rel. error", "decode == forward"):
        table.add_column(col, no_wrap=col not in ("class", "algorithm"))
    rows = []
    for name in stdlib_names():
        fast = compile_mixer(name, backend="torch")
        dense = compile_mixer(name, backend="dense")
        p = fast.program
        args = random_inputs(p, default_sizes(p), batch, T, seed=0, dtype=torch.float32)
        fast(**args)  # warm-up (first call per shape looks up the autotune cache)
        y, ms = _ms(lambda: fast(**args))
        ref, dense_ms = _ms(lambda: dense(**{k: v.double() for k, v in args.items()}))
        if fast.causal:
            n = min(T, 8)
            state, err = None, 0.0
            for t in range(n):
                tok = {k: (v[:, t] if k in p.inputs else v) for k, v in args.items()}
                yt, state = fast.step(state, **tok)
                err = max(err, _rel(yt, y[:, t]))
            check = f"yes ({n} steps, {err:.0e})" if err < 1e-4 else f"NO ({err:.1e})"
        else:
            check = "n/a (bidirectional)"
        algo = "; ".join(f"{m.name}: {'+'.join(m.strategies)}" for m in fast._impl.plan.matrices)
        states = "; ".join("[" + ", ".join(m.state_shape) + "]" if m.state_shape else "none"
                           for m in fast.analysis.matrices)
        row = (name, fast.analysis.cls, algo, states, f"{ms:.1f}", f"{dense_ms:.1f}",
               f"{_rel(y, ref):.1e}", check)
        rows.append(row)
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    return rows


if __name__ == "__main__":  # pragma: no cover
    run_demo()
