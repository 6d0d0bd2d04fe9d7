"""The per-channel scan's backward (templates/triton_scan.py.jinja _bwd, a
reverse scan from checkpoints; runtime/triton/scan.py ScanFn) against the
dense interpreter's float64 autograd: the gradient of every input and param
of Mamba-1 (x, dt, B, C, A_log, dt_bias, D), of grouped programs (q and k at
groups, small value dims, the log-decay's factors: d delta and dA summed in
the kernel), strict programs with a [B, T, H, K] or a factored log-decay,
and GLA with the scan forced (per-head q and k, value dim 3); float32
(< 1e-4), float16 and bfloat16 (< 3e-2); initial and final states; T over
several segments and a multiple of none; batch > 1; strong decays finite. A
spy on the backward op proves the scan's backward ran (not the torch code);
torch.compile runs the scan's ops (opaque custom ops); static fitness of
the backward on sm_90a and sm_80."""


import pytest
import torch
from conftest import compiled_mixers, rel_err
from reference import make_inputs
from test_triton_scan import GROUPED, STRICT, grouped_inputs, strict_inputs

import mixerc

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


def spy_backward(m, monkeypatch) -> list:
    """The scan's (forward op, backward op) calls, as "fwd" / "bwd"."""
    mod = m._impl.module
    calls = []
    names = [n for n in vars(mod) if n.endswith("_ops") and n.startswith("per_channel_scan")]
    assert len(names) == 1, names
    fwd, bwd = getattr(mod, names[0])

    def spy(op, what):
        def call(*args):
            calls.append(what)
            return op(*args)
        return call
    monkeypatch.setattr(mod, names[0], (spy(fwd, "fwd"), spy(bwd, "bwd")))
    return calls


def grads(m, args, dtype, weights, **kw):
    """(y, {name: gradient}) of sum(y * weights) with token inputs in dtype
    (params float32; float64 throughout for dtype float64)."""
    dev = {n: x.to(device=DEVICE, dtype=dtype if (x.dim() >= 3 or dtype == f64) else
                   torch.float32).requires_grad_(True) for n, x in args.items()}
    y = m(**dev, **kw)
    (y.to(f64) * weights.to(DEVICE)).sum().backward()
    return y, {n: x.grad for n, x in dev.items()}


def check(compiled, monkeypatch, src, args, dtype=torch.float32, tol=1e-4):
    m = compiled(src)
    calls = spy_backward(m, monkeypatch)
    w = torch.randn(compiled(src, "dense")(**args).shape, dtype=f64,
                    generator=torch.Generator().manual_seed(0))
    y, got = grads(m, args, dtype, w)
    assert calls == ["fwd", "bwd"]  # the scan both ways: no torch fallback
    y_ref, want = grads(compiled(src, "dense"), args, f64, w)
    assert rel_err(y.cpu(), y_ref) < tol
    for n in args:
        assert got[n].dtype == (dtype if args[n].dim() >= 3 else torch.float32), n
        assert torch.isfinite(got[n]).all(), n
        assert rel_err(got[n].cpu(), want[n]) < tol, (n, rel_err(got[n].cpu(), want[n]))


@pytest.mark.parametrize("B,T", [(2, 45), (2, 150)])  # one segment; three (64 + 64 + 22)
def test_mamba_gradients_equal_dense(compiled, monkeypatch, poisoned, B, T):
    check(compiled, monkeypatch, "mamba", make_inputs("mamba", B=B, T=T, seed=T))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mamba_gradients_halves(compiled, monkeypatch, bf16_dots, dtype):
    check(compiled, monkeypatch, "mamba", make_inputs("mamba", B=2, T=70, seed=3), dtype, 3e-2)


