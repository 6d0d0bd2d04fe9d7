"""The Triton backend's softmax kernels against the dense interpreter: the
standard library's softmax mixers, the named variants (ALiBi with grouped
heads, soft-capping, prefix-LM, documents) and random score-mod / mask
programs; forward in float32 (< 1e-4), float16 and bfloat16 (< 2e-2; bf16
through the test-only dot patch), gradients of every input and param,
prefill and decode, T not a multiple of the blocks, batch > 1, grouped
heads, varlen; outputs poisoned before the kernels write. Without a GPU the
kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import math

import pytest
import torch
from conftest import (DEVICE, assert_gradients_equal_dense, assert_prefill_then_decode,
                      compiled_mixers, rel_err)

import mixerc
from test_plan_classes import FIXED, HEAD, inputs, instances, softmax_program

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

SOFTMAX = FIXED[:4] + instances(softmax_program, 8, 11)
# blocks that do not divide T (16: the smallest tl.dot takes); several key blocks per row
SMALL = {"block_q": 32, "block_k": 16, "bwd_block_q": 16, "bwd_block_k": 32}


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(**SMALL)


def on_device(args, dtype=None, mm_dtype=None):
    """Inputs on the test device: q, k, v in mm_dtype, the rest in dtype."""
    out = {}
    for n, x in args.items():
        t = mm_dtype if (mm_dtype is not None and n in ("q", "k", "v")) else dtype
        out[n] = x.to(device=DEVICE, dtype=t or x.dtype)
    return out


def test_flash_terms_run_on_triton_kernels(compiled):
    m = compiled(FIXED[0])
    text = m.explain()
    assert "plan (triton backend)" in text and "runs on: Triton kernels" in text
    src = m.source()
    assert "@triton.jit" in src and "_fwd(" in src and "_bwd_dkv(" in src


@pytest.mark.parametrize("src", SOFTMAX, ids=range(len(SOFTMAX)))
def test_forward_equals_dense(src, compiled, bf16_dots):
    m, d = compiled(src), compiled(src, "dense")
    args = inputs(m, B=2, T=37, seed=1)
    want = d(**args)
    y = m(**on_device(args, torch.float32))
    assert y.dtype == torch.float32 and rel_err(y.cpu(), want) < 1e-4
    for half in (torch.float16, torch.bfloat16):
        y = m(**on_device(args, half))
        assert y.dtype == half and rel_err(y.cpu(), want) < 2e-2, half


@pytest.mark.parametrize("src", SOFTMAX, ids=range(len(SOFTMAX)))
def test_gradients_equal_dense(src, compiled):
    m, d = compiled(src), compiled(src, "dense")
    base = inputs(m, T=21, seed=2)
    assert_gradients_equal_dense(m, d, base, wrt=[n for n in base if n != "doc"])


@pytest.mark.parametrize("src", SOFTMAX[:6], ids=range(6))
def test_prefill_and_decode_equal_dense(src, compiled):
    m, d = compiled(src), compiled(src, "dense")
    if not m.causal:
        return
    args = inputs(m, T=37, seed=3)
    want = d(**args)
    assert_prefill_then_decode(m, on_device(args, torch.float32), want, 20, 33)


@pytest.mark.parametrize("name", ["attention", "sliding_window"])
def test_standard_library(name, compiled, bf16_dots):
    """The shipped softmax mixers at D = 64 (a power of two: no padded
    columns), T = 100, batch 2, fp32 / bf16, and a decode that continues
    past the window."""
    m, d = compiled(name), compiled(name, "dense")
    g = torch.Generator().manual_seed(0)
    H, D, T = 2, 64, 100
    args = {n: torch.randn(2, T, H, D, dtype=f64, generator=g) * (0.3 if n != "v" else 1)
            for n, _ in m.signature.inputs}
    want = d(**args)
    assert rel_err(m(**on_device(args, torch.float32)).cpu(), want) < 1e-4
    assert rel_err(m(**on_device(args, torch.bfloat16)).cpu(), want) < 2e-2
    x = on_device(args, torch.float32)
    _, state = m(**{n: v[:, :90] for n, v in x.items()}, return_state=True)
    for t in range(90, 100):
        yt, state = m.step(state, **{n: v[:, t] for n, v in x.items()})
        assert rel_err(yt.cpu(), want[:, t]) < 1e-4, t


def test_varlen_equals_dense_per_sequence(compiled):
    m, d = compiled(FIXED[0]), compiled(FIXED[0], "dense")
    args = inputs(m, B=1, T=50, seed=4)
    offsets = [0, 7, 30, 50]
    y = m(**on_device(args, torch.float32),
          cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=DEVICE))
    tokens = set(m.program.inputs)
    for a, b in zip(offsets, offsets[1:]):
        want = d(**{n: (x[:, a:b] if n in tokens else x) for n, x in args.items()})
        assert rel_err(y[:, a:b].cpu(), want) < 1e-4


def test_every_output_element_is_written(compiled, poisoned):
    """torch.empty poisoned with NaN: a kernel that skipped an element (a row
    past a block edge, an empty row) would leave NaN behind."""
    src = HEAD.format(kh="G", body="  out y = softmax(q @ k^T, mask = 3 <= t - s < 9) @ v")
    m, d = compiled(src), compiled(src, "dense")
    args = inputs(m, T=29, seed=5)
    got = {n: x.float().to(DEVICE).requires_grad_(n in ("q", "k", "v")) for n, x in args.items()}
    y = m(**got)
    assert not y.isnan().any() and rel_err(y.detach().cpu(), d(**args)) < 1e-4
    y.sum().backward()
    for n in ("q", "k", "v"):
        assert not got[n].grad.isnan().any(), n


def test_gqa_keys_stay_at_group_heads(compiled, monkeypatch):
    """The kernels get K and V at G heads (never repeated to H)."""
    src = FIXED[0]
    m = compiled(src)
    seen = []
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.endswith("_op"))
    real_op = getattr(mod, op)

    def spy(q, k, v, *rest):
        seen.append((q.shape[2], k.shape[2], v.shape[2]))
        return real_op(q, k, v, *rest)
    monkeypatch.setattr(mod, op, spy)  # the host wrapper looks the op up when called
    m(**on_device(inputs(m, T=40), torch.float32))  # T * H / G > 64 rows: not a decode launch
    assert seen and all(s == (4, 2, 2) for s in seen), seen


def test_cpu_tensors_without_the_interpreter_are_refused(compiled, monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors run the kernels")
    m = compiled(FIXED[0])
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(mixerc.MixerUnsupportedError, match="CUDA tensors"):
        m(**on_device(inputs(m, T=5), torch.float32))


def test_other_terms_run_on_the_torch_backend():
    """A softmax (flash kernels), a scalar decay (the chunked kernel) and a
    decay on a band (no Triton kernel yet: the torch backend) in one matrix."""
    src = HEAD.format(kh="H", body="  out y = (softmax(q @ k^T, mask = s <= t) + "
                                   "decay(-softplus(u)) * (q @ k^T) + "
                                   "decay(-softplus(w)) * (q @ k^T) * (t - s < 6)) @ v")
    m, d = mixerc.compile(src, backend="triton"), mixerc.compile(src, backend="dense")
    text = m.explain()
    assert "runs on: Triton kernels" in text and "runs on: two Triton kernels" in text
    assert "runs on: the torch backend" in text
    args = inputs(m, T=23, seed=6)
    assert rel_err(m(**on_device(args, torch.float32)).cpu(), d(**args)) < 1e-4


def test_custom_op_opcheck_and_torch_compile(compiled):
    m = compiled(FIXED[1])
    mod = m._impl.module
    op = next(getattr(mod, n) for n in vars(mod) if n.endswith("_op"))
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 20, 2, 16
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    q, k, v = (r(B, T, H, D).requires_grad_() for _ in range(3))
    heads = (torch.rand(1, H, generator=g) + 1).to(DEVICE).requires_grad_()
    rows, cols = torch.zeros(0, B, T, H, device=DEVICE), torch.zeros(0, B, 1, 1, device=DEVICE)
    args = (q, k, v, rows, cols, heads, 0, 0, 0.0, math.inf, 16, 16, 4, 1, 16, 32, 4, 1)
    torch.library.opcheck(op, args)
    layer = m.module(H=4, G=2, D=3, V=2, device=DEVICE)
    x = on_device(inputs(m, T=17), torch.float32)
    x = {n: t for n, t in x.items() if n in dict(m.signature.inputs)}
    want = layer(**x)
    fast = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert rel_err(fast(**x), want) < 1e-6
    with torch.no_grad():  # a short input without gradients: eager takes the decode kernel,
        assert rel_err(fast(**x), want) < 1e-6  # a trace the custom op
