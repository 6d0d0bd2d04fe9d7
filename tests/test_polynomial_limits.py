"""Polynomial kernels have bounded degree and bounded feature maps.

A power above analysis.MAX_POLY_DEGREE (z^16, z^100000, z^1e300, reached
through nesting or not) is not a polynomial kernel: it compiles at once and
runs on another strategy or the dense path, with the dense interpreter's
answer. At run time a feature map over MAX_POLY_FEATURES features per token
is never built: without a decay the quadratic form runs over the keys and
values so far (decode too); with one, a MixerValueError names the term."""

import time

import pytest
import sympy
import torch
from conftest import rel_err

import mixerc
from mixerc import analysis
from mixerc.plan import decompose
from mixerc.runtime.torch.tokens import MAX_POLY_FEATURES, poly_feature_count, poly_features

pytestmark = pytest.mark.usefixtures("fresh_cache")


def kernel_source(f: str, decay: bool = False, mask: str = "s <= t") -> str:
    gate = " * decay(-softplus(a))" if decay else ""
    return f"""mixer poly {{
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  input a : [H]
  let z = q @ k^T / sqrt(K)
  out y = (({f}) * ({mask}){gate}) @ v
}}"""


def inputs(T=8, K=4, V=3, B=2, H=2, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(q=r(B, T, H, K) * scale, k=r(B, T, H, K) * scale, v=r(B, T, H, V), a=r(B, T, H))


def compile_timed(src: str):
    t0 = time.perf_counter()
    m = mixerc.compile(src, backend="torch")
    return m, time.perf_counter() - t0


def strategies(m) -> list:
    return [mp.strategies for mp in m.plan.matrices]


def agrees_with_dense(m, src, args) -> bool:
    ours, dense = m(**args), mixerc.compile(src, backend="dense")(**args)
    return torch.allclose(ours, dense, rtol=1e-9, atol=0, equal_nan=True)


@pytest.mark.parametrize("power", ["100000", "1e300", "1e308", "16", "9"])
def test_a_high_power_compiles_at_once_and_runs_densely(power):
    src = kernel_source(f"z^{power}")
    m, seconds = compile_timed(src)
    assert seconds < 2, seconds
    assert strategies(m) == [["dense"]]
    assert agrees_with_dense(m, src, inputs())


@pytest.mark.parametrize("f", ["((1 + z)^4)^4", "(1 + z)^4 * (1 + z)^4 * z", "(z^3)^3",
                               "(1 + z^2)^5"])
def test_degree_reached_through_nesting_is_bounded_too(f):
    src = kernel_source(f)
    m, seconds = compile_timed(src)
    assert seconds < 2 and strategies(m) == [["dense"]], (seconds, strategies(m))
    assert agrees_with_dense(m, src, inputs())


@pytest.mark.parametrize("f", ["(1 + z)^8", "((1 + z)^2)^4", "1 + z + z^2 / 2", "(2 - z)^3 / 2 + z^2"])
def test_polynomials_up_to_the_limit_are_still_feature_maps(f):
    src = kernel_source(f)
    m, _ = compile_timed(src)
    assert strategies(m) == [["chunked"]]
    assert agrees_with_dense(m, src, inputs())


def test_non_integer_and_negative_exponents_are_not_polynomials():
    for f in ["z^2.5", "z^(0 - 2)", "z^(1/0)"]:
        m, seconds = compile_timed(kernel_source(f))
        assert seconds < 2 and strategies(m) == [["dense"]], f


def test_an_expansion_with_many_static_symbols_is_bounded():
    """(z + c1 + ... + c30)^8 expands to ~50 million terms in the statics:
    not a polynomial kernel, and decided without expanding."""
    statics = " + ".join(f"{i + 1} / sqrt(K)" for i in range(30))
    m, seconds = compile_timed(kernel_source(f"(z + {statics})^8"))
    assert seconds < 2, seconds
    assert strategies(m) == [["dense"]]


@pytest.mark.parametrize("f", ["(2 - z)^3 * 0.5", "0.5 * (1 + z)^2", "(1 + z)^2 / sqrt(V)"])
def test_a_scale_factor_outside_the_polynomial_is_not_folded_into_q(f):
    """f(z) * c is not f(c z): the scale must not reach the feature map."""
    src = kernel_source(f)
    m, _ = compile_timed(src)
    assert agrees_with_dense(m, src, inputs())


def test_tiny_coefficients_stay_exact():
    """Constants enter sympy exactly: 1e-300 is not rounded to 0."""
    src = kernel_source("1e-300 * z^2 + z^2")
    m, _ = compile_timed(src)
    poly = analysis.polynomial_of_lowrank(decompose(m.plan.matrices[0].terms[0].node).rest[0])
    (c0,) = [sympy.Symbol(name) for name in poly.symbols]   # 1 / sqrt(K)
    assert poly.coeffs[2].subs(c0, 1) - 1 == sympy.Rational(1, 10 ** 300)


def test_degree_16_at_k4_never_builds_its_feature_map():
    """(1 + z)^16 at K = 4 would need 5.7e9 features per token."""
    src = kernel_source("(1 + z)^16")
    m, _ = compile_timed(src)
    assert strategies(m) == [["dense"]]
    assert agrees_with_dense(m, src, inputs(T=8, K=4))


@pytest.mark.parametrize("mask", ["s <= t", "s < t"])
def test_a_too_large_feature_map_runs_the_quadratic_form_with_a_kv_state(mask):
    """(1 + z)^8 at K = 8: 19 million features per token. Prefill, a continued
    block and a decode step all give the dense answer."""
    src = kernel_source("(1 + z)^8", mask=mask)
    m, _ = compile_timed(src)
    assert strategies(m) == [["chunked"]]
    assert poly_feature_count(8, 8) > MAX_POLY_FEATURES
    args = inputs(T=9, K=8)
    dense = mixerc.compile(src, backend="dense")(**args)
    assert rel_err(m(**args), dense) < 1e-9
    head = {n: x[:, :5] for n, x in args.items()}
    y1, state = m(**head, return_state=True)
    (kv,) = state.tensors.values()
    assert kv.shape == (2, 5, 2, 8 + 3)                   # keys and values, not features
    y2, state = m(**{n: x[:, 5:8] for n, x in args.items()}, initial_state=state,
                  return_state=True)
    yt, _ = m.step(state, **{n: x[:, 8] for n, x in args.items()})
    assert rel_err(torch.cat([y1, y2, yt[:, None]], 1), dense) < 1e-9


def test_a_too_large_feature_map_with_a_decay_is_a_clear_error():
    src = kernel_source("(1 + z)^8", decay=True)
    m, _ = compile_timed(src)
    assert strategies(m) == [["chunked"]]
    with pytest.raises(mixerc.MixerValueError) as e:
        m(**inputs(T=8, K=8))
    msg = str(e.value)
    for part in ["mixer poly", "matrix y", "degree 8", "K = 8", "19173961", "limit"]:
        assert part in msg, (part, msg)
    # below the limit the same mixer runs and agrees with dense
    assert agrees_with_dense(m, src, inputs(T=8, K=3))


def test_poly_features_refuses_before_allocating():
    x = torch.zeros(1, 1, 1, 64)
    with pytest.raises(mixerc.MixerValueError, match="term T"):
        poly_features(x, [1.0] * 9, "term T")   # 64^8: would be 2.8e14 floats
    assert poly_features(torch.ones(1, 1, 1, 2), [1.0, 2.0, 3.0]).shape == (1, 1, 1, 7)
