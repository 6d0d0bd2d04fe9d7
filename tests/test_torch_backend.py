"""The torch backend against the dense interpreter (the meaning of a program)."""

import mixerc
import pytest
import torch
from conftest import CAUSAL, STDLIB, rel_err
from reference import make_inputs

LENGTHS = {"sliding_window": 100}


def split(m, args, a, b):
    return {k: (v[:, a:b] if k in m.program.inputs else v) for k, v in args.items()}


@pytest.mark.parametrize("name", STDLIB)
def test_float64_equals_dense(name, compiled):
    T = LENGTHS.get(name, 77)  # not a multiple of any chunk length
    args = make_inputs(name, B=2, T=T, seed=11)
    y = compiled(name)(**args)
    ref = compiled(name, "dense")(**args)
    assert y.dtype == torch.float64
    assert rel_err(y, ref) < 1e-9


@pytest.mark.parametrize("name", STDLIB)
def test_float32_close_to_float64(name, compiled):
    T = LENGTHS.get(name, 77)
    args = make_inputs(name, B=2, T=T, seed=12)
    ref = compiled(name, "dense")(**args)
    y = compiled(name)(**{k: v.float() for k, v in args.items()})
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("name", CAUSAL)
def test_step_and_prefill_reproduce_forward(name, compiled):
    T, split_at = LENGTHS.get(name, 45), 29
    m = compiled(name)
    args = make_inputs(name, B=2, T=T, seed=13)
    y = m(**args)
    y1, state = m(**split(m, args, 0, split_at), return_state=True)
    assert state.length == split_at
    y2 = m(**split(m, args, split_at, T), initial_state=state)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12
    outs, st = [], state
    for t in range(split_at, T):
        tok = {k: (v[:, t] if k in m.program.inputs else v) for k, v in args.items()}
        yt, st = m.step(st, **tok)
        outs.append(yt)
    assert rel_err(torch.stack(outs, 1), y[:, split_at:]) < 1e-12
    st, outs = None, []
    for t in range(6):
        tok = {k: (v[:, t] if k in m.program.inputs else v) for k, v in args.items()}
        yt, st = m.step(st, **tok)
        outs.append(yt)
    assert rel_err(torch.stack(outs, 1), y[:, :6]) < 1e-12


def test_hydra_decode_error(compiled):
    m = compiled("hydra")
    args = make_inputs("hydra", B=1, T=4)
    with pytest.raises(mixerc.MixerDecodeError, match="above the diagonal"):
        m(**args, return_state=True)


def test_state_from_another_mixer_is_rejected(compiled):
    ssd, retnet = compiled("ssd"), compiled("retnet")
    _, st = retnet(**make_inputs("retnet", B=2, T=5), return_state=True)
    with pytest.raises(mixerc.MixerValueError, match="does not belong to ssd"):
        ssd(**make_inputs("ssd", B=2, T=5), initial_state=st)
    _, st = ssd(**make_inputs("ssd", B=2, T=5), return_state=True)
    with pytest.raises(mixerc.MixerValueError, match="batch 2"):
        ssd(**make_inputs("ssd", B=1, T=5), initial_state=st)


def test_generated_source_is_readable(compiled):
    src = compiled("ssd").source("torch")
    assert "mixer ssd {" in src and "def forward(" in src and "chunked" in src
    compile(src, "ssd.py", "exec")


@pytest.mark.parametrize("name", ["ssd", "gla", "attention", "gated_conv", "h3"])
def test_varlen_equals_separate_runs(name, compiled):
    m = compiled(name)
    args = make_inputs(name, B=1, T=60, seed=14)
    cu = torch.tensor([0, 7, 26, 27, 60])
    y, states = m(**args, cu_seqlens=cu, return_state=True)
    assert len(states) == 4
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, st = m(**split(m, args, a, b), return_state=True)
        assert rel_err(y[:, a:b], alone) < 1e-12
        assert st.length == states[i].length == b - a
    # continuing every sequence from its own state
    more = make_inputs(name, B=1, T=12, seed=15)
    cu2 = torch.tensor([0, 3, 6, 9, 12])
    y2 = m(**more, cu_seqlens=cu2, initial_state=states)
    for i, (a, b) in enumerate(zip(cu2[:-1].tolist(), cu2[1:].tolist())):
        want = m(**split(m, more, a, b), initial_state=states[i])
        assert rel_err(y2[:, a:b], want) < 1e-12


def test_varlen_errors(compiled):
    m = compiled("ssd")
    args = make_inputs("ssd", B=2, T=10)
    with pytest.raises(mixerc.MixerShapeError, match="batch must be 1"):
        m(**args, cu_seqlens=torch.tensor([0, 10]))
    args = make_inputs("ssd", B=1, T=10)
    with pytest.raises(mixerc.MixerValueError, match="rise from 0 to the packed length 10"):
        m(**args, cu_seqlens=torch.tensor([0, 4, 3, 10]))


