"""Mixers nobody wrote: random well-typed programs compile with the torch
backend and agree with the dense interpreter (forward, prefill + decode)."""

import math

import mixerc
import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from mixerc.api import CompiledMixer
from mixerc.checker import check_source
from mixerc.errors import MixerError
from mixerc.inputs import default_sizes, random_inputs
from test_language_fuzz import HEAD, matrix, token


def agree(src: str):
    try:
        program = check_source(src, "fuzz.mx")
    except MixerError:
        return "error"
    dense = CompiledMixer(program, "dense")
    fast = CompiledMixer(program, "torch")
    sizes = default_sizes(program)
    args = random_inputs(program, sizes, 2, 13, seed=5, dtype=torch.float64, kernel_len=3)
    try:
        want = dense(**args)
    except MixerError:
        return "error"
    want = want if isinstance(want, tuple) else (want,)
    if any(not torch.isfinite(w).all() or w.abs().max() > 1e6 for w in want):
        return "ill-conditioned"  # random exp/log chains overflow: nothing to compare
    got = fast(**args)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want):
        err = rel_err(g, w)
        assert err < 1e-8 or (w - g).abs().max() < 1e-9, (err, src)
    if dense.causal:
        assert fast.causal
        inputs = set(program.inputs)
        head = {k: (v[:, :7] if k in inputs else v) for k, v in args.items()}
        _, state = fast(**head, return_state=True)
        tok = {k: (v[:, 7] if k in inputs else v) for k, v in args.items()}
        yt, state = fast.step(state, **tok)
        yt = yt if isinstance(yt, tuple) else (yt,)
        for g, w in zip(yt, want):
            scale = max(1.0, float(w.abs().max()))
            assert (g - w[:, 7]).abs().max() <= 1e-8 * scale, src
    return "ok"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          database=None)
@given(y=token, m=matrix)
def test_random_programs_torch_equals_dense(y, m):
    agree(HEAD + f"  let M = {m}\n  out y = {y}\n  out u = M @ x\n}}\n")


def test_handwritten_new_mixers():
    """A few mixers outside the standard library, by class."""
    sources = [
        # decayed linear attention with a strict mask and a static scale
        HEAD + "  out y = (decay(-softplus(x)) * (q @ g^T) * (s < t) / sqrt(D)) @ z\n}\n",
        # sum of two semiseparable terms with different decays, plus a diagonal
        HEAD + "  out y = (decay(-softplus(x)) * (q @ g^T) + decay(a - 1) * (g @ q^T) "
               "+ diag(z)) @ x\n}\n",
        # time-reversed (anti-causal) low rank
        HEAD + "  out y = rev(decay(-softplus(rev(x))) * (rev(q) @ rev(g)^T)) @ z\n}\n",
        # a polynomial kernel of degree 3 with a decay
        HEAD + "  let z3 = q @ g^T / D\n"
               "  out y = ((1 + z3)^3 * decay(-softplus(x))) @ z\n}\n",
        # per-channel decay with a row gate
        HEAD + "  out y = (decay(-exp(g)) * (q @ g^T) * row(sigmoid(x))) @ z\n}\n",
    ]
    results = [agree(s) for s in sources]
    assert results == ["ok"] * len(sources), results


def test_fuzz_compares_real_programs():
    """Guard the property above: its generator must produce programs that check
    and evaluate, or it would compare nothing."""
    counts = {}

    @settings(max_examples=40, deadline=None, database=None)
    @given(y=token, m=matrix)
    def sample(y, m):
        r = agree(HEAD + f"  let M = {m}\n  out y = {y}\n  out u = M @ x\n}}\n")
        counts[r] = counts.get(r, 0) + 1

    sample()
    assert counts.get("ok", 0) >= 10, counts
