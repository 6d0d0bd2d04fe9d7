"""The per-channel scan's backward for a forward that computes its maps on
load (Mamba-1's delta = softplus(dt + dt_bias), the values' scale, the skip
D * x: codegen/triton/terms/scan.py `maps`): one op whose kernel computes
the maps on load again and takes their chain rule on the values it holds
(the template's `_mapped_grad_launch`, runtime/triton/scan.py
MappedScanFn `fused`), so no mapped tensor or its gradient is a torch
tensor. A backward that falls back to recomputing the maps by torch ops
fails here (the op-level check), and every gradient equals the dense float64
interpreter: batch 2, T not a multiple of the checkpoint segment (64), a
nonzero initial state (the state a first call leaves, differentiated
through), float32 and bfloat16 inputs, maps whose chain rule differs from
Mamba's (a separate values' scale, a negated product of a token and a
per-channel factor, abs's masked derivative). Kernels run in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import compiled_mixers, rel_err, torch_ops_of
from reference import make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64

# the values' scale a map of its own (not the decay step): sigmoid(dt) * p, negated
SCALED = """mixer fusedscale {
  dims E, N
  input x : [E]
  input dt : [E]
  input B : [N]
  input C : [N]
  param A_log : [E, N] = log(uniform(1, 4))
  param b : [E] = uniform(0.5, 1.5)
  param p : [E] = uniform(0.5, 1.5)
  param D : [E] = uniform(0.5, 1.5)
  let M = decay(-exp(A_log) * softplus(dt + b)) * (C @ B^T)
  out y = M @ (-(sigmoid(dt) * p * x)) + D * x
}"""

# a decay step with a masked derivative (abs), no skip
ABS = """mixer fusedabs {
  dims E, N
  input x : [E]
  input dt : [E]
  input B : [N]
  input C : [N]
  param A_log : [E, N] = log(uniform(1, 4))
  param p : [E] = uniform(0.5, 1.5)
  let M = decay(-exp(A_log) * (exp(-abs(dt)) * p)) * (C @ B^T)
  out y = M @ (softplus(dt) * x)
}"""

CASES, IDS = ["mamba", SCALED, ABS], ["mamba", "scaled", "abs"]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


def args_of(m, B, T, seed):
    """float64 inputs at E = 6, N = 4, dt around softplus's bend."""
    if m.program.name == "mamba":
        return make_inputs("mamba", B=B, T=T, seed=seed)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    args = dict(x=r(B, T, 6), dt=r(B, T, 6) - 1, B=r(B, T, 4), C=r(B, T, 4),
                A_log=r(6, 4) * 0.5)
    for n in ("b", "p", "D"):
        if n in m.program.params:
            args[n] = r(6) * 0.5 + 1
    return args


def on_device(args, dtype):
    """Token inputs in dtype, params float32; each a leaf requiring a gradient."""
    return {n: x.to(DEVICE, dtype if x.dim() >= 3 else torch.float32).requires_grad_(True)
            for n, x in args.items()}


def split(args, t):
    """(the first t tokens, the rest): token inputs cut, params shared."""
    cut = lambda sl: {n: x[:, sl] if x.dim() >= 3 else x for n, x in args.items()}  # noqa: E731
    return cut(slice(0, t)), cut(slice(t, None))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_gradients_through_a_state_equal_dense(src, dtype, tol, compiled, bf16_dots):
    """Two calls, the second from the state the first leaves (70 + 81
    tokens: neither a multiple of 64), batch 2, differentiated through the
    state (the second call's initial state's gradient is the first's final
    state's): every input's and param's gradient against dense on the whole
    sequence in float64."""
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=2, T=151, seed=11)
    w = torch.randn(2, 151, 6, dtype=f64, generator=torch.Generator().manual_seed(5))
    ref = {n: x.clone().requires_grad_(True) for n, x in args.items()}
    (d(**ref) * w).sum().backward()
    head, tail = split(args, 70)
    dev_head, dev_tail = on_device(head, dtype), on_device(tail, dtype)
    for n in dev_tail:  # the params: one tensor for both calls (their gradients add up)
        if args[n].dim() < 3:
            dev_tail[n] = dev_head[n]
    y0, s0 = m(**dev_head, return_state=True)
    y1 = m(**dev_tail, initial_state=s0)
    assert y1.dtype == dtype
    loss = (y0.to(f64) * w[:, :70].to(DEVICE)).sum() + (y1.to(f64) * w[:, 70:].to(DEVICE)).sum()
    loss.backward()
    for n, x in args.items():
        if x.dim() >= 3:
            got = torch.cat([dev_head[n].grad, dev_tail[n].grad], 1)
        else:
            got = dev_head[n].grad
        assert got.dtype == dev_head[n].dtype, n
        assert rel_err(got.to(f64).cpu(), ref[n].grad) < tol, n


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_the_backward_is_one_op_without_mapped_tensors(src, compiled):
    """The bf16 backward: the fused op runs (once), and no torch op reads a
    float32 tensor of the tokens' [B, T, E] (or [B, T, E, 1]) shape: neither
    the maps (delta, delta * x, D * x) nor their gradients nor a widened dy
    (the forward stores y in bf16, and the kernel widens dy as it loads it).
    The maps' chain rule by torch ops (softplus, sigmoid and their backward,
    the sums over tokens for the params) would put several there."""
    m = compiled(src)
    B, T = 2, 37
    xs = on_device(args_of(m, B=B, T=T, seed=2), torch.bfloat16)
    y = m(**xs)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    ops = torch_ops_of(lambda: y.backward(dy))
    fused = [name for name, _, _ in ops if name.endswith("_mapped_bwd")]
    assert len(fused) == 1, [name for name, _, _ in ops]
    tokens = {(B, T, 6), (B, T, 6, 1)}
    wide = [(name, args) for name, args, _ in ops
            if any(s in tokens and dt == torch.float32 for s, dt in args)]
    assert wide == [], wide
    assert not {"softplus", "softplus_backward", "sigmoid", "sigmoid_backward"} & \
        {name for name, _, _ in ops}
    assert all(torch.isfinite(x.grad).all() for x in xs.values())


def test_float64_keeps_the_torch_formula(compiled):
    """float64 runs the torch code (the chunked branch's): no scan op, the
    maps' chain rule by autograd, equal dense."""
    m, d = compiled("mamba"), compiled("mamba", "dense")
    args = args_of(m, B=2, T=21, seed=5)
    xs = {n: x.clone().requires_grad_(True) for n, x in args.items()}
    ref = {n: x.clone().requires_grad_(True) for n, x in args.items()}
    ops = torch_ops_of(lambda: m(**xs).sum().backward())
    assert not any("scan" in name for name, _, _ in ops)
    d(**ref).sum().backward()
    for n in args:
        assert rel_err(xs[n].grad, ref[n].grad) < 1e-9, n
