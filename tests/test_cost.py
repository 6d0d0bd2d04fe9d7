"""The cost model in `explain`: sub-quadratic classes scale linearly in T and
decode in constant time; attention is quadratic with a growing KV cache."""

import mixerc
import pytest
import sympy
from conftest import STDLIB
from mixerc import cost
from mixerc.errors import MixerPerformanceWarning
from mixerc.plan import plan

SIZES = dict(H=8, G=2, D=64, K=16, V=64, P=64, N=64, E=512, C=64, L=4)
QUADRATIC = {"attention"}
GROWING_STATE = {"attention", "gated_conv"}   # KV cache / history of L - 1 inputs (L fixed here)


def flops(name, T, t=1000):
    m = mixerc.compile(name, backend="torch")
    total = {"prefill": 0.0, "decode": 0.0, "state": 0.0}
    for mp in m.plan.matrices:
        c = cost.matrix_cost(mp, m.program.groups)
        subs = dict(SIZES, T=T, t=t)
        total["prefill"] += cost.evaluate(c.prefill_flops, subs)
        total["decode"] += cost.evaluate(c.decode_flops, subs)
        total["state"] += cost.evaluate(c.state, subs)
    return total


@pytest.mark.parametrize("name", STDLIB)
def test_prefill_scaling(name):
    ratio = flops(name, 16384)["prefill"] / flops(name, 8192)["prefill"]
    if name in QUADRATIC:
        assert 3.9 < ratio < 4.1
    else:
        assert 1.9 < ratio < 2.2, ratio  # linear (FFT: n log n)


@pytest.mark.parametrize("name", [n for n in STDLIB if n != "hydra"])
def test_decode_cost_vs_context(name):
    a, b = flops(name, 100, t=1000), flops(name, 100, t=4000)
    if name == "attention":
        assert b["decode"] == pytest.approx(4 * a["decode"])
    else:  # fixed-size state (a window, a conv history, a recurrence)
        assert b["decode"] == a["decode"] and b["state"] == a["state"]


def test_explain_prints_the_algorithm_and_costs():
    text = mixerc.compile("ssd", backend="torch").explain()
    assert "M: chunked" in text and "prefill FLOPs" in text and "decode FLOPs/token" in text
    H, N, P = sympy.symbols("H N P", positive=True)
    m = mixerc.compile("ssd", backend="torch")
    c = cost.matrix_cost(m.plan.matrices[0], m.program.groups)
    assert sympy.simplify(c.decode_flops - 4 * H * N * P) == 0
    assert sympy.simplify(c.state - H * N * P) == 0


def test_dense_fallback_is_reported():
    src = """mixer odd {
      dims H
      input x : [H]
      out y = (softmax(row(x) * col(x) + (t - s), mask = s <= t) * decay(-softplus(x))) @ x
    }"""
    with pytest.warns(MixerPerformanceWarning, match=r"<string>:4:16: .*softmax multiplied"):
        m = mixerc.compile(src, backend="torch")
    text = m.explain()
    assert "missing: a softmax multiplied by another matrix" in text
    assert [t.strategy for t in plan(m.program).matrices[0].terms] == ["dense"]


def test_absolute_positions_are_not_time_invariant():
    """A mask on t alone depends on absolute positions: not Toeplitz."""
    base = "mixer a {{ dims E\n kernel h : [E]\n input x : [E]\n out y = (toeplitz(h) * ({})) @ x }}"
    assert mixerc.compile(base.format("t < 9")).analysis.cls == "dense"
    assert mixerc.compile(base.format("t - s < 3")).analysis.cls == "toeplitz"
