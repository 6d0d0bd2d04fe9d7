"""Toeplitz strategy (codegen/strategies/toeplitz.py, runtime/conv.py) against
the dense interpreter: gated long convs, H3's short conv, kernels over several
dims, band masks, signs, decode state, gradients."""

import mixerc
import pytest
import torch
from conftest import compile_cache, rel_err
from reference import make_inputs

from mixerc.runtime.torch import conv

f64 = torch.float64

MULTI = """mixer multi_conv {
  dims H, P
  input x : [H, P]
  input g : [H]
  kernel h : [H]
  param c : [H]
  out y = g * ((0.5 * c * toeplitz(h)) @ x)
}"""
CONV3 = """mixer conv3 {
  dims E
  input x : [E]
  param w : [E, 3]
  out y = conv(x, w) * x
}"""
BANDED = """mixer banded_conv {
  dims E
  input x : [E]
  kernel h : [E]
  out y = (toeplitz(h) * (t - s >= 2) * (t - s < 30)) @ x
}"""
SIGNED = """mixer signed_conv {
  dims E
  input x : [E]
  kernel h : [E]
  param p : [E]
  out y = (toeplitz(h) - 0.25 * toeplitz(h)) @ x + (-p * toeplitz(h) / 3.0) @ x
}"""
TWO_SIDED = """mixer two_sided_conv {
  dims E
  input x : [E]
  kernel h : [E]
  out y = toeplitz(h)^T @ x + shift(toeplitz(h), 2) @ x
}"""
KERNEL_EXPR = """mixer kernel_expr_conv {
  dims E
  input x : [E]
  kernel h : [E]
  param p : [E]
  out y = toeplitz(relu(h) * p) @ x
}"""
INLINE = {"multi": MULTI, "conv3": CONV3, "banded": BANDED, "signed": SIGNED,
          "two_sided": TWO_SIDED, "kernel_expr": KERNEL_EXPR}


# Own JIT/autotune cache: default configs, so the paths below are the ones the
# tests mean to take (direct for L or T <= 24, FFT beyond).
pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def compiled():
    return compile_cache(INLINE)


def inputs(name, B=2, T=77, L=9, seed=0):
    if name in ("gated_conv", "h3"):
        args = make_inputs(name, B=B, T=T, seed=seed)
        if name == "gated_conv":
            args["h"] = torch.randn(L, 6, generator=torch.Generator().manual_seed(seed),
                                    dtype=f64) / L ** 0.5
        return args
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    if name == "multi":
        return dict(x=r(B, T, 3, 4), g=r(B, T, 3), h=r(L, 3), c=r(3))
    if name == "conv3":
        return dict(x=r(B, T, 5), w=r(5, 3))
    return dict(x=r(B, T, 5), h=r(L, 5), p=r(5)) if name in ("signed", "kernel_expr") else \
        dict(x=r(B, T, 5), h=r(L, 5))


def strategies(m):
    return [mp.strategies for mp in m.plan.matrices]


# ------------------------------------------------------------------ claiming

def test_claims_the_conv_terms(compiled):
    """Fails if the strategy silently stops claiming (dense fallback instead)."""
    assert strategies(compiled("gated_conv")) == [["toeplitz"]]
    h3 = {mp.name: mp.strategies for mp in compiled("h3").plan.matrices}
    assert h3 == {"conv(w_shift)": ["toeplitz"], "K": ["chunked"]}
    for name in INLINE:
        assert all(s == "toeplitz" for ss in strategies(compiled(name)) for s in ss), name
    for name in ("gated_conv", "h3", "multi"):
        src = compiled(name)._impl.generate()[0]  # not source(): the JIT file may sit
        assert "dense_apply" not in src and "causal_conv(" in src  # in another cache dir


def test_group_kernel_on_head_values():
    # the planner expands the kernel from G to H like the values
    src = """mixer group_conv {
      dims H, P, G divides H
      input x : [H, P]
      kernel h : [G]
      out y = toeplitz(h) @ x
    }"""
    m, d = mixerc.compile(src), mixerc.compile(src, backend="dense")
    assert strategies(m) == [["toeplitz"]]
    args = dict(x=torch.randn(2, 20, 4, 2, dtype=f64), h=torch.randn(40, 2, dtype=f64))
    assert rel_err(m(**args), d(**args)) < 1e-12


# ------------------------------------------------------------------ forward

CASES = [("gated_conv", 1), ("gated_conv", 5), ("gated_conv", 17), ("gated_conv", 120),
         ("gated_conv", 77), ("h3", None), ("multi", 50), ("multi", 3), ("conv3", None),
         ("banded", 40), ("signed", 45), ("two_sided", 50), ("kernel_expr", 30)]


@pytest.mark.parametrize("name,L", CASES)
def test_equals_dense(name, L, compiled):
    args = inputs(name, T=77, L=L, seed=1)  # T not a power of two; L = 120 > T
    ref = compiled(name, "dense")(**args)
    y = compiled(name)(**args)
    assert y.dtype == f64 and rel_err(y, ref) < 1e-9
    y32 = compiled(name)(**{k: v.float() for k, v in args.items()})
    assert y32.dtype == torch.float32 and rel_err(y32, ref) < 1e-4


# ------------------------------------------------------------------ decode

def split(m, args, a, b):
    return {k: (v[:, a:b] if k in m.program.inputs else v) for k, v in args.items()}


def token(m, args, t):
    return {k: (v[:, t] if k in m.program.inputs else v) for k, v in args.items()}


@pytest.mark.parametrize("name,L", [("gated_conv", 1), ("gated_conv", 5), ("gated_conv", 60),
                                    ("h3", None), ("multi", 40)])