def test_group_level_matrices_applied_to_head_values():
    """A matrix built at the group level (G) applied to per-head values (H):
    every head of a group shares it."""
    src = """mixer gk {
      dims H, P, N, G divides H
      input x : [H, P]
      input q : [G, N]
      input k : [G, N]
      input a : [G]
      kernel h : [G]
      out y = toeplitz(h) @ x + (decay(-softplus(a)) * (q @ k^T)) @ x
    }"""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(x=r(2, 30, 4, 3), q=r(2, 30, 2, 5), k=r(2, 30, 2, 5), a=r(2, 30, 2), h=r(5, 2))
    m = mixerc.compile(src, backend="torch")
    assert [mp.strategies for mp in m.plan.matrices] == [["toeplitz"], ["chunked"]]
    assert rel_err(m(**args), mixerc.compile(src, backend="dense")(**args)) < 1e-9


def test_polynomial_kernel_picks_quadratic_or_feature_map_by_cost():
    """Based: the generated forward compares the cost model's FLOPs per call;
    both sides of the crossover equal dense, and decode continues from either."""
    import sympy
    from mixerc import cost

    m = mixerc.compile("based", backend="torch")
    mp = m.plan.matrices[0]
    quadratic, features = cost.polynomial_choice(mp.terms[0], mp, m.program.groups)
    sizes = {"H": 4, "K": 6, "V": 5, "C": 64}
    crossover = next(T for T in range(16, 4000, 8)
                     if cost.evaluate(quadratic, dict(sizes, T=T))
                     > cost.evaluate(features, dict(sizes, T=T)))
    assert 100 < crossover < 1000, crossover
    assert "quadratic_flops <= feature_flops" in m.source("torch")
    dense = mixerc.compile("based", backend="dense")
    for T in (crossover // 2, crossover + 40):  # quadratic, then feature map
        args = make_inputs("based", B=2, T=T, seed=16)
        assert rel_err(m(**args), dense(**args)) < 1e-9
        y1, st = m(**split(m, args, 0, T - 3), return_state=True)
        tok = {k: (v[:, T - 3] if k in m.program.inputs else v) for k, v in args.items()}
        yt, _ = m.step(st, **tok)
        assert rel_err(yt, dense(**args)[:, T - 3]) < 1e-9
    del sympy


def test_nan_params_are_named(compiled):
    m = compiled("ssd")
    args = make_inputs("ssd", B=1, T=9)
    args["A_log"] = args["A_log"].clone()
    m(**args)  # checked once and remembered...
    args["A_log"][1] = float("inf")  # ...until it changes in place
    with pytest.raises(mixerc.MixerValueError, match="param A_log holds 1 NaN/Inf"):
        m(**args)


@pytest.mark.parametrize("strict", [False, True])
def test_per_channel_recurrence_and_chunks_agree(strict):
    """Per-channel decays have two algorithms picked by the cost model per call
    (a recurrence for small value widths, chunks otherwise): both equal a plain
    token loop, with a nonzero state, T not a multiple of the chunk."""
    mask = " * (s < t)" if strict else ""
    src = f"""mixer pc {{
      dims H, K, V
      input q : [H, K]
      input k : [H, K]
      input v : [H, V]
      input g : [H, K]
      out y = (decay(g) * (q @ k^T){mask}) @ v
    }}"""
    mod = mixerc.compile(src, backend="torch")._impl.module
    names = [n for n in dir(mod) if n.startswith(("recurrent", "chunked_has_decay_per_channel"))]
    assert len(names) == 2, names
    g = torch.Generator().manual_seed(7)
    B, T, H, K, V = 2, 45, 3, 4, 5
    q, k = torch.randn(B, T, H, K, generator=g, dtype=torch.float64), \
        torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    a = -torch.rand(B, T, H, K, generator=g, dtype=torch.float64) * 2
    S0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    S, ys = S0.clone(), []
    for t in range(T):
        decayed = torch.exp(a[:, t])[..., None] * S
        S = decayed + k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], decayed if strict else S))
    want = torch.stack(ys, 1)
    grads = []
    w = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    for name in names:
        fn = getattr(mod, name)
        extra = {"sub": 4} if name.startswith("chunked") else {}
        xs = [x.clone().requires_grad_() for x in (q, k, v, a, S0)]
        y, final = fn(*xs, 16, **extra)
        assert rel_err(y, want) < 1e-12 and rel_err(final, S) < 1e-12, name
        grads.append(torch.autograd.grad((y * w).sum() + final.sum(), xs))
    for g1, g2 in zip(*grads):  # both differentiate by autograd: they must agree
        assert rel_err(g1, g2) < 1e-10


@pytest.mark.parametrize("name", ["mamba", "gla", "h3", "ssd", "retnet"])
def test_decode_step_does_not_pad_to_a_chunk(name, compiled, monkeypatch):
    """A step's work is one token's, whatever the chunk length: chunked code
    run on T = 1 must not pad it to a whole chunk (the per-channel recurrence
    once ran 64 padded steps per decode step, 10-20x slower)."""
    m = compiled(name)
    mod = m._impl.module
    seen = []
    real = mod.to_chunks

    def spy(x, chunk):
        seen.append((x.shape[1], chunk))
        return real(x, chunk)
    monkeypatch.setattr(mod, "to_chunks", spy)
    args = make_inputs(name, B=2, T=3, seed=16)
    _, state = m(**{k: (v[:, :2] if k in m.program.inputs else v) for k, v in args.items()},
                 return_state=True)
    seen.clear()
    m.step(state, **{k: (v[:, 2] if k in m.program.inputs else v) for k, v in args.items()})
    assert all(chunk <= length for length, chunk in seen), seen
