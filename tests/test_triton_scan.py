"""The Triton backend's scan for per-channel decay terms
(templates/triton_scan.py.jinja via codegen/triton/terms/scan.py) against
the dense interpreter: Mamba-1 and per-channel programs with small value
dims (q and k at one head or at groups, strict masks, a log-decay that does
or does not factor), float32 (< 1e-4), float16 and bfloat16 (< 2e-2; bf16
through the test-only dot patch), T not a multiple of any block, batch > 1,
initial and final states, decode steps after a prefill, strong decays over
long inputs; outputs poisoned before the kernels write. The cost model's
choice (Mamba-1 scans, GLA at K = V = 128 runs chunks), the config knob
that overrides it, the factored log-decay never materialized, and the
kernels' static fitness on sm_90a and sm_80 (no spills at any config)."""

import functools
import textwrap

import pytest
import torch
from conftest import compiled_mixers, rel_err, run_without_interpreter
from reference import make_inputs

import mixerc
from mixerc import cost

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64

# q and k at G groups of the H heads, the log-decay a product of softplus(dt)
# [H] per token and -exp(A_log) [H, K] (factored on load)
GROUPED = """
mixer grouped {
  dims H, K, V, G divides H
  input q : [G, K]
  input k : [G, K]
  input v : [H, V]
  input dt : [H]
  param A_log : [H, K] = log(uniform(1, 4))
  out y = (decay(-exp(A_log) * softplus(dt)) * (q @ k^T)) @ v
}
"""

# the same with the negation outside the product (and dt per token only)
NEGATED = GROUPED.replace("grouped", "negated").replace(
    "decay(-exp(A_log) * softplus(dt))", "decay(-(softplus(dt) * exp(A_log) * 0.5))")

# a log-decay per token and channel (GLA's): read as a [B, T, H, K] tensor
STRICT = """
mixer strict_small {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  input f : [H, K]
  out y = (decay(log(sigmoid(f))) * (q @ k^T) * (s < t)) @ v
}
"""


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


class Calls(list):
    """"scan" or "chunks" per call; .args: each host function's arguments."""

    def __init__(self):
        super().__init__()
        self.args = {}


def algorithms(m, monkeypatch) -> Calls:
    """Records, per call of the term's host functions, which one ran."""
    mod = m._impl.module
    calls = Calls()
    for name in m._impl._kernel_dims:
        original = getattr(mod, name)

        @functools.wraps(original)  # (and its attributes: the map's torch code, ...)
        def spy(*args, _original=original, _name=name, **kw):
            calls.append("scan" if "_scan" in _name else "chunks")
            calls.args.setdefault(_name, []).append(args)
            return _original(*args, **kw)
        monkeypatch.setattr(mod, name, spy)
    return calls


def on_device(args, dtype=None):
    """Token inputs ([B, T, ...]) in dtype (float32 by default), params in float32."""
    return {n: x.to(device=DEVICE, dtype=dtype if (dtype is not None and x.dim() >= 3) else
                    torch.float32) for n, x in args.items()}


def grouped_inputs(B, T, H=6, G=2, K=5, V=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return dict(q=r(B, T, G, K), k=r(B, T, G, K), v=r(B, T, H, V), dt=r(B, T, H) - 1,
                A_log=r(H, K) * 0.5)


def strict_inputs(B, T, H=3, K=7, V=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), f=r(B, T, H, K) + 2)


