"""The decode kernels store y in the mixer's output dtype: a decode step of
the chunked scalar-decay family (linear attention, RetNet, SSD:
templates/triton_chunked.py.jinja `_decode_kernel`), of the per-channel
scan (Mamba-1: templates/triton_scan.py.jinja `_decode`) and of the
recurrence kernel (GLA: runtime/triton/recurrent.py `_mx_recurrent_step`)
accumulates in float32 and stores y in the inputs' dtype when y is the
mixer's output as is (codegen/triton/terms/output.py writes_output), as
the chunked forward's output kernel does with `out_dtype`: no float32 y is
written and then converted by another launch (twice the bytes per step at
bf16).

For each standard mixer with a decode kernel, in bf16 (params float32, as
the binder takes them for half inputs): a prefill, single-token steps and a
block of tokens from the state (a decode step too); the decode kernel's Y is
a bf16 buffer, no float32 tensor of the output's size is converted to bf16
after it (torch ops recorded), the step returns bf16, and its values equal
the dense float64 interpreter's on the same bf16-rounded inputs within
bf16's error, outputs poisoned. float32 steps still equal dense to 1e-4,
their y float32. Kernels run in Triton's CPU interpreter (conftest)."""

import pytest
import torch
from conftest import compiled_mixers, rel_err, to_device
from reference import make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

# mixer -> the decode kernel a step launches (a prefix of its name)
DECODE = {"linear_attention": "chunked_kernel", "retnet": "chunked_kernel",
          "ssd": "chunked_kernel", "gla": "_mx_recurrent_step", "mamba": "per_channel_scan"}
B, T, PREFILL = 2, 24, 18  # the prefill (> 16 tokens) runs the chunk kernels / the scan


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(chunk=16, block_k=16, block_v=16)


@pytest.fixture
def ys(monkeypatch):
    """(kernel name, dtype of its Y argument) of every Triton launch, in order."""
    from triton.runtime.jit import KernelInterface
    out = []
    real = KernelInterface.__getitem__

    def spied(self, grid):
        launch = real(self, grid)

        def run(*a, **k):
            y = dict(zip(self.arg_names, a), **k).get("Y")
            out.append((self.fn.__name__, None if y is None else y.dtype))
            return launch(*a, **k)
        return run
    monkeypatch.setattr(KernelInterface, "__getitem__", spied)
    return out


