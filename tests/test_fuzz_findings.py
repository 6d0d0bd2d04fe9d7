"""Bugs the fuzz campaign found (tests/fuzz.py), each with its smallest
program: torch equals dense in the forward, and prefill + decode where causal."""

import mixerc
import pytest
import torch
from mixerc.errors import MixerDecodeError
from mixerc.inputs import default_sizes, random_inputs

pytestmark = pytest.mark.usefixtures("fresh_cache")

CASES = {
    "negative shift longer than the input":
        "mixer f {\n  dims H\n  input x : [H]\n  out y = shift(x, -2)\n}",
    "two convs sharing one weight":
        "mixer f {\n  dims H\n  input x : [H]\n  input z : [H]\n  param w : [H, 3]\n"
        "  out y = conv(x, w) + conv(z, w)\n}",
    "a conv of a conv":
        "mixer f {\n  dims H\n  input x : [H]\n  param w : [H, 3]\n  out y = conv(conv(x, w), w)\n}",
    "polynomial kernel with a row gate":
        "mixer f {\n  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input x : [H]\n"
        "  input z : [H]\n  out y = ((q @ k^T)^2 * (s <= t) * row(x)) @ z\n}",
    "polynomial kernel with a col gate and a decay":
        "mixer f {\n  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input x : [H]\n"
        "  input z : [H]\n  out y = ((1 + q @ k^T)^2 * decay(-softplus(x)) * col(x)) @ z\n}",
    "a matrix applied to a number, shifted":
        "mixer f {\n  dims H\n  input x : [H]\n  out y = shift(decay(-1) @ 1) + x\n}",
    "a matrix applied to a number inside a decay":
        "mixer f {\n  dims H\n  input x : [H]\n  out y = decay(-(decay(-1) @ 1)) @ x\n}",
    "scores summed over the head dim":
        "mixer f {\n  dims H\n  input x : [H]\n  input z : [H]\n  param a : [H]\n"
        "  out y = softmax((x @ z^T) / a, mask = s <= t) @ z\n}",
    "a nan score stays nan (dense no longer zeroes it as if masked)":
        "mixer f {\n  dims H\n  input x : [H]\n  out y = (softmax(diag(sqrt(x)))) @ x\n}",
    "an anti-causal polynomial kernel with a row gate":
        "mixer f {\n  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input x : [H]\n"
        "  out y = (triu((1 + q @ k^T)^2 * row(sigmoid(x)), 0)) @ x\n}",
    "one kernel in two Toeplitz matrices, one cut by a band":
        "mixer f {\n  dims H\n  input x : [H]\n  kernel h : [H]\n"
        "  out y = (tril(toeplitz(h), k=-2)) @ x + (toeplitz(h))^T @ x\n}",
    "one matrix applied twice":
        "mixer f {\n  dims H\n  input x : [H]\n  let M = decay(-1)\n  out y = M @ (M @ x)\n}",
    # each shift of a matrix keeps its own last rows in the decode state
    "a shift of a shifted matrix":
        "mixer f {\n  dims H\n  input x : [H]\n  out y = shift(shift(decay(-1), 1), 1) @ x\n}",
    "a per-channel decay shifted twice":
        "mixer f {\n  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input x : [H]\n"
        "  out y = shift(shift(decay(-exp(k)) * (q @ k^T), 2), 3) @ x\n}",
    "a softmax shifted twice, once by 0":
        "mixer f {\n  dims H\n  input x : [H]\n  input z : [H]\n"
        "  out y = shift(shift(softmax(row(z), mask = s < t), 1), 0) @ x\n}",
    # a gate inside shift() or rev() moves with the rows (or columns) it scales
    "a row gate inside a shifted softmax":
        "mixer f {\n  dims H\n  input x : [H]\n  input z : [H]\n"
        "  out y = shift(softmax(row(z), mask = s <= t) * row(x), 1) @ z\n}",
    "a row gate inside a shifted polynomial kernel":
        "mixer f {\n  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input x : [H]\n"
        "  out y = shift((1 + q @ k^T)^2 * row(sigmoid(x)), 1) @ x\n}",
    "a col gate inside a reversed polynomial kernel":
        "mixer f {\n  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n  input x : [H]\n"
        "  out y = rev((1 + q @ k^T)^2 * (s <= t) * col(x)) @ x\n}",
    # v's G is a dim of its own (it has H too), not the group of v's heads
    "grouped keys, values with the head dim and a group dim":
        "mixer f {\n  dims H, G divides H, D\n  input q : [H, D]\n  input k : [G, D]\n"
        "  input v : [G, H]\n  out y = softmax(q @ k^T, mask = s <= t) @ v\n}",
}


def run(src, T):
    dense = mixerc.compile(src, backend="dense")
    fast = mixerc.compile(src, backend="torch")
    p = dense.program
    args = random_inputs(p, default_sizes(p), 2, T, seed=T, dtype=torch.float64)
    want, got = dense(**args), fast(**args)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, equal_nan=True)
    return dense, fast, args, want


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("T", [1, 2, 7])
def test_torch_equals_dense(name, T):
    dense, fast, args, want = run(CASES[name], T)
    if not dense.causal or T < 2:
        return
    inputs = set(dense.program.inputs)
    head = {n: (x[:, :1] if n in inputs else x) for n, x in args.items()}
    y, state = fast(**head, return_state=True)
    torch.testing.assert_close(y, want[:, :1], rtol=1e-9, atol=1e-10)
    for t in range(1, T):
        y, state = fast.step(state, **{n: (x[:, t] if n in inputs else x)
                                       for n, x in args.items()})
        torch.testing.assert_close(y, want[:, t], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("body", ["tril(shift((s <= t), -1)) @ x", "rev(decay(-1) @ 1) + x",
                                  "shift(x, -1)"])
def test_reading_ahead_is_not_causal(body):
    """Row t of shift(M, -1) is row t + 1 of M: a prefix lacks it, so no decode."""
    src = f"mixer f {{\n  dims H\n  input x : [H]\n  out y = {body}\n}}"
    run(src, 6)
    m = mixerc.compile(src)
    assert not m.causal
    with pytest.raises(MixerDecodeError):
        m.step(None, x=torch.randn(1, 2))


@pytest.mark.parametrize("zero", ["sqrt(0.0)", "(D - D)", "0"])
def test_polynomial_kernel_divided_by_zero(zero):
    """1 / 0 in a polynomial's coefficients is inf (float64, as dense computes
    it), not a ZeroDivisionError; a literal 0 leaves no exact expansion, so the
    term runs densely."""
    src = ("mixer f {\n  dims H, D\n  input q : [H, D]\n  input k : [H, D]\n"
           f"  input v : [H, D]\n  out y = ((1 + q @ k^T / {zero})^2 * (s <= t)) @ v\n}}")
    dense = mixerc.compile(src, backend="dense")
    fast = mixerc.compile(src, backend="torch")
    args = random_inputs(dense.program, default_sizes(dense.program), 2, 5, seed=0,
                         dtype=torch.float64)
    want, got = dense(**args), fast(**args)
    assert not torch.isfinite(want).any() and not torch.isfinite(got).any()
    assert fast.plan.matrices[0].strategies == ["dense" if zero == "0" else "chunked"]
    y, state = fast(**{n: x[:, :4] for n, x in args.items()}, return_state=True)
    y, state = fast.step(state, **{n: x[:, 4] for n, x in args.items()})
    assert not torch.isfinite(y).any()
