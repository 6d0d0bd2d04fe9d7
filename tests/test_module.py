"""CompiledMixer.module(): an nn.Module owning the params, under torch.compile."""

import math

import mixerc
import pytest
import torch
from conftest import rel_err

SOURCE = """mixer m {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  param gamma : [H] = log(1 - exp(uniform(log(1 / 64), log(1 / 8))))
  param w : [H, K] = normal(2, 0.5)
  param free : [H]
  out y = (decay(gamma) * ((w * q) @ k^T)) @ v + free * v
}"""


def test_params_are_initialized_from_the_source():
    m = mixerc.compile(SOURCE)
    mod = m.module(H=64, K=8, V=5, seed=0)
    names = dict(mod.named_parameters())
    assert set(names) == {"gamma", "w", "free"}
    assert names["gamma"].shape == (64,) and names["w"].shape == (64, 8)
    g = names["gamma"].detach()
    assert (g <= math.log(1 - 1 / 64) + 1e-6).all() and (g >= math.log(1 - 1 / 8) - 1e-6).all()
    assert g.std() > 0  # one draw per element, not a broadcast scalar
    w = names["w"].detach()
    assert abs(float(w.mean()) - 2) < 0.2 and 0.3 < float(w.std()) < 0.7
    assert names["free"].abs().max() < 1  # default normal(0, 0.1)
    again = m.module(H=64, K=8, V=5, seed=0)
    assert torch.equal(again.w, mod.w)


def test_stdlib_inits():
    mod = mixerc.compile("ssd").module(H=32, P=4, N=4, G=2, seed=1)
    a = mod.A_log.detach()
    assert (a >= 0).all() and (a <= math.log(16) + 1e-6).all()
    dt = torch.nn.functional.softplus(mod.dt_bias.detach())
    assert (dt > 0.0009).all() and (dt < 0.11).all()
    assert torch.equal(mod.D.detach(), torch.ones(32))


def test_module_forward_backward_and_step():
    m = mixerc.compile("ssd")
    mod = m.module(H=4, P=3, N=5, G=2, dtype=torch.float64, seed=2)
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 19, 4, 3, generator=g, dtype=torch.float64), \
        torch.randn(2, 19, 4, generator=g, dtype=torch.float64)
    B, C = (torch.randn(2, 19, 2, 5, generator=g, dtype=torch.float64) for _ in range(2))
    y = mod(x=x, dt=dt, B=B, C=C)
    ref = mixerc.compile("ssd", backend="dense")(x=x, dt=dt, B=B, C=C, **{
        n: p.detach() for n, p in mod.named_parameters()})
    assert rel_err(y, ref) < 1e-9
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.parameters())
    state, outs = None, []
    for t in range(19):
        yt, state = mod.step(state, x=x[:, t], dt=dt[:, t], B=B[:, t], C=C[:, t])
        outs.append(yt)
    assert rel_err(torch.stack(outs, 1), y) < 1e-12


@pytest.mark.parametrize("name", ["ssd", "gla", "hydra"])
def test_torch_compile_fullgraph(name):
    m = mixerc.compile(name)
    sizes = {"ssd": dict(H=4, P=3, N=5, G=2), "gla": dict(H=2, K=4, V=3),
             "hydra": dict(H=2, P=3, N=4)}[name]
    mod = m.module(**sizes, seed=3)
    from mixerc.inputs import random_inputs
    args = random_inputs(m.program, dict(sizes, **{"K": 4, "V": 3}), 2, 37, seed=4)
    args = {k: v for k, v in args.items() if k in m.program.inputs}
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    assert rel_err(compiled(**args), mod(**args)) < 1e-6


def test_module_errors():
    m = mixerc.compile("ssd")
    with pytest.raises(mixerc.MixerValueError, match="needs the size of H"):
        m.module(P=3)
    with pytest.raises(mixerc.MixerValueError, match="unknown dim"):
        m.module(H=4, Q=3)
    with pytest.raises(mixerc.MixerValueError, match="does not divide"):
        m.module(H=4, P=3, N=2, G=3)
