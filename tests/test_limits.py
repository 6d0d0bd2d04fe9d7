"""Deep programs and odd numbers: they work, with the dense interpreter's answer,
or stop at a documented limit with a MixerError; never a RecursionError,
OverflowError or ZeroDivisionError from inside the compiler."""

import mixerc
import pytest
import torch
from mixerc.errors import MixerError, MixerSyntaxError, MixerTypeError
from mixerc.inputs import default_sizes, random_inputs

HEAD = ("mixer f {\n  dims H, D\n  input x : [H]\n  input q : [H, D]\n  input k : [H, D]\n"
        "  param a : [H]\n")


def lets(n_lets, per):
    src, prev = HEAD, "x"
    for i in range(n_lets):
        src += f"  let a{i} = " + " + ".join([prev] + ["x"] * per) + "\n"
        prev = f"a{i}"
    return src + f"  out y = {prev}\n}}\n"


def matrix_sum(n):
    src = HEAD + "  let M0 = decay(-softplus(x)) * (q @ k^T)\n"
    for i in range(1, n):
        src += f"  let M{i} = M{i - 1} + decay(-softplus(x)) * (q @ k^T)\n"
    return src + f"  out y = M{n - 1} @ x\n}}\n"


AT_THE_LIMIT = {
    "negations": HEAD + "  out y = " + "-" * 96 + "x\n}\n",
    "sum": HEAD + "  out y = " + " + ".join(["x"] * 96) + "\n}\n",
    "calls": HEAD + "  out y = " + "tanh(" * 95 + "x" + ")" * 95 + "\n}\n",
    "product": HEAD + "  out y = " + " * ".join(["x"] * 96) + "\n}\n",
    "let chain": lets(3, 35),
    "sum of 40 matrices": matrix_sum(40),
    "mask": HEAD + "  out y = softmax(q @ k^T, mask = " + " and ".join(["s <= t"] * 45)
    + ") @ x\n}\n",
}
BEYOND = {
    "negations": HEAD + "  out y = " + "-" * 1000 + "x\n}\n",
    "sum": HEAD + "  out y = " + " + ".join(["x"] * 1000) + "\n}\n",
    "calls": HEAD + "  out y = " + "exp(" * 500 + "x" + ")" * 500 + "\n}\n",
    "product": HEAD + "  out y = " + " * ".join(["x"] * 400) + "\n}\n",
    "let chain": lets(10, 40),
}


def deep_call(depth, fn):
    """fn() called from `depth` frames down, as from inside a framework."""
    return fn() if depth == 0 else deep_call(depth - 1, fn)


def dense_vs_torch(src, T=6):
    """The torch backend gives the dense answer: equal where it is finite, and
    not finite where it is not (inf - inf may be nan on one path and inf on
    the other, e.g. a masked-out entry divided by 0)."""
    dense = mixerc.compile(src, backend="dense")
    fast = mixerc.compile(src, backend="torch")
    dense.explain(), fast.explain()
    sizes = default_sizes(dense.program)
    args = random_inputs(dense.program, sizes, 2, T, seed=1, dtype=torch.float64)
    want, got = dense(**args), fast(**args)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-9, atol=1e-12)
    return want


@pytest.mark.parametrize("name", list(AT_THE_LIMIT))
def test_programs_at_the_nesting_limit_work(name, fresh_cache):
    deep_call(150, lambda: dense_vs_torch(AT_THE_LIMIT[name]))


@pytest.mark.parametrize("name", list(BEYOND))
def test_programs_beyond_the_limit_get_a_positioned_error(name):
    with pytest.raises(MixerError, match="deep") as info:
        mixerc.compile(BEYOND[name])
    assert info.value.loc is not None and info.value.loc.line >= 1


@pytest.mark.parametrize("src", [
    "mixer f { dims W = " + "9" * 5000 + "  input x : [W]  out y = x }",
    "mixer f { dims H  input x : [H, " + "9" * 30 + "]  out y = x }",
])
def test_huge_integers_are_errors(src):
    with pytest.raises(MixerSyntaxError, match="too large"):
        mixerc.compile(src)


@pytest.mark.parametrize("body", ["out y = shift(x, 1e400)", "out y = tril(q @ k^T, k=1e400) @ x",
                                  "out y = shift(x, 1e12)"])
def test_integer_arguments_out_of_range(body):
    with pytest.raises(MixerTypeError):
        mixerc.compile(HEAD + f"  {body}\n}}\n")


@pytest.mark.parametrize("body", [
    "out y = softmax(q @ k^T, mask = t - s < 1e400) @ x",
    "out y = softmax(q @ k^T, mask = 0 <= t - s < 1e12) @ x",
    "out y = (decay(-softplus(x)) * (q @ k^T) * (t - s < 1e12)) @ x",
    "out y = ((q @ k^T) * (t - s > -1e400) * (s <= t)) @ x",
    "out y = x * 1e400",
    "out y = x * 2^1024",
    "out y = (diag(x) / 0) @ x",
    "out y = (decay(-1) * (2 > 1)) @ x",
    "out y = (decay(-a * a) / (0 < a)) @ x",
    "out y = x * exp(1000) - x * exp(1000)",
    "out y = x * sqrt(-D)",
    "out y = x / (D - D)",
])
def test_odd_numbers_give_the_dense_answer(body, fresh_cache):
    dense_vs_torch(HEAD + f"  {body}\n}}\n")


def test_a_declared_but_unused_dim(fresh_cache):
    dense_vs_torch("mixer f {\n  dims H, Z\n  input x : [H]\n  out y = 2 * x\n}\n")


def test_a_mixer_without_inputs_is_an_error():
    with pytest.raises(MixerTypeError, match="no `input`"):
        mixerc.compile("mixer f { dims H  param a : [H]  out y = decay(-a * a) @ 1 }")


def test_long_text_that_is_not_a_path():
    with pytest.raises(MixerError):
        mixerc.compile("a" * 5000)
