"""The torch backend on an accelerator (CUDA) against the dense interpreter on
the CPU: the same program, generated once, has to give the same numbers on
any device torch supports.

These tests need a GPU. Without one they are reported as skipped (never as
passed); CI has no GPU, so they run where one is lent (see
benchmarks/RESULTS.md for the last run). MIXERC_TEST_DEVICE=cpu runs them on
the CPU, to check the tests themselves.
"""

import os

import mixerc
import pytest
import torch
from conftest import CAUSAL, STDLIB, rel_err
from reference import make_inputs
from test_long_sequences import inputs as long_inputs

f64 = torch.float64


def _device() -> str | None:
    want = os.environ.get("MIXERC_TEST_DEVICE")
    if want:
        return want
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _device()
pytestmark = [pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set "
                                                         "MIXERC_TEST_DEVICE to run these elsewhere)"),
              pytest.mark.usefixtures("fresh_cache")]
LENGTHS = {"sliding_window": 100}


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """TF32 (10-bit mantissa) would make float32 results ~1e-3 off; a user who
    turns it on accepts that, the float32 tolerance below does not."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def on(args, dtype=None):
    return {k: v.to(device=DEVICE, dtype=dtype or v.dtype) for k, v in args.items()}


def poisoned_like(y):
    return torch.full_like(y, float("nan"))


@pytest.mark.parametrize("name", STDLIB)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_forward_equals_dense(name, dtype, tol, compiled):
    T = LENGTHS.get(name, 77)  # not a multiple of any chunk length; batch 2, groups 2
    args = make_inputs(name, B=2, T=T, seed=31)
    ref = compiled(name, "dense")(**args)
    y = compiled(name)(**on(args, dtype))
    assert y.device.type == torch.device(DEVICE).type and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref) < tol


@pytest.mark.parametrize("name", STDLIB)
def test_bfloat16_inputs(name, compiled):
    """bf16 in, bf16 out, computed in float32: compared with dense on the
    bf16-rounded inputs, the error is the output's rounding (2^-8) and little more."""
    T = LENGTHS.get(name, 77)
    args = {k: v.to(torch.bfloat16) for k, v in make_inputs(name, B=2, T=T, seed=32).items()}
    ref = compiled(name, "dense")(**{k: v.to(f64) for k, v in args.items()})
    y = compiled(name)(**on(args))
    assert y.dtype == torch.bfloat16
    assert rel_err(y.cpu(), ref) < 1e-2


@pytest.mark.parametrize("name", CAUSAL)
def test_step_and_prefill_on_device(name, compiled):
    T, cut = LENGTHS.get(name, 45), 29
    m = compiled(name)
    args = on(make_inputs(name, B=2, T=T, seed=33))
    seq = lambda a, b: {k: (v[:, a:b] if k in m.program.inputs else v)  # noqa: E731
                        for k, v in args.items()}
    y = m(**args)
    y1, state = m(**seq(0, cut), return_state=True)
    assert all(v.device.type == y.device.type for v in state.tensors.values()
               if isinstance(v, torch.Tensor))
    y2 = m(**seq(cut, T), initial_state=state)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12
    outs, st = [], state
    for t in range(cut, T):
        yt, st = m.step(st, **{k: (v[:, t] if k in m.program.inputs else v)
                               for k, v in args.items()})
        outs.append(yt)
    assert rel_err(torch.stack(outs, 1), y[:, cut:]) < 1e-12
    st = None
    for t in range(3):
        yt, st = m.step(st, **{k: (v[:, t] if k in m.program.inputs else v)
                               for k, v in args.items()})
        assert rel_err(yt, y[:, t]) < 1e-12


