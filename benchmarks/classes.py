"""Section 4 of benchmarks/cpu.py: mixers nobody shipped, one per class the
kernel plan covers, each timed against the standard mixer of its class in
the same run (issue 9's targets: within 2x, non-causal linear within 1.5x).

Each variant is first checked against the dense float64 interpreter and for
its plan (no term may run densely), then timed interleaved with its standard
mixer on inputs of the same sizes.
"""

from __future__ import annotations

import torch

import mixerc
from mixerc.inputs import default_sizes, random_inputs

_QKV = "  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input v : [H, D]\n"
_KV = "  dims H, K, V\n  input q : [H, K]\n  input k : [H, K]\n  input v : [H, V]\n"
_SCORES = "q @ k^T / sqrt(D)"

# name -> (standard mixer, target ratio, source)
VARIANTS = {
    "alibi": ("attention", 2.0, "mixer alibi {\n" + _QKV + "  param slope : [H]\n"
              f"  out y = softmax({_SCORES} - slope * (t - s), mask = s <= t) @ v\n}}"),
    "softcap": ("attention", 2.0, "mixer softcap {\n" + _QKV +
                f"  out y = softmax(30 * tanh({_SCORES} / 30), mask = s <= t) @ v\n}}"),
    "document": ("attention", 2.0, "mixer document {\n" + _QKV + "  input doc : []\n"
                 f"  out y = softmax({_SCORES}, mask = s <= t and row(doc) == col(doc)) @ v\n}}"),
    "prefix_lm": ("attention", 2.0, "mixer prefix_lm {\n" + _QKV +
                  f"  out y = softmax({_SCORES}, mask = s <= t or s < 256) @ v\n}}"),
    "window_decay": ("retnet", 2.0, "mixer window_decay {\n" + _KV +
                     "  param log_gamma : [H] = log(1 - exp(uniform(log(1 / 512), log(1 / 32))))\n"
                     "  out y = (decay(log_gamma) * (q @ k^T) * (t - s < 256)) @ v\n}"),
    "noncausal_linear": ("linear_attention", 1.5, "mixer noncausal_linear {\n" + _KV +
                         "  let M = (elu(q) + 1) @ (elu(k) + 1)^T\n"
                         "  out y = (M @ v) / (M @ 1)\n}"),
    "decay_poly": ("based", 2.0, "mixer decay_poly {\n" + _KV +
                   "  param log_gamma : [H] = log(1 - exp(uniform(log(1 / 512), log(1 / 32))))\n"
                   "  let z = q @ k^T / sqrt(K)\n"
                   "  out y = (decay(log_gamma) * (1 + z + z^2 / 2) * (s <= t)) @ v\n}"),
}
DOCUMENT = 1024  # tokens per document of the document mask


def inputs(m, sizes, T, seed=0):
    args = random_inputs(m.program, default_sizes(m.program, sizes), 1, T, seed=seed)
    if "doc" in args:  # packed documents: ids rise every DOCUMENT tokens
        args["doc"] = torch.div(torch.arange(T), DOCUMENT, rounding_mode="floor").float()[None]
    return args


def class_section(o, sizes, measure_pair, ms, kt):
    """{variant: row} with each variant's plan check and its timings next to its
    standard mixer's."""
    rows = {}
    for name, (std, target, src) in VARIANTS.items():
        row = dict(std=std, target=target, times={}, fail=None)
        rows[name] = row
        m = mixerc.compile(src)
        standard = mixerc.compile(std)
        dims = {k: v for k, v in sizes[std].items() if k in m.program.dims}
        strategies = sorted({s for mp in m.plan.matrices for s in mp.strategies})
        row["plan"] = ", ".join(strategies)
        check = inputs(m, dims, 128, seed=1)
        want = mixerc.compile(src, backend="dense")(**check)
        err = float((m(**check).double() - want).norm() / want.norm())
        if "dense" in strategies or not err < 1e-4:
            row["fail"] = f"plan {row['plan']}, error vs dense {err:.1e}: not timed"
            print(f"  class   {name:17s} {row['fail']}", flush=True)
            continue
        std_sizes = default_sizes(standard.program, sizes[std])
        for T in o.class_T:
            a = inputs(m, dims, T)
            b = random_inputs(standard.program, std_sizes, 1, T, seed=0)
            with torch.no_grad():
                row["times"][T] = measure_pair(lambda: m(**a), lambda: standard(**b),
                                               o.repeats)
            ours, theirs = row["times"][T]
            print(f"  class   {name:17s} T={kt(T)}: {ms(ours)} ms, {std} {ms(theirs)} ms, "
                  f"ratio {ours / theirs:.2f} (target <= {target})", flush=True)
    return rows


def class_table(o, rows, table, ms, kt) -> list:
    lines = ["### 4. Classes (ms, median; a variant next to the standard mixer of its "
             "class, measured interleaved)", "",
             "Each variant is planned without the dense interpreter (column `plan`) and "
             "matches it at T=128 before it is timed.", ""]
    head = ["variant", "plan", "vs"] + [f"T={kt(T)}" for T in o.class_T] + ["target"]
    out = []
    for name, r in rows.items():
        cells = []
        for T in o.class_T:
            if T in r["times"]:
                ours, theirs = r["times"][T]
                cells.append(f"{ms(ours)} / {ms(theirs)} = {ours / theirs:.2f}x")
            else:
                cells.append(r["fail"] or "—")
        ok = all(a / b <= r["target"] for a, b in r["times"].values()) and r["times"]
        out.append([name, r.get("plan", ""), r["std"]] + cells +
                   [f"<= {r['target']}x: {'met' if ok else 'missed'}"])
    return lines + [table(head, out), ""]
