"""The elementwise math the per-channel scan computes on load
(codegen/triton/terms/scan.py `maps`, rendered by codegen/triton/prologue.py):
Mamba-1's delta = softplus(dt + dt_bias) from dt per token and dt_bias per
channel (for the decay and for the values' scale: values = delta * x read
as x), and the skip term D * x in the kernel's epilogue. The generated
forward must not compute them in torch before the scan (a fusion that
silently stops fails here), the scan's op must receive what the user passed,
and every path must equal the dense float64 interpreter: forward in float32,
bfloat16 and float64, the gradient of every input and param (the backward
recomputes the maps, runtime/triton/scan.py MappedScanFn), prefill then
decode, T not a multiple of the backward's checkpoint segment, batch > 1,
random programs of other maps (softplus(dt) without a bias, sigmoid(dt), a
per-channel param scale, with and without a skip), the chunked kernels
(algorithm knob) for the same term, outputs poisoned. Kernels run in
Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1)."""

import random
import re

import pytest
import torch
from conftest import (assert_gradients_equal_dense, assert_prefill_then_decode, compiled_mixers,
                      rel_err, to_device)
from reference import make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64


def mapped_program(seed: int) -> str:
    """A random Mamba-like mixer: the decay's per-token factor and the values'
    scale maps of dt and per-channel params, with or without a skip term."""
    rng = random.Random(seed)
    step = rng.choice(["softplus(dt + b)", "softplus(dt)", "sigmoid(dt)", "exp(dt) * p"])
    values = rng.choice(["{s} * x", "x * p", "sigmoid(dt) * x", "-(p * {s} * x)", "x"])
    values = values.format(s=step if rng.random() < 0.5 else "softplus(dt + b)")
    skip = rng.choice(["", " + D * x"])
    text = step + values + skip
    params = [f"  param {n} : [E] = uniform(0.5, 1.5)" for n in ("b", "p", "D")
              if re.search(rf"\b{n}\b", text)]
    return f"""mixer scanmap_{seed} {{
  dims E, N
  input x : [E]
  input dt : [E]
  input B : [N]
  input C : [N]
  param A_log : [E, N] = log(uniform(1, 4))
{chr(10).join(params)}
  let M = decay(-exp(A_log) * {step}) * (C @ B^T)
  out y = M @ ({values}){skip}
}}"""


SEEDS = [0, 3, 7, 21, 29]
CASES = ["mamba"] + [mapped_program(s) for s in SEEDS]
IDS = ["mamba"] + [f"mapped{s}" for s in SEEDS]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


def args_of(m, B=2, T=29, seed=1):
    """Inputs at E = 6, N = 4 (float64), dt around softplus's bend."""
    if m.program.name == "mamba":
        return make_inputs("mamba", B=B, T=T, seed=seed)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    E, N = 6, 4
    args = dict(x=r(B, T, E), dt=r(B, T, E) - 1, B=r(B, T, N), C=r(B, T, N),
                A_log=r(E, N) * 0.5)
    for n in ("b", "p", "D"):
        if n in m.program.params:
            args[n] = r(E) * 0.5 + 1
    return args


def on_device(args, dtype):
    """Token inputs ([B, T, ...]) in dtype, params in float32 (float64 with it)."""
    return {n: x.to(device=DEVICE, dtype=dtype if (x.dim() >= 3 or dtype == f64)
                    else torch.float32) for n, x in args.items()}


def forward_source(m) -> str:
    return m.source().split("\ndef forward(")[1].split("\ndef ")[0]


def scan_ops(m, monkeypatch) -> list:
    """The scan's (forward op, backward op) calls: ("fwd", args) / ("bwd", args)."""
    mod = m._impl.module
    names = [n for n in vars(mod) if n.endswith("_ops") and n.startswith("per_channel_scan")]
    assert len(names) == 1, names
    calls = []

    def spy(op, what):
        def call(*args):
            calls.append((what, args))
            return op(*args)
        return call
    fwd, bwd = getattr(mod, names[0])
    monkeypatch.setattr(mod, names[0], (spy(fwd, "fwd"), spy(bwd, "bwd")))
    return calls


def test_the_random_programs_have_maps(compiled):
    """Every random program is planned with the scan computing a map on load
    (else the tests below would not test them), and explain names them."""
    for src in CASES:
        text = compiled(src).explain()
        assert "the scan computes on load" in text, text


