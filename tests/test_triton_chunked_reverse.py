"""The backward's dk and dv runs on reversed time, read and written in place
by the chunked kernels (REVERSE, runtime/torch/autograd.py): equal to the
same kernels on the flipped, front-padded copies the torch path builds
(their chunk states too), T not a multiple of the chunk, q, k and v at
different heads, an initial state; a bf16 backward of the standard mixers
makes no such copy, and the gradients that need nothing more come out of
the kernels in the inputs' dtype (no float32 gradient converted after)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, compiled_mixers, rel_err, torch_ops_of
from reference import make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


def run_of(m):
    """The module's chunked run function (q, k, v, a, state, chunk, config...)."""
    import inspect
    mod = m._impl.module
    return next(f for n, f in vars(mod).items() if n.startswith("chunked_kernel")
                and inspect.isfunction(f) and "decode" in inspect.signature(f).parameters)


@pytest.mark.parametrize("T", [16, 35, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reversed_in_place_equals_the_flipped_copies(T, dtype, compiled, bf16_dots, poisoned):
    fn = run_of(compiled("ssd"))
    g = torch.Generator().manual_seed(T)
    B, H, K, V, C = 2, 4, 20, 12, 16
    r = lambda *s: torch.randn(*s, dtype=f64, generator=g)  # noqa: E731
    q, k, v = (r(B, T, 1, K), r(B, T, 2, K), r(B, T, H, V))
    q, k, v = (x.to(dtype).to(DEVICE) for x in (q, k, v))
    a = (-torch.rand(B, T, H, dtype=f64, generator=g)).float().to(DEVICE)
    S0 = r(B, H, K, V).float().to(DEVICE)
    pad = -(-T // C) * C - T
    rev = lambda x: F.pad(x.flip(1), (0, 0) * (x.dim() - 2) + (pad, 0))  # noqa: E731
    b = F.pad(a.flip(1)[:, :-1], (0, 0, 1 + pad, 0))
    want = fn(rev(q), rev(k), rev(v), b, S0, C, 16, 16, 4, 2, chunk_states=True)
    got = fn(q, k, v, a, S0, C, 16, 16, 4, 2, chunk_states=True, reverse=True)
    assert got[0].shape == (B, T, H, V) and not got[0].isnan().any()
    assert rel_err(got[0].cpu(), want[0][:, pad:].flip(1).cpu()) < 1e-6
    for x, y in zip(got[1:], want[1:]):  # the final state, the states entering the chunks
        assert x.shape == y.shape and rel_err(x.cpu(), y.cpu()) < 1e-6


def test_reverse_is_refused_off_the_kernels(compiled):
    fn = run_of(compiled("retnet"))
    x = torch.randn(1, 5, 2, 8, dtype=f64)
    with pytest.raises(ValueError, match="kernels only"):
        fn(x, x, x, None, None, 16, 16, 16, 4, 2, reverse=True)


@pytest.mark.parametrize("name", ["retnet", "ssd", "linear_attention"])
def test_bf16_backward_flips_nothing_and_converts_no_gradient(name, compiled, bf16_dots):
    m, d = compiled(name), compiled(name, "dense")
    args = make_inputs(name, B=2, T=37)
    xs = {n: t.to(torch.bfloat16 if t.dim() >= 3 else torch.float32).to(DEVICE)
          .requires_grad_() for n, t in args.items()}
    y = m(**xs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    ops = torch_ops_of(lambda: y.backward(dy))
    big = (2, 37)  # [B, T, ...]: a tensor with a row per token
    copies = [o for o in ops if o[0] in ("flip", "constant_pad_nd") and o[1][0][0][:2] == big]
    assert not copies, copies
    narrowed = [o for o in ops if o[0] == "_to_copy" and o[1][0][1] == torch.float32
                and o[2] == torch.bfloat16 and len(o[1][0][0]) == 4]
    if name in ("retnet", "ssd"):  # dq, dk and dv need nothing more: stored in bf16 by
        # the kernels, or (SSD's B and C at 2 groups of 4 heads) summed over a group's
        # float32 per-head gradients into bf16 by the sum itself
        assert not narrowed, narrowed
    if name == "linear_attention":  # the quotient's gradient [dn, dm, 0, 0] (V = 5: 8
        # columns) is written in bf16 once, not converted by each run that reads it
        assert not [o for o in narrowed if o[1][0][0][-1] == 8], narrowed
        # and made from dy as given: the output is the kernels' quotient itself,
        # not a slice of [n / m, m] converted to bf16 (whose backward widened dy
        # to float32 and padded it with the normalizer's zero column)
        touched = [o for o in ops if o[0] in ("_to_copy", "slice_backward", "constant_pad_nd")
                   and any(shape == tuple(dy.shape) for shape, _ in o[1])]
        assert not touched, touched
    ref = {n: t.clone().requires_grad_() for n, t in args.items()}
    want = dict(zip(ref, torch.autograd.grad((d(**ref) * dy.double().cpu()).sum(),
                                             list(ref.values()))))
    for n, t in xs.items():
        assert t.grad.dtype == t.dtype and rel_err(t.grad.double().cpu(), want[n]) < 3e-2, n