@pytest.mark.parametrize("H,G,K,V,T", [(6, 2, 5, 2, 37), (6, 6, 3, 1, 70), (5, 1, 8, 3, 21)])
def test_grouped_gradients_equal_dense(compiled, monkeypatch, poisoned, H, G, K, V, T):
    """q and k at G of H heads (summed over each group by atomic adds),
    value dims 1 to 3 (summed over the value columns' programs)."""
    check(compiled, monkeypatch, GROUPED, grouped_inputs(B=2, T=T, H=H, G=G, K=K, V=V,
                                                         seed=H + K))


@pytest.mark.parametrize("dtype,tol,T", [(torch.float32, 1e-4, 77), (torch.float16, 3e-2, 40)])
def test_strict_unfactored_gradients(compiled, monkeypatch, poisoned, dtype, tol, T):
    """A strict mask (y_t reads the decayed state before token t) and a
    log-decay per token and channel: its gradient stored per value column."""
    check(compiled, monkeypatch, STRICT, strict_inputs(B=2, T=T), dtype, tol)


def test_state_gradients(compiled, monkeypatch, poisoned):
    """The initial state's gradient and a loss on the final state, against
    the torch backend in float64."""
    m, ref = compiled("mamba"), compiled("mamba", "torch")
    args = make_inputs("mamba", B=2, T=90, seed=4)
    head = {n: (x[:, :20] if x.dim() >= 3 else x) for n, x in args.items()}
    tail = {n: (x[:, 20:] if x.dim() >= 3 else x) for n, x in args.items()}
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, mod, dtype in (("scan", m, torch.float32), ("ref", ref, f64)):
        with torch.no_grad():
            _, s0 = mod(**{n: x.to(DEVICE, dtype) for n, x in head.items()}, return_state=True)
        s0.tensors["M"] = s0.tensors["M"].to(dtype).detach().requires_grad_(True)
        calls = spy_backward(mod, monkeypatch) if name == "scan" else []
        xs = {n: x.to(DEVICE, dtype).requires_grad_(True) for n, x in tail.items()}
        y, s1 = mod(**xs, initial_state=s0, return_state=True)
        if name == "scan":
            wy = torch.randn(y.shape, dtype=f64, generator=g)
            ws = torch.randn(s1.tensors["M"].shape, dtype=f64, generator=g)
        loss = (y.to(f64) * wy.to(DEVICE)).sum() + (s1.tensors["M"].to(f64) * ws.to(DEVICE)).sum()
        loss.backward()
        assert name == "ref" or calls == ["fwd", "bwd"]
        out[name] = {"state": s0.tensors["M"].grad, **{n: x.grad for n, x in xs.items()}}
    for n, want in out["ref"].items():
        assert rel_err(out["scan"][n].cpu(), want) < 1e-4, n


def test_strong_decays_gradients_finite(compiled, monkeypatch):
    """A log-decay about -5 per step and channel (delta ~ 5, A = -1) over
    several segments: the reverse scan only multiplies by exp(a_t) <= 1, so
    decays underflow to 0, never a NaN or inf."""
    args = make_inputs("mamba", B=1, T=200, seed=5)
    args["dt"] = torch.full_like(args["dt"], 5.0) - args["dt_bias"]
    args["dt"][:, ::7] = 30.0  # and some much stronger steps
    args["A_log"] = torch.zeros_like(args["A_log"])
    check(compiled, monkeypatch, "mamba", args)


def test_long_strong_decay_finite(compiled):
    """log-decay -5 per step over 1024 tokens, 16 segments (one head, K = 2,
    the host function directly; the interpreter's speed bounds T, and
    exp(-5 t) underflows within the first segment already): every gradient
    finite."""
    m = compiled(GROUPED)
    mod = m._impl.module
    fn, = (getattr(mod, n) for n in m._impl._kernel_dims if "_scan" in n)
    g = torch.Generator().manual_seed(2)
    T = 1024
    q, k = (torch.randn(1, T, 1, 2, generator=g).requires_grad_(True) for _ in range(2))
    v = torch.randn(1, T, 1, 1, generator=g).requires_grad_(True)
    dt = torch.full((1, T, 1), 5.0).requires_grad_(True)
    a = torch.full((1, 2), -1.0).requires_grad_(True)
    y, s = fn(q, k, v, dt, a, None, 16, 1)
    (y.sum() + s.sum()).backward()
    for x in (q, k, v, dt, a):
        assert torch.isfinite(x.grad).all()
    # token t's state keeps exp(-5) of token t - 1's: y_t = q_t . k_t v_t up to ~1%
    assert rel_err(y[0, :, 0, 0], ((q * k).sum(-1) * v[..., 0])[0, :, 0]) < 2e-2