def test_mamba_forward_computes_no_map():
    """Mamba's generated forward: no softplus, delta * x or D * x in torch
    before the scan or after it (the chunked branch alone computes them);
    the scan is told dt and dt_bias (leaves=) and D (skip=)."""
    import mixerc
    m = mixerc.compile("mamba", backend="triton")
    forward = forward_source(m)
    call = next(ln for ln in forward.splitlines() if "per_channel_scan" in ln and "(" in ln)
    assert "leaves=[dt_in, " in call and "skip=" in call and ", None, decay_rate" in call, call
    top = [ln for ln in forward.splitlines() if not ln.startswith(" " * 8)]
    text = "\n".join(top)
    assert not re.search(r"F\.softplus|delta|\bD \* x|\* x\b", text), text
    assert "if MAP:" in m.source() and "if SKIP:" in m.source()


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_the_op_receives_what_the_user_passed(src, compiled, monkeypatch):
    """The scan's forward op gets x and dt as given (their storage), no decay
    step tensor (dt None: computed from the leaves), the leaves, and the skip's d."""
    m = compiled(src)
    calls = scan_ops(m, monkeypatch)
    args = on_device(args_of(m), torch.float32)
    with torch.no_grad():
        m(**args)
    (what, (q, k, v, dt, a, state, *cfg)), = calls
    seg, leaves, mapped, skip, out_dtype = cfg[2:]
    assert what == "fwd" and dt is None and mapped and a.shape == (6, 4)
    assert out_dtype == torch.float32  # (y stored in a half input's dtype: float32 here)
    assert leaves[0].data_ptr() == args["dt"].data_ptr() and leaves[0].shape == (2, 29, 6)
    assert v.data_ptr() == args["x"].data_ptr()  # the values (or their raw factor) as given
    assert (skip is not None) == ("D * x" in src or src == "mamba")


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_forward_equals_dense(src, compiled, monkeypatch, bf16_dots, poisoned):
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=2, T=37)
    want = d(**args)
    calls = scan_ops(m, monkeypatch)
    with torch.no_grad():
        y = m(**on_device(args, torch.float32))
        assert not y.isnan().any() and rel_err(y.cpu(), want) < 1e-5
        y = m(**on_device(args, torch.bfloat16))
        assert y.dtype == torch.bfloat16 and rel_err(y.float().cpu(), want) < 2e-2
        assert [c[0] for c in calls] == ["fwd", "fwd"]  # the scan ran (not a decode step)
        assert rel_err(m(**on_device(args, f64)).cpu(), want) < 1e-9  # the torch code


def grads(m, args, dtype, weights, **kw):
    """(y, {name: gradient}) of sum(y * weights), everything requiring a gradient."""
    dev = {n: x.detach().requires_grad_(True) for n, x in on_device(args, dtype).items()}
    y = m(**dev, **kw)
    (y.to(f64) * weights.to(DEVICE)).sum().backward()
    return y, {n: x.grad for n, x in dev.items()}


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_every_gradient_equals_dense(src, compiled, monkeypatch, poisoned):
    """T = 150: three checkpoint segments (64 + 64 + 22), batch 2."""
    m, d = compiled(src), compiled(src, "dense")
    calls = scan_ops(m, monkeypatch)
    torch.manual_seed(0)
    assert_gradients_equal_dense(m, d, args_of(m, B=2, T=150, seed=3))
    assert [c[0] for c in calls] == ["fwd", "bwd"]  # the scan both ways


def test_mamba_gradients_bf16(compiled, bf16_dots):
    m, d = compiled("mamba"), compiled("mamba", "dense")
    args = args_of(m, B=1, T=40, seed=4)
    w = torch.randn(d(**args).shape, dtype=f64, generator=torch.Generator().manual_seed(1))
    _, got = grads(m, args, torch.bfloat16, w)
    _, want = grads(d, args, f64, w)
    for n in args:
        assert rel_err(got[n].float().cpu(), want[n]) < 3e-2, n


def test_mamba_gradients_float64_take_the_torch_code(compiled, monkeypatch):
    m, d = compiled("mamba"), compiled("mamba", "dense")
    args = args_of(m, B=2, T=21, seed=5)
    w = torch.randn(d(**args).shape, dtype=f64, generator=torch.Generator().manual_seed(2))
    calls = scan_ops(m, monkeypatch)
    _, got = grads(m, args, f64, w)
    _, want = grads(d, args, f64, w)
    assert calls == []
    for n in args:
        assert rel_err(got[n].cpu(), want[n]) < 1e-9, n


@pytest.mark.parametrize("src", ["mamba", CASES[1]], ids=["mamba", "mapped0"])
def test_prefill_then_decode(src, compiled, monkeypatch, poisoned):
    """A prefill and a block from its state (the scan, maps on load), then
    decode steps (the scan's forward kernel launched directly, maps and skip
    on load: tests/test_triton_scan_decode.py), equal dense."""
    m = compiled(src)
    args = args_of(m, B=2, T=43, seed=7)
    want = compiled(src, "dense")(**args)
    calls = scan_ops(m, monkeypatch)
    with torch.no_grad():
        assert_prefill_then_decode(m, to_device(args, torch.float32), want, 20, 40, tol=1e-5)
    assert [c[0] for c in calls] == ["fwd", "fwd"]  # the steps: not the op