class _Converts(TorchDispatchMode):
    """The float32 -> half conversions (aten._to_copy) of at least `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(args[0]) and \
                args[0].dtype == torch.float32 and \
                kwargs.get("dtype") in (torch.bfloat16, torch.float16) and \
                args[0].numel() >= self.numel:
            self.seen.append((tuple(args[0].shape), kwargs["dtype"]))
        return func(*args, **kwargs)


def _split(m, x):
    tokens = set(m.program.inputs)
    return (lambda a, b: {n: (v[:, a:b] if n in tokens else v) for n, v in x.items()},
            lambda t: {n: (v[:, t] if n in tokens else v) for n, v in x.items()})


def _inputs(name, dtype):
    """(the mixer's inputs on the device: tokens in `dtype`, params float32;
    the same values in float64 for dense)."""
    args = make_inputs(name, B=B, T=T, seed=5)
    tokens = {n for n, v in args.items() if v.dim() >= 3}
    x = {n: v if n in tokens else v.float() for n, v in to_device(args, dtype).items()}
    return x, {n: v.cpu().to(f64) for n, v in x.items()}


def _steps(m, x, ys, check):
    """A prefill of PREFILL tokens, two single-token steps, then a block of
    the rest from the state: check(y, t0, t1, kernels) for each step."""
    block, step = _split(m, x)
    with torch.no_grad():
        _, state = m(**block(0, PREFILL), return_state=True)
        for t in (PREFILL, PREFILL + 1):
            del ys[:]
            y, state = m.step(state, **step(t))
            check(y, t, t + 1, list(ys))
        del ys[:]
        y, state = m(**block(PREFILL + 2, T), initial_state=state, return_state=True)
        check(y, PREFILL + 2, T, list(ys))


@pytest.mark.parametrize("name", list(DECODE))
def test_bf16_steps_store_y_in_bf16(name, compiled, ys, bf16_dots, poisoned):
    m, d = compiled(name), compiled(name, "dense")
    x, ref = _inputs(name, torch.bfloat16)
    want = d(**ref)

    def check(y, t0, t1, kernels):
        decodes = [dt for k, dt in kernels if k.startswith(DECODE[name])]
        assert len(kernels) == 1 and decodes == [torch.bfloat16], (t0, kernels)
        assert y.dtype == torch.bfloat16
        got = y if y.dim() == want.dim() else y[:, None]
        assert not got.isnan().any() and rel_err(got.float().cpu(), want[:, t0:t1]) < 2e-2, t0
    _steps(m, x, ys, check)


@pytest.mark.parametrize("name", list(DECODE))
def test_bf16_step_converts_no_float32_output(name, compiled):
    """No float32 tensor of the output's size is converted to bf16 in a
    decode step (the float32 y a decode kernel used to return)."""
    m = compiled(name)
    x, _ = _inputs(name, torch.bfloat16)
    block, step = _split(m, x)
    with torch.no_grad():
        _, state = m(**block(0, PREFILL), return_state=True)
        y = m.step(state, **step(PREFILL))[0]
        record = _Converts(y.numel())
        with record:
            y, _ = m.step(state.clone(), **step(PREFILL))
    assert y.dtype == torch.bfloat16 and record.seen == [], record.seen


@pytest.mark.parametrize("name", list(DECODE))
def test_float32_steps_unchanged(name, compiled, ys, poisoned):
    m, d = compiled(name), compiled(name, "dense")
    x, ref = _inputs(name, torch.float32)
    want = d(**ref)

    def check(y, t0, t1, kernels):
        assert [dt for k, dt in kernels if k.startswith(DECODE[name])] == [torch.float32]
        got = y if y.dim() == want.dim() else y[:, None]
        assert y.dtype == torch.float32 and rel_err(got.cpu(), want[:, t0:t1]) < 1e-4, t0
    _steps(m, x, ys, check)


@pytest.fixture(scope="module")
def chunks():
    return compiled_mixers(algorithm="chunks")


@pytest.mark.parametrize("name,dtype", [("gla", torch.bfloat16), ("mamba", torch.float32)])
def test_the_chunks_arm_steps(name, dtype, chunks, ys, bf16_dots, poisoned):
    """The per-channel chunked arm's decode step (the recurrence kernel):
    GLA's y is its output as is (bf16); Mamba's gets its skip term added by
    torch after the kernel, so its y stays float32 until then."""
    m, d = chunks(name), chunks(name, "dense")
    x, ref = _inputs(name, torch.bfloat16)
    want = d(**ref)

    def check(y, t0, t1, kernels):
        assert [dt for k, dt in kernels] == [dtype], (t0, kernels)
        got = y if y.dim() == want.dim() else y[:, None]
        assert y.dtype == torch.bfloat16 and not got.isnan().any()
        assert rel_err(got.float().cpu(), want[:, t0:t1]) < 2e-2, t0
    _steps(m, x, ys, check)


# y read again after the term (its product with v, in torch): the decode
# kernel's y stays float32
GATED = """mixer gated_linear {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  let M = (q @ k^T) * (s <= t)
  out y = (M @ v) * v
}"""


def test_y_combined_after_the_kernel_stays_float32(compiled, ys, bf16_dots, poisoned):
    m, d = compiled(GATED), compiled(GATED, "dense")
    g = torch.Generator().manual_seed(7)
    args = {n: torch.randn(B, T, 2, 8, generator=g, dtype=f64) for n in ("q", "k", "v")}
    x = to_device(args, torch.bfloat16)
    want = d(**{n: v.cpu().to(f64) for n, v in x.items()})

    def check(y, t0, t1, kernels):
        assert [dt for k, dt in kernels if k.endswith("_decode_kernel")] == [torch.float32]
        got = y if y.dim() == want.dim() else y[:, None]
        assert y.dtype == torch.bfloat16 and not got.isnan().any()
        assert rel_err(got.float().cpu(), want[:, t0:t1]) < 2e-2, t0
    _steps(m, x, ys, check)
