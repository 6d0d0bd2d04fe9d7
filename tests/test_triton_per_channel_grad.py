"""The per-channel decay kernels' backward (GLA, Mamba-1, H3's modal kernel:
templates/triton_per_channel_bwd.py.jinja, joined by runtime/triton/
per_channel.py: per_channel_op_grads) against the dense interpreter in float64:
gradients of every input and param (the prologue's params through torch
autograd around the kernels) in float32 (< 1e-4 relative), float16 and
bfloat16 (looser; bf16 through the test-only dot patch); T not a multiple
of the chunk, batch > 1, K and V not powers of 2, strict masks, random
per-channel programs, initial and final states' gradients, strong decays
over a long input; outputs poisoned before the kernels write. A spy proves
the Triton backward ran (the torch backend's chunks are made to fail), and
that the tuner's forward+backward run reaches the kernels with its knobs
(with a log-decay map the cumsum kernel computes on load, as STRICT_GLA's
log(sigmoid(f)), through MappedPerChannelFn: tests/
test_triton_per_channel_prologue.py)."""

import random

import pytest
import torch
from conftest import rel_err
from reference import make_inputs

import mixerc
from mixerc.codegen.triton.terms import per_channel

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64

STRICT_GLA = """
mixer gla_strict {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  input f : [H, K]
  out y = (decay(log(sigmoid(f))) * (q @ k^T) * (s < t)) @ v
}
"""


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(src, backend="triton", **pinned):
        key = (src, backend, tuple(sorted(pinned.items())))
        if key not in cache:
            cache[key] = mixerc.compile(src, backend=backend)
            if backend == "triton":  # the chunked kernels (the scan has its own tests)
                cache[key]._impl.pin_config(**{"algorithm": "chunks", **pinned})
        return cache[key]
    return get


def triton_only(m, monkeypatch):
    """Records the knobs of each kernel launch a gradient flows through (the
    custom op's autograd runs the backward kernels with the same knobs);
    the torch backend's chunked and recurrent code raise, so a silent
    fallback fails the test."""
    mod = m._impl.module
    calls = []
    # the chunked kernels' host (a scan beside it is forward-only)
    host = next(fn for fn in m._impl._kernel_dims if hasattr(mod, fn + "_backward"))
    original = getattr(mod, host + "_op")

    def spy(*args):
        if torch.is_grad_enabled() and any(torch.is_tensor(x) and x.requires_grad
                                           for x in args):
            calls.append(args[5:])  # chunk, sub, block_v, num_warps, num_stages, bwd_block_k
        return original(*args)
    monkeypatch.setattr(mod, host + "_op", spy)  # the host looks the op up when called
    run = getattr(mod, host)
    if hasattr(run, "mapped"):  # a log-decay map on load: MappedPerChannelFn's forward
        mapped = run.mapped  # (its inputs still require a gradient inside it)

        def spy_mapped(*args):
            if any(x.requires_grad for x in args[:3] + tuple(args[3])):
                calls.append(args[5:])
            return mapped(*args)
        monkeypatch.setattr(run, "mapped", spy_mapped)

    def refuse(*args, **kwargs):
        raise AssertionError("the torch backend's chunked code ran")
    for name in ("chunked_has_decay_per_channel", "recurrent"):
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, refuse)
    return calls


def grads_of(m, args, dtype, weight_seed=0, **kw):
    """(y, {name: grad}) of sum(y * w) for random w; token inputs in dtype,
    params float32 (float64 for the reference)."""
    leaves = {n: x.to(device=DEVICE, dtype=dtype if x.dim() >= 3 or dtype == f64
                      else torch.float32).detach().requires_grad_(True)
              for n, x in args.items()}
    y = m(**leaves, **kw)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=f64)
    (y * w.to(y.device, y.dtype)).sum().backward()
    return y, {n: x.grad for n, x in leaves.items()}


def assert_grads_match(m, d, args, dtype, tol):
    y, got = grads_of(m, args, dtype)
    y_ref, want = grads_of(d, args, f64)
    assert rel_err(y.cpu(), y_ref) < tol
    for n in args:
        g = got[n]
        assert g is not None and torch.isfinite(g).all(), n
        assert rel_err(g.cpu(), want[n]) < tol, (n, rel_err(g.cpu(), want[n]))


@pytest.mark.parametrize("name,T", [("gla", 75), ("mamba", 45), ("h3", 40)])
def test_gradients_equal_dense(compiled, monkeypatch, poisoned, name, T):
    m = compiled(name, tri_chunk=32)  # several chunks on a short input, the last partial
    calls = triton_only(m, monkeypatch)
    args = make_inputs(name, B=2, T=T, seed=11)
    assert_grads_match(m, compiled(name, "dense"), args, torch.float32, 1e-4)
    assert calls == [(32, 16, 32, 8, 2, 16)]


