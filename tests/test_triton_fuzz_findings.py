"""Regression tests for wrong answers the Triton fuzzer (tests/fuzz_triton.py)
found, each minimized to a short program; and a few seeded fuzz cases of
each class (the driver itself, quickly)."""

import random

import pytest
import torch
from conftest import rel_err

import mixerc
from mixerc.runtime.triton.flash import block_lists

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

CAUSAL_SOFTMAX = """mixer f {
  dims H, D
  input q : [H, D]
  input k : [H, D]
  input v : [H, D]
  out y = softmax(q @ k^T, mask = s <= t) @ v
}
"""


def _grads(src, T, config=None, seed=1):
    d = mixerc.compile(src, backend="dense")
    m = mixerc.compile(src, backend="triton")
    if config:
        m._impl.pin_config(**config)
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(2, T, 2, 5, generator=g, dtype=f64) for n in "qkv"}
    ref = {n: x.clone().requires_grad_() for n, x in base.items()}
    got = {n: x.float().requires_grad_() for n, x in base.items()}
    w = torch.randn(2, T, 2, 5, generator=g, dtype=f64)
    (d(**ref) * w).sum().backward()
    (m(**got) * w.float()).sum().backward()
    return {n: rel_err(got[n].grad, ref[n].grad) for n in base}


@pytest.mark.parametrize("config", [None, {"bwd_block_q": 16, "bwd_block_k": 32},
                                    {"bwd_block_q": 32, "bwd_block_k": 16}],
                         ids=["default", "16x32", "32x16"])
def test_flash_dk_dv_with_several_query_and_key_blocks(config):
    """The per-key-block lists of query blocks (qidx, qkind) came back from
    argsort/gather with a transposed `visit`'s strides, column-major, while
    bwd_dkv reads them row by row: with several blocks on both sides and
    bwd_block_q != bwd_block_k (the default 64 x 32 from T = 65 on) dK and dV
    were wrong by O(1) (whole key blocks got no gradient). T = 77."""
    errs = _grads(CAUSAL_SOFTMAX, 77, config)
    assert max(errs.values()) < 1e-4, errs


def test_block_lists_are_row_major():
    for bq, bk in ((16, 32), (32, 16), (64, 32), (32, 32)):
        for x in block_lists(77, 77, 0, 0, 0.0, float("inf"), bq, bk, None, None, True, False,
                             "cpu")[:6]:
            assert x.is_contiguous(), (bq, bk, x.stride())


DENSE_TERM = """mixer f {
  dims H, D, V
  input q : [H, D]
  input k : [H, D]
  input v : [H, V]
  input u : [H]
  let z = q @ k^T
  out y = (decay(-softplus(u)) * (1 + z) * (s <= t)) @ v
}
"""


def test_stack_states_of_a_term_on_the_dense_interpreter_is_a_mixer_error():
    """A term the planner leaves to the dense interpreter keeps its history as a
    dict of tensors; stack_states read `.shape` of it (AttributeError) instead
    of saying it cannot stack that state."""
    m = mixerc.compile(DENSE_TERM, backend="triton")
    g = torch.Generator().manual_seed(0)
    a = dict(q=torch.randn(2, 5, 2, 3, generator=g), k=torch.randn(2, 5, 2, 3, generator=g),
             v=torch.randn(2, 5, 2, 4, generator=g), u=torch.randn(2, 5, 2, generator=g))
    states = [m(**{n: x[b:b + 1, :2 + b] for n, x in a.items()}, return_state=True)[1]
              for b in range(2)]
    with pytest.raises(mixerc.MixerError, match="dense interpreter"):
        m.stack_states(states)


# ------------------------------------------------------------ seeded fuzz cases
def test_seeded_fuzz_cases():
    """One seed's first case of each class (forward, gradients, prefill +
    continue + decode steps) against dense; see tests/fuzz_triton.py."""
    import fuzz_triton
    counts, fails = fuzz_triton.run(seed=1234, cases=5, time_limit=60)
    assert not fails, "\n\n".join(f"{f[3]}{chr(10).join(f[4])}\n=> {f[5]}" for f in fails)
    assert sum(n for (_, out), n in counts.items() if out.startswith("ok")) >= 3, counts


def test_generator_reaches_each_class():
    """The generator's programs compile for Triton, and most of each class's
    terms run on kernels (not the dense interpreter's fallback)."""
    import fuzz_triton
    for cls in fuzz_triton.CLASSES:
        reached = 0
        for i in range(6):
            src = fuzz_triton.Gen(random.Random(f"reach-{cls}-{i}")).program(cls)
            text = mixerc.compile(src, backend="triton").explain()
            runs = [x for x in text.splitlines() if "runs on:" in x]
            reached += bool(runs) and all("triton kernel" in x.lower() for x in runs)
        assert reached >= 4, (cls, reached)