def run(m, args, dtype=None, **kw):
    with torch.no_grad():
        return m(**on_device(args, dtype), **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_mamba_equals_dense(compiled, monkeypatch, poisoned, dtype, tol):
    m = compiled("mamba")
    calls = algorithms(m, monkeypatch)
    args = make_inputs("mamba", B=2, T=45, seed=1)
    y = run(m, args, dtype)
    assert calls == ["scan"] and y.dtype == dtype
    assert rel_err(y.cpu(), compiled("mamba", "dense")(**args)) < tol


def test_mamba_bf16(compiled, monkeypatch, bf16_dots):
    m = compiled("mamba")
    calls = algorithms(m, monkeypatch)
    args = make_inputs("mamba", B=2, T=30, seed=2)
    y = run(m, args, torch.bfloat16)
    assert calls == ["scan"]
    assert rel_err(y.float().cpu(), compiled("mamba", "dense")(**args)) < 2e-2


@pytest.mark.parametrize("H,G,K,V,T", [(6, 2, 5, 2, 37), (6, 6, 3, 1, 21), (5, 1, 8, 3, 50)])
def test_grouped_programs_equal_dense(compiled, monkeypatch, poisoned, H, G, K, V, T):
    """Random grouped programs: q, k at G of H heads, small value dims, the
    log-decay's factors multiplied in the kernel."""
    m = compiled(GROUPED)
    calls = algorithms(m, monkeypatch)
    args = grouped_inputs(B=3, T=T, H=H, G=G, K=K, V=V, seed=H + K)
    y = run(m, args)
    assert calls == ["scan"]
    assert rel_err(y.cpu(), compiled(GROUPED, "dense")(**args)) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_strict_unfactored_equals_dense(compiled, monkeypatch, poisoned, dtype, tol):
    m = compiled(STRICT)
    assert m._impl.plan.matrices[0].terms[0].flags["strict"]
    calls = algorithms(m, monkeypatch)
    args = strict_inputs(B=2, T=33)
    y = run(m, args, dtype)
    assert calls == ["scan"]
    assert rel_err(y.cpu(), compiled(STRICT, "dense")(**args)) < tol


def test_initial_and_final_states(compiled, monkeypatch, poisoned):
    m, ref = compiled("mamba"), compiled("mamba", "torch")
    calls = algorithms(m, monkeypatch)
    args = make_inputs("mamba", B=2, T=70, seed=4)
    head = {n: (x[:, :41] if x.dim() >= 3 else x) for n, x in args.items()}
    tail = {n: (x[:, 41:] if x.dim() >= 3 else x) for n, x in args.items()}
    y1, s1 = run(m, head, return_state=True)
    y2, s2 = run(m, tail, initial_state=s1, return_state=True)
    assert calls == ["scan", "scan"]
    _, s_ref = ref(**head, return_state=True)  # the torch backend in float64
    assert rel_err(s1.tensors["M"].cpu(), s_ref.tensors["M"]) < 1e-5
    _, s_all = ref(**args, return_state=True)
    assert rel_err(s2.tensors["M"].cpu(), s_all.tensors["M"]) < 1e-5
    want = compiled("mamba", "dense")(**args)
    assert rel_err(torch.cat([y1, y2], 1).cpu(), want) < 1e-4


def test_prefill_then_decode(compiled, monkeypatch, poisoned):
    m = compiled(GROUPED)
    calls = algorithms(m, monkeypatch)
    T0, steps = 30, 3
    args = grouped_inputs(B=2, T=T0 + steps, seed=5)
    want = compiled(GROUPED, "dense")(**args)
    dev = on_device(args)
    tokens = [n for n, x in args.items() if x.dim() >= 3]
    with torch.no_grad():
        y0, state = m(**{n: (x[:, :T0] if n in tokens else x) for n, x in dev.items()},
                      return_state=True)
        ys = [y0]
        for t in range(T0, T0 + steps):
            y_t, state = m.step(state, **{n: (x[:, t] if n in tokens else x)
                                          for n, x in dev.items()})
            ys.append(y_t[:, None])
    assert calls == ["scan"] * (1 + steps)  # the steps: the same host function, decoding
    assert rel_err(torch.cat(ys, 1).cpu(), want) < 1e-4


def test_varlen_equals_dense_per_sequence(compiled, monkeypatch):
    """Packed sequences (cu_seqlens): the scan per sequence, the 5-token one
    as a decode step (the same kernel, without checkpoints)."""
    m, d = compiled("mamba"), compiled("mamba", "dense")
    calls = algorithms(m, monkeypatch)
    args = make_inputs("mamba", B=1, T=60, seed=11)
    offsets = [0, 5, 41, 60]
    with torch.no_grad():
        y = m(**on_device(args), cu_seqlens=torch.tensor(offsets, dtype=torch.int32,
                                                         device=DEVICE))
    assert calls and set(calls) == {"scan"}
    for a, b in zip(offsets, offsets[1:]):
        want = d(**{n: (x[:, a:b] if x.dim() >= 3 else x) for n, x in args.items()})
        assert rel_err(y[:, a:b].cpu(), want) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_strong_decays_stay_finite(compiled, monkeypatch, dtype, tol):
    """delta about 20 per step (-exp(A_log) * delta down to -300) over 400
    tokens: decays underflow to 0, never a NaN."""
    m = compiled("mamba")
    calls = algorithms(m, monkeypatch)
    args = make_inputs("mamba", B=1, T=400, seed=3)
    args["dt"] = torch.full_like(args["dt"], 20.0)
    args["dt"][:, ::9] = -12.0  # some slow steps too
    y, state = run(m, args, dtype, return_state=True)
    assert calls == ["scan"]
    assert torch.isfinite(y).all() and torch.isfinite(state.tensors["M"]).all()
    assert rel_err(y.cpu(), compiled("mamba", "dense")(**args)) < tol


def test_log_decay_factors_never_materialized(compiled, monkeypatch):
    """The scan reads -exp(A_log) [E, N] and computes delta [B, T, E] on
    load (tests/test_triton_scan_prologue.py); the [B, T, E, N] product
    exists only in the chunked branch of the generated code."""
    m = compiled("mamba")
    src = m.source()
    forward = src[src.index("\ndef forward("):]
    branch = forward.index("if algorithm == 'scan'")
    assert "delta[..., None]" not in forward[:branch]
    product = [ln for ln in forward.splitlines() if "delta[..., None]" in ln]
    assert product and all(ln.startswith(" " * 8) for ln in product)  # inside the else
    calls = algorithms(m, monkeypatch)
    args = make_inputs("mamba", B=2, T=20, seed=6)
    run(m, args)
    (q, k, v, dt, a, *_), = next(a for n, a in calls.args.items() if "_scan" in n)
    assert calls == ["scan"]
    assert dt is None and tuple(a.shape) == (6, 4)  # E = 6, N = 4: delta from its leaves
    assert tuple(q.shape) == (2, 20, 1, 4)  # C at one head, not expanded to E


def test_negated_product_factors(compiled, monkeypatch, poisoned):
    m = compiled(NEGATED)
    calls = algorithms(m, monkeypatch)
    args = grouped_inputs(B=2, T=27, seed=10)
    y = run(m, args)
    (q, k, v, dt, a, *_), = next(a for n, a in calls.args.items() if "_scan" in n)
    assert calls == ["scan"] and dt is None and a.dim() == 2  # softplus(dt) on load
    assert rel_err(y.cpu(), compiled(NEGATED, "dense")(**args)) < 1e-4


def test_cost_model_choice():
    """Mamba-1 (value dim 1 per head) scans at every size; GLA at K = V = 128
    runs chunks, at K = V = 4 it scans; explain says which and why."""
    def choice(name, sizes):
        m = mixerc.compile(name, backend="torch")
        p = m._impl.plan
        mp = p.matrices[0]
        scan, chunks = cost.gpu_per_channel_choice(mp.terms[0], mp, p.program.groups)
        at = dict(sizes, chunk=64)
        return "scan" if cost.evaluate(scan, at) <= cost.evaluate(chunks, at) else "chunks"
    assert choice("mamba", {"E": 1536, "N": 16}) == "scan"
    assert choice("gla", {"H": 16, "K": 128, "V": 128}) == "chunks"
    assert choice("gla", {"H": 16, "K": 4, "V": 4}) == "scan"
    mamba = mixerc.compile("mamba", backend="triton").explain()
    assert "algorithm: the cost model's" in mamba and "scan (cheaper than chunks at every size)" \
        in mamba
    gla = mixerc.compile("gla", backend="triton").explain()
    assert "scan when 8*K*V <= " in gla and "else chunks (per call)" in gla
    from click.testing import CliRunner

    from mixerc.cli import main
    r = CliRunner().invoke(main, ["explain", "mamba", "--backend", "triton"])
    assert r.exit_code == 0 and "scan (cheaper than chunks at every size)" in r.output


def test_algorithm_is_a_tuning_knob(compiled):
    mod = compiled("mamba")._impl.module
    assert mod.CONFIG_SPACE["M.algorithm"] == ["auto", "scan", "chunks"]
    assert mod.DEFAULT_CONFIG["M.algorithm"] == "auto"
    assert {"M.scan_block_h", "M.scan_warps", "M.tri_chunk"} <= set(mod.CONFIG_SPACE)


def test_gla_shape_runs_chunks_and_the_knob_overrides(compiled, monkeypatch, poisoned):
    """At K = V = 32 the cost model picks the chunked kernels; the config's
    `algorithm` knob forces either algorithm, and both equal dense."""
    m = mixerc.compile("gla", backend="triton")
    calls = algorithms(m, monkeypatch)
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    args = dict(q=r(1, 20, 2, 32) * 0.3, k=r(1, 20, 2, 32) * 0.3, v=r(1, 20, 2, 32),
                g=torch.nn.functional.logsigmoid(r(1, 20, 2, 32) + 2))
    want = compiled("gla", "dense")(**args)
    assert rel_err(run(m, args).cpu(), want) < 1e-4
    m._impl.pin_config(algorithm="scan")
    assert rel_err(run(m, args).cpu(), want) < 1e-4
    assert calls == ["chunks", "scan"]
    m2 = mixerc.compile("mamba", backend="triton")
    m2._impl.pin_config(algorithm="chunks")
    calls2 = algorithms(m2, monkeypatch)
    args = make_inputs("mamba", B=2, T=25, seed=8)
    assert rel_err(run(m2, args).cpu(), compiled("mamba", "dense")(**args)) < 1e-4
    assert calls2 == ["chunks"]


def test_gradients_take_the_scan(compiled, monkeypatch):
    """With gradients the scan runs too (its backward: test_triton_scan_grad.py)."""
    m = compiled("mamba")
    calls = algorithms(m, monkeypatch)
    args = make_inputs("mamba", B=1, T=24, seed=9)
    dev = {n: x.float().to(DEVICE).requires_grad_(True) for n, x in args.items()}
    y = m(**dev)
    assert calls == ["scan"]
    assert rel_err(y.detach().cpu(), compiled("mamba", "dense")(**args)) < 1e-4
    y.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in dev.values())