def test_strict_mask_odd_dims(compiled, monkeypatch, poisoned):
    m = compiled(STRICT_GLA, tri_chunk=32)
    assert m._impl.plan.matrices[0].terms[0].flags["strict"]
    calls = triton_only(m, monkeypatch)
    g = torch.Generator().manual_seed(12)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    B, T, H, K, V = 3, 45, 2, 20, 40  # two K blocks of the dq/dk kernel, two V blocks
    args = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), f=r(B, T, H, K) + 2)
    assert_grads_match(m, compiled(STRICT_GLA, "dense"), args, torch.float32, 1e-4)
    assert len(calls) == 1


def test_initial_and_final_state_gradients(compiled, monkeypatch, poisoned):
    """A prefill split in two: the second call starts from the first's state,
    so the loss reaches the first call through its final state (d_final) and
    the second's initial state (d_state); the second's final state is in
    the loss too. Reference: the torch backend in float64."""
    m = compiled("gla", tri_chunk=32)
    ref = compiled("gla", "torch")
    calls = triton_only(m, monkeypatch)
    args = make_inputs("gla", B=2, T=64, seed=13)
    g = torch.Generator().manual_seed(14)
    w_y = torch.randn(2, 64, 4, 5, generator=g, dtype=f64)
    w_s = torch.randn(2, 4, 6, 5, generator=g, dtype=f64)

    def run(mixer, dtype):
        leaves = {n: x.to(DEVICE, dtype).requires_grad_(True) for n, x in args.items()}
        y1, s1 = mixer(**{n: x[:, :29] for n, x in leaves.items()}, return_state=True)
        y2, s2 = mixer(**{n: x[:, 29:] for n, x in leaves.items()}, initial_state=s1,
                       return_state=True)
        y = torch.cat([y1, y2], 1)
        loss = (y * w_y.to(y)).sum() + (s2.tensors["y"] * w_s.to(y)).sum()
        loss.backward()
        return y, s2.tensors["y"], {n: x.grad for n, x in leaves.items()}
    y, s, got = run(m, torch.float32)
    y_ref, s_ref, want = run(ref, f64)
    assert len(calls) == 2
    assert rel_err(y.cpu(), y_ref) < 1e-4 and rel_err(s.cpu(), s_ref) < 1e-4
    for n in args:
        assert rel_err(got[n].cpu(), want[n]) < 1e-4, n


def test_final_state_alone(compiled, monkeypatch, poisoned):
    """A loss on the returned state only (y unused: its gradient comes as None)."""
    m = compiled("gla", tri_chunk=32)
    calls = triton_only(m, monkeypatch)
    args = make_inputs("gla", B=1, T=40, seed=19)

    def run(mixer, dtype):
        leaves = {n: x.to(DEVICE, dtype).requires_grad_(True) for n, x in args.items()}
        _, state = mixer(**leaves, return_state=True)
        state.tensors["y"].square().sum().backward()
        return {n: x.grad for n, x in leaves.items()}
    got, want = run(m, torch.float32), run(compiled("gla", "torch"), f64)
    assert len(calls) == 1
    assert want["q"] is None and not got["q"].any()  # the state never reads q
    for n in ("k", "v", "g"):
        assert rel_err(got[n].cpu(), want[n]) < 1e-4, n


def test_decode_state_stepped_after_a_gradient_call(compiled, monkeypatch):
    """A gradient call from a decode state keeps a copy of it: a later decode
    step from the same state updates that buffer in place (unseen by
    autograd's version counters), and the gradients stay right."""
    m = compiled("gla")
    calls = triton_only(m, monkeypatch)
    args = {n: x.float() for n, x in make_inputs("gla", B=1, T=24, seed=20).items()}
    with torch.no_grad():
        _, state = m(**{n: x[:, :20] for n, x in args.items()}, return_state=True)
        _, state = m.step(state, **{n: x[:, 20] for n, x in args.items()})  # in place from now
    tail = {n: x[:, 21:].clone().requires_grad_(True) for n, x in args.items()}
    _, s_grad = m(**tail, initial_state=state, return_state=True)
    with torch.no_grad():
        m.step(state, **{n: x[:, 21] for n, x in args.items()})  # updates state's buffer
    s_grad.tensors["y"].square().sum().backward()
    ref = compiled("gla", "torch")
    head = {n: x[:, :21].double() for n, x in args.items()}
    _, s_ref = ref(**head, return_state=True)
    leaves = {n: x[:, 21:].double().requires_grad_(True) for n, x in args.items()}
    _, s_out = ref(**leaves, initial_state=s_ref, return_state=True)
    s_out.tensors["y"].square().sum().backward()
    assert len(calls) == 1
    for n in ("k", "v", "g"):
        assert rel_err(tail[n].grad, leaves[n].grad) < 1e-4, n


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 2e-2)])
def test_half_gradients(compiled, monkeypatch, bf16_dots, dtype, tol):
    m = compiled("gla", tri_chunk=32)
    calls = triton_only(m, monkeypatch)
    args = make_inputs("gla", B=1, T=40, seed=15)
    assert_grads_match(m, compiled("gla", "dense"), args, dtype, tol)
    assert len(calls) == 1


