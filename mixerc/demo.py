"""`mixerc demo`: compile the standard library, evaluate each mixer on random
CPU inputs with the dense interpreter, check decode against the full call,
and print a table."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .api import compile as compile_mixer
from .api import stdlib_names
from .inputs import default_sizes, random_inputs


def _short_state(info) -> str:
    if not info.state_shape:
        return "none"
    return "[" + ", ".join(info.state_shape) + "]"


def run_demo(T: int = 96, batch: int = 2, console: Console | None = None) -> list:
    console = console or Console(width=None if Console().is_terminal else 132)
    table = Table(title=f"mixerc standard library: dense float64 interpreter, CPU, "
                  f"batch={batch}, T={T}")
    for col in ("mixer", "class", "causal", "decode state", "output", "forward ms",
                "step == forward"):
        table.add_column(col, no_wrap=col != "class")
    rows = []
    for name in stdlib_names():
        m = compile_mixer(name, backend="dense")
        p = m.program
        sizes = default_sizes(p)
        args = random_inputs(p, sizes, batch, T, seed=0, dtype=torch.float32)
        t0 = time.perf_counter()
        y = m(**args)
        ms = (time.perf_counter() - t0) * 1e3
        if m.analysis.causal:
            n = min(T, 8)
            state, err = None, 0.0
            for t in range(n):
                tok = {k: (v[:, t] if k in p.inputs else v) for k, v in args.items()}
                yt, state = m.step(state, **tok)
                err = max(err, float((yt - y[:, t]).abs().max() / y[:, :n].abs().max()))
            check = f"yes ({n} steps, {err:.0e})" if err < 1e-5 else f"NO ({err:.1e})"
        else:
            check = "n/a (bidirectional)"
        states = "; ".join(_short_state(x) for x in m.analysis.matrices)
        row = (name, m.analysis.cls, "yes" if m.analysis.causal else "no", states,
               str(list(y.shape)), f"{ms:.1f}", check)
        rows.append(row)
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    return rows


if __name__ == "__main__":  # pragma: no cover
    run_demo()