FITNESS = textwrap.dedent("""
    import itertools
    import json
    import mixerc
    from mixerc.codegen.triton import fitness
    out = []
    # (mixer, dims, which configs): every config for Mamba-1 (the factored
    # log-decay, with its decode step), the default for a log-decay per token and
    # channel, and at GLA's K = 128 every warp count (heads per program follow
    # the warps there: runtime/triton/scan.py scan_heads)
    for src, sizes, which in (("mamba", {"E": 1536, "N": 16}, "all"),
                              (%r, {"H": 8, "K": 16, "V": 2}, "default"),
                              ("gla", {"H": 16, "K": 128, "V": 128}, "warps")):
        r = mixerc.compile(src, backend="triton")._impl
        mod = r.module
        shapes = r.kernel_shapes(sizes)
        for function, name, kernel in fitness.kernels_of(mod):
            if "_scan" not in function:
                continue
            key, D, DV = shapes[function]
            # the kernel's own meta, else its family's (as the report finds them)
            meta = getattr(mod, name + "_compile_meta", None) or \
                getattr(mod, function + "_compile_meta")
            choices = [mod.CONFIG_SPACE[key + "." + k] if which == "all" or
                       (which == "warps" and k == "scan_warps") else
                       [mod.DEFAULT_CONFIG[key + "." + k]] for k in meta.knobs]
            for target in ("sm_90a", "sm_80"):
                for values in itertools.product(*choices):
                    cfg = dict(zip(meta.knobs, values))
                    fit = fitness._fit(kernel, function, name, cfg, target, "bf16", False,
                                       lambda: meta(D, DV, cfg, "bf16"))
                    out.append(dict(src=src[:8], target=target, kernel=fit.kernel,
                                    part=name[len(function):], cfg=cfg, err=fit.error,
                                    regs=fit.registers, spill=fit.spill_bytes,
                                    shared=fit.shared, limit=fit.shared_limit))
    print(json.dumps(out))
""") % STRICT