def test_prefill_continue_and_steps(name, L, compiled, monkeypatch):
    m = compiled(name)
    T, cut = 70, 45  # prefill (FFT for long kernels), continue, then one token at a time
    args = inputs(name, T=T, L=L, seed=2)
    y = m(**args)
    y1, st = m(**split(m, args, 0, cut), return_state=True)
    y2, st2 = m(**split(m, args, cut, 60), initial_state=st, return_state=True)
    key = "conv_w_shift" if name == "h3" else "y"
    lag = 4 if name == "h3" else L
    shape = st.tensors[key].shape
    assert shape[:2] == (2, lag - 1) and st2.tensors[key].shape == shape  # fixed size

    def no_fft(*a):
        raise AssertionError("a decode step must not run an FFT over the history")
    monkeypatch.setattr(conv, "conv_fft", no_fft)
    outs = []
    for t in range(60, T):
        yt, st2 = m.step(st2, **token(m, args, t))
        assert st2.tensors[key].shape == shape
        outs.append(yt)
    assert rel_err(torch.cat([y1, y2] + [o[:, None] for o in outs], 1), y) < 1e-12
    st, outs = None, []
    for t in range(8):
        yt, st = m.step(st, **token(m, args, t))
        outs.append(yt)
    assert rel_err(torch.stack(outs, 1), y[:, :8]) < 1e-12
    assert st.tensors[key].shape == shape


def test_prefill_shorter_than_kernel(compiled):
    m = compiled("gated_conv")
    args = inputs("gated_conv", T=50, L=64, seed=3)
    y = m(**args)
    pieces, st = [], None
    for a, b in [(0, 3), (3, 10), (10, 50)]:  # history partly zeros, then FFT with history
        yp, st = m(**split(m, args, a, b), initial_state=st, return_state=True)
        pieces.append(yp)
        assert st.tensors["y"].shape == (2, 63, 6, 1)
    assert rel_err(torch.cat(pieces, 1), y) < 1e-12


def test_kernel_length_change_is_a_clear_error(compiled):
    m = compiled("gated_conv")
    _, st = m(**inputs("gated_conv", T=10, L=8), return_state=True)
    with pytest.raises(ValueError, match="kernel has 9 taps"):
        m(**inputs("gated_conv", T=10, L=9), initial_state=st)


# ------------------------------------------------------------------ backward

@pytest.mark.parametrize("name,L", [("gated_conv", 4), ("gated_conv", 50), ("h3", None),
                                    ("multi", 45)])
def test_gradients_match_dense_autograd(name, L, compiled):
    args = inputs(name, T=40, L=L, seed=4)  # L = 50 > T = 40 > 24: the FFT path
    for v in args.values():
        v.requires_grad_(True)
    w = torch.randn_like(compiled(name, "dense")(**args))
    ref = torch.autograd.grad((compiled(name, "dense")(**args) * w).sum(), list(args.values()))
    got = torch.autograd.grad((compiled(name)(**args) * w).sum(), list(args.values()))
    for k, a, b in zip(args, got, ref):
        assert rel_err(a, b) < 1e-9, k


# ------------------------------------------------------------------ runtime helpers

def _conv_ref(x, h, T):
    """Last T outputs of the causal conv, straight from the definition."""
    N, L = x.shape[1], h.shape[0]
    y = torch.zeros(x.shape[0], T, *x.shape[2:], dtype=x.dtype)
    for i in range(T):
        for j in range(min(L, N - T + i + 1)):
            y[:, i] += h[j][:, None] * x[:, N - T + i - j]
    return y


@pytest.mark.parametrize("N,T,L", [(37, 37, 5), (37, 37, 60), (50, 13, 38), (20, 1, 20),
                                   (9, 9, 1)])
def test_every_algorithm_is_the_same_conv(N, T, L):
    x, h = torch.randn(2, N, 3, 2, dtype=f64), torch.randn(L, 3, dtype=f64)
    ref = _conv_ref(x, h, T)
    for fn in (conv.conv_taps, conv.conv_windows, conv.conv_fft):
        assert rel_err(fn(x, h, T), ref) < 1e-12, fn.__name__


@pytest.mark.parametrize("block", [1, 450])
def test_fft_in_blocks_of_channels(block, monkeypatch):
    """FFT_BLOCK complex elements per block of channels; here a channel's
    spectra hold 2 * 2 * 37 = 148, so 1 gives blocks of one channel and 450
    blocks of 3, 3 and 1 (of 7)."""
    monkeypatch.setattr(conv, "FFT_BLOCK", block)
    x, h = torch.randn(2, 50, 7, 2, dtype=f64), torch.randn(30, 7, dtype=f64)
    assert conv.fft_size(max(50, 40 + 30 - 1)) // 2 + 1 == 37
    assert rel_err(conv.conv_fft(x, h, 40), _conv_ref(x, h, 40)) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b: conv.conv_fft(a, b, 9),
                                    (x[:1, :12, :3].clone().requires_grad_(),
                                     h[:7, :3].clone().requires_grad_()))


def test_gradcheck_each_algorithm():
    x = torch.randn(1, 12, 2, 2, dtype=f64, requires_grad=True)
    h = torch.randn(7, 2, dtype=f64, requires_grad=True)
    for fn in (conv.conv_taps, conv.conv_windows, conv.conv_fft):
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, 9), (x, h)), fn.__name__


def test_fft_size():
    assert [conv.fft_size(n) for n in (1, 7, 17, 97, 1025, 4095)] == [1, 8, 18, 120, 1152, 4096]
    for n in range(1, 300):
        s = conv.fft_size(n)
        assert n <= s <= 1.25 * n + 1