@pytest.mark.parametrize("name", STDLIB)
def test_gradients_equal_dense(name, compiled):
    args = {k: v.requires_grad_() for k, v in make_inputs(name, B=2, T=21, seed=34).items()}
    y_ref = compiled(name, "dense")(**args)
    w = torch.randn(y_ref.shape, dtype=f64, generator=torch.Generator().manual_seed(7))
    ref = torch.autograd.grad((y_ref * w).sum(), list(args.values()))
    dev = {k: v.detach().to(DEVICE).requires_grad_() for k, v in args.items()}
    y = compiled(name)(**dev)
    got = torch.autograd.grad((y * w.to(DEVICE)).sum(), list(dev.values()), allow_unused=True)
    for n, g, r in zip(args, got, ref):
        assert g is not None, f"{name}: no gradient for {n}"
        assert g.device.type == torch.device(DEVICE).type
        assert rel_err(g.cpu(), r) < 1e-8, n


@pytest.mark.parametrize("name", ["ssd", "gla", "mamba", "retnet"])
@pytest.mark.parametrize("log_decay", [-5.0, -1e-4])
def test_float32_at_16k(name, log_decay, compiled):
    """Strong and weak decays over 16k steps: float32 on the device stays finite
    and close to float64 (which equals dense: test_long_sequences)."""
    args = on(long_inputs(name, 16384 + 37, log_decay, seed=3))
    m = compiled(name)
    y64 = m(**args)
    y32 = m(**on(args, torch.float32))
    assert torch.isfinite(y32).all()
    assert rel_err(y32, y64) < 1e-4


@pytest.mark.parametrize("name", ["ssd", "attention", "gated_conv", "h3"])
def test_varlen_on_device(name, compiled):
    m = compiled(name)
    args = on(make_inputs(name, B=1, T=60, seed=35))
    cu = torch.tensor([0, 7, 26, 27, 60], device=DEVICE)
    y, states = m(**args, cu_seqlens=cu, return_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = m(**{k: (v[:, a:b] if k in m.program.inputs else v) for k, v in args.items()})
        assert rel_err(y[:, a:b], alone) < 1e-12
        assert states[i].length == b - a


@pytest.mark.parametrize("name", ["ssd", "gla", "attention"])
def test_module_on_device_and_torch_compile(name, compiled):
    m = compiled(name)
    sizes = {"ssd": dict(H=4, P=8, N=16, G=2), "gla": dict(H=2, K=16, V=8),
             "attention": dict(H=4, G=2, D=16)}[name]
    mod = m.module(**sizes, seed=3).to(DEVICE)
    from mixerc.inputs import random_inputs
    args = random_inputs(m.program, sizes, 2, 300, seed=4, device=DEVICE)
    args = {k: v for k, v in args.items() if k in m.program.inputs}
    y = mod(**args)
    params = {n: p.detach().cpu().double() for n, p in mod.named_parameters()}
    ref = compiled(name, "dense")(**{k: v.cpu().double() for k, v in args.items()}, **params)
    assert rel_err(y.cpu(), ref) < 1e-4
    fast = torch.compile(mod, fullgraph=True)  # inductor: Triton kernels on a GPU
    assert rel_err(fast(**args), y) < 1e-4
    first = next(iter(args.values())).requires_grad_()
    mod(**args).sum().backward()
    assert first.grad is not None and torch.isfinite(first.grad).all()
    assert all(p.grad is not None and p.grad.device == y.device for p in mod.parameters())


def test_nan_param_on_device_names_the_tensor(compiled):
    """The torch backend checks params (small) for NaN/Inf; inputs are left to
    propagate NaN (a check would cost a device sync per call)."""
    args = on(make_inputs("ssd", B=1, T=9))
    args["A_log"][1] = float("nan")
    with pytest.raises(mixerc.MixerValueError, match="param A_log holds 1 NaN/Inf"):
        compiled("ssd")(**args)


def test_autotune_on_device_then_cache_hit(compiled, monkeypatch):
    from mixerc.autotune import lookup, tune
    m = compiled("ssd")
    problem = m.tuning_problem(dict(B=1, T=1024, H=4, P=16, N=16, G=1), device=DEVICE)
    r = tune(problem)
    assert r.benchmarks_run > 0 and r.best is not None
    from mixerc.autotune.cache import Cache
    fields = Cache.from_env().load(r.key).fields
    assert fields["device"]["type"] == torch.device(DEVICE).type
    assert lookup(problem) == r.best
    again = tune(problem)
    assert again.benchmarks_run == 0 and again.best == r.best