def test_scan_kernels_fit_sm90a_and_sm80():
    """The scan's kernels as `mixerc compile --target` lists them: every config
    of the scan's knobs for Mamba-1 (the factored log-decay): the forward (with
    its checkpoint stores), the backward and the decode step (the forward
    without checkpoints, SEG = 0: its own row, `_fwd_decode`); the default
    for a log-decay per token and channel; at GLA's K = 128 the forward and
    backward at 2, 4 and 8 warps (the backward kept an 8 to 32-byte stack
    frame at 2 and 8 warps until its launch raised ptxas's register limit:
    runtime/triton/scan.py scan_bwd_maxnreg). No spills, within shared memory."""
    fits = run_without_interpreter(FITNESS, timeout=900)
    assert {f["target"] for f in fits} == {"sm_90a", "sm_80"}
    mamba = [f for f in fits if f["src"] == "mamba"]
    assert sorted({f["part"] for f in mamba}) == ["_bwd", "_fwd", "_fwd_decode"]
    for part in ("_fwd", "_bwd", "_fwd_decode"):  # 9 configs on two targets
        assert len([f for f in mamba if f["part"] == part]) == 18, part
    gla = [f for f in fits if f["src"] == "gla"]
    assert sorted({f["part"] for f in gla}) == ["_bwd", "_fwd"]  # decodes on the recurrence
    assert sorted(f["cfg"]["scan_warps"] for f in gla if f["part"] == "_bwd") == \
        [2, 2, 4, 4, 8, 8]
    assert len([f for f in fits if f["src"] not in ("mamba", "gla")]) == 4  # fwd, bwd
    for f in fits:
        where = f"{f['target']} {f['kernel']} {f['cfg']} {f['err']}"
        assert not f["err"] and f["spill"] == 0 and f["shared"] <= f["limit"], where
        assert f["regs"] <= 255, where