def test_short_call_with_gradient_and_state(compiled, monkeypatch):
    """A few tokens with a gradient (not a decode step) after a prefill's
    state: the scan both ways, every gradient equal dense over the whole."""
    m, d = compiled("mamba"), compiled("mamba", "dense")
    full = args_of(m, B=2, T=12, seed=8)
    cut = lambda sl: {n: x[:, sl] if x.dim() >= 3 else x for n, x in full.items()}  # noqa: E731
    with torch.no_grad():
        _, s0 = m(**on_device(cut(slice(0, 7)), torch.float32), return_state=True)
    w = torch.randn(2, 5, 6, dtype=f64, generator=torch.Generator().manual_seed(3))
    calls = scan_ops(m, monkeypatch)
    y, got = grads(m, cut(slice(7, 12)), torch.float32, w, initial_state=s0)
    assert [c[0] for c in calls] == ["fwd", "bwd"]
    y_ref, want = grads(d, full, f64, torch.cat([torch.zeros(2, 7, 6, dtype=f64), w], 1))
    assert rel_err(y.cpu(), y_ref[:, 7:]) < 1e-5
    for n, x in full.items():
        if x.dim() >= 3:  # the tokens' (the params' own include the prefix's part)
            assert rel_err(got[n].cpu(), want[n][:, 7:]) < 1e-4, n


@pytest.mark.parametrize("src", ["mamba", CASES[4]], ids=["mamba", "mapped21"])
def test_chunked_kernels_for_the_same_term(src, monkeypatch, poisoned):
    """The algorithm knob forcing the per-channel chunks: they compute delta,
    delta * x and the skip in torch (no maps) and still equal dense, forward
    and every gradient."""
    m = compiled_mixers(algorithm="chunks")(src)
    d = compiled_mixers()(src, "dense")
    calls = scan_ops(m, monkeypatch)
    args = args_of(m, B=2, T=45, seed=11)
    w = torch.randn(d(**args).shape, dtype=f64, generator=torch.Generator().manual_seed(4))
    y, got = grads(m, args, torch.float32, w)
    assert calls == []  # not the scan
    y_ref, want = grads(d, args, f64, w)
    assert rel_err(y.cpu(), y_ref) < 1e-4
    for n in args:
        assert rel_err(got[n].cpu(), want[n]) < 1e-4, n


def test_h3_skip_in_the_scan(compiled, monkeypatch, poisoned):
    """H3's K @ u + D * u: no maps (u is computed in torch: a conv), the skip
    term added in the scan's epilogue from the value it reads; forward and
    every gradient equal dense."""
    m, d = compiled("h3"), compiled("h3", "dense")
    forward = forward_source(m)
    call = next(ln for ln in forward.splitlines() if "per_channel_scan" in ln and "(" in ln)
    assert "skip=" in call and "leaves=" not in call, call
    calls = scan_ops(m, monkeypatch)
    args = make_inputs("h3", B=2, T=40, seed=12)
    with torch.no_grad():
        y = m(**to_device(args, torch.float32))
    (what, (*_, leaves, mapped, skip, _)), = calls
    assert not mapped and skip is not None
    assert rel_err(y.cpu(), d(**args)) < 1e-5
    torch.manual_seed(1)
    assert_gradients_equal_dense(m, d, args)
    assert [c[0] for c in calls[1:]] == ["fwd", "bwd"]


def test_constant_values_scale(compiled, monkeypatch):
    """Values scaled by a constant (M @ (0.5 * x)): a map without leaves (a
    number in torch) in the kernel, a decode step and the backward."""
    src = mapped_program(3).replace("scanmap_3", "half_scale").replace("M @ (x)", "M @ (0.5 * x)")
    m, d = compiled(src), compiled(src, "dense")
    calls = scan_ops(m, monkeypatch)
    for T in (3, 37):  # a decode step, the scan
        args = args_of(m, T=T, seed=T)
        with torch.no_grad():
            assert rel_err(m(**to_device(args, torch.float32)).cpu(), d(**args)) < 1e-5, T
    assert [c[0] for c in calls] == ["fwd"] and calls[0][1][-3]  # mapped (then skip, out_dtype)
    torch.manual_seed(2)
    assert_gradients_equal_dense(m, d, args_of(m, T=37, seed=6))