def test_float64_keeps_the_torch_path(compiled, monkeypatch):
    m = compiled("mamba")
    calls = spy_backward(m, monkeypatch)
    args = make_inputs("mamba", B=1, T=24, seed=9)
    dev = {n: x.to(DEVICE).requires_grad_(True) for n, x in args.items()}
    m(**dev).square().sum().backward()
    assert calls == []
    assert all(torch.isfinite(x.grad).all() for x in dev.values())


def test_torch_compile_runs_the_scan_ops(compiled):
    """torch.compile (fullgraph: no graph break) sees the scan's launches as
    opaque custom ops with fake implementations for shapes: the traced
    forward graph calls the forward op, the backward graph the backward op;
    with inductor (which compiles on this CPU; Triton's interpreter runs the
    kernels inside the ops) forward with and without gradients and the
    backward equal the eager module."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    m = compiled("mamba")
    args = make_inputs("mamba", B=2, T=40, seed=12)
    y_want, want = grads(m, args, torch.float32, torch.ones(2, 40, 6, dtype=f64))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)
    for backend in (aot_autograd(fw_compiler=record, bw_compiler=record), "inductor"):
        torch._dynamo.reset()
        fn = torch.compile(lambda **kw: m(**kw), backend=backend, fullgraph=True)
        dev = {n: x.float().to(DEVICE).requires_grad_(True) for n, x in args.items()}
        y = fn(**dev)
        y.sum().backward()
        assert rel_err(y, y_want) < 1e-6
        for n in args:
            assert rel_err(dev[n].grad, want[n]) < 1e-5, (backend, n)
        with torch.no_grad():
            assert rel_err(fn(**dev), y_want) < 1e-6
    torch._dynamo.reset()
    fwd, bwd = graphs[:2]
    assert "mixerc.scan_" in fwd and "_fwd" in fwd and "_bwd" not in fwd
    assert "mixerc.scan_" in bwd and "_bwd" in bwd


# the backward's static fitness: test_triton_scan.py (one compile run with the forward)


def test_gla_forced_scan_gradients(compiled, monkeypatch, poisoned):
    """GLA (a log-decay per token and channel, not strict, q and k per head,
    value dim > 1) with the `algorithm` knob forcing the scan."""
    m = mixerc.compile("gla", backend="triton")
    m._impl.pin_config(algorithm="scan")
    g = torch.Generator().manual_seed(13)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    args = dict(q=r(2, 70, 2, 4), k=r(2, 70, 2, 4), v=r(2, 70, 2, 3),
                g=torch.nn.functional.logsigmoid(r(2, 70, 2, 4) + 2))
    cache = {("gla", "triton"): m, ("gla", "dense"): compiled("gla", "dense")}
    check(lambda src, backend="triton": cache[src, backend], monkeypatch, "gla", args)


STRICT_GROUPED = GROUPED.replace("grouped", "strict_grouped").replace(
    "* (q @ k^T))", "* (q @ k^T) * (s < t))")


def test_strict_factored_gradients(compiled, monkeypatch, poisoned):
    """A strict mask with the factored log-decay and q, k at groups."""
    assert STRICT_GROUPED != GROUPED
    assert compiled(STRICT_GROUPED)._impl.plan.matrices[0].terms[0].flags["strict"]
    check(compiled, monkeypatch, STRICT_GROUPED, grouped_inputs(B=2, T=66, seed=14))