def test_strong_decays_long_input_finite(compiled, monkeypatch):
    """log-decay -5 per step over T = 4096 (one head, to keep the interpreter
    quick), some slow steps between: every exponent the backward takes is
    <= 0 (sub-chunk dots rebased on their own start or end, the decay's
    gradient restarted at every chunk), so the gradients are finite and
    equal the torch backend's in float64."""
    m = compiled("gla")
    calls = triton_only(m, monkeypatch)
    args = {n: x[:, :, :1] for n, x in make_inputs("gla", B=1, T=4096, seed=16).items()}
    args["g"] = torch.full_like(args["g"], -5.0)
    args["g"][:, ::7] = -0.01
    y, got = grads_of(m, args, torch.float32)
    y_ref, want = grads_of(compiled("gla", "torch"), args, f64)
    assert len(calls) == 1 and rel_err(y.cpu(), y_ref) < 1e-4
    for n in args:
        assert torch.isfinite(got[n]).all(), n
        assert rel_err(got[n].cpu(), want[n]) < 1e-4, n


DECAYS = ["decay(-softplus(f))", "decay(log(sigmoid(f)))", "decay(-exp(A) * softplus(f))",
          "decay(-softplus(f) - 0.1)"]


def random_program(seed: int) -> str:
    """A per-channel program: one of a few log-decays (a param inside some),
    strict or not, scaled or gated queries, one or two values."""
    r = random.Random(seed)
    q = r.choice(["q", "(q * 0.5)", "sigmoid(q)"])
    mask = r.choice(["", " * (s < t)"])
    two = r.random() < 0.5
    decay = r.choice(DECAYS)
    return f"""
mixer rand{seed} {{
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  {"input u : [H, V]" if two else ""}
  input f : [H, K]
  {"param A : [H, K] = normal(0, 0.5)" if "A" in decay else ""}
  let M = {decay} * ({q} @ k^T){mask}
  out y = M @ v{" + M @ u" if two else ""}
}}
"""


@pytest.mark.parametrize("seed", range(3))
def test_random_per_channel_programs(compiled, monkeypatch, seed):
    src = random_program(seed)
    m = compiled(src, tri_chunk=32)
    tps = [tp for mp in m._impl.plan.matrices for tp in mp.terms]
    if not any(per_channel.handles(tp) for tp in tps):
        pytest.skip("planned without a per-channel chunked term")
    calls = triton_only(m, monkeypatch)
    r = random.Random(100 + seed)
    # T = 9: under a chunk and decode-sized, still the chunked kernels (a gradient is needed)
    B, T, H, K, V = 2, [9, 40, 67][seed], 2, r.choice([3, 12]), r.choice([5, 9])
    g = torch.Generator().manual_seed(seed)
    args = {n: torch.randn(B, T, H, K if n in "qkf" else V, generator=g, dtype=f64)
            for n in m.program.inputs}
    if "A" in m.program.params:
        args["A"] = torch.randn(H, K, generator=g, dtype=f64) * 0.5
    assert_grads_match(m, compiled(src, "dense"), args, torch.float32, 1e-4)
    assert calls


def test_float64_gradients_run_the_torch_backend(compiled):
    m = compiled("gla")
    args = make_inputs("gla", B=1, T=40, seed=17)
    assert_grads_match(m, compiled("gla", "dense"), args, f64, 1e-10)


def test_tuner_times_the_kernels_with_its_knobs(compiled, monkeypatch):
    """The tuner's run (forward and backward) goes through the per-channel
    kernels, with the config it times."""
    m = mixerc.compile("gla", backend="triton")
    calls = triton_only(m, monkeypatch)
    problem = m.tuning_problem({"B": 1, "T": 40, "H": 2, "K": 6, "V": 5})
    config = dict(problem.space.default(problem.shape))
    config.update({"y.tri_chunk": 32, "y.tri_sub": 32, "y.bwd_block_k": 32,
                   "y.algorithm": "chunks"})  # at these sizes the cost model picks the scan
    problem.runner(config)()
    assert calls == [(32, 32, 32, 8, 2, 32)]


def test_no_double_backward(compiled):
    m = compiled("gla")
    args = {n: x.float().requires_grad_(True)
            for n, x in make_inputs("gla", B=1, T=20, seed=18).items()}
    y = m(**args)
    (gq,) = torch.autograd.grad(y.sum(), args["q"], create_graph=True)
    # the backward op has no autograd formula of its own
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gq.sum().backward()
