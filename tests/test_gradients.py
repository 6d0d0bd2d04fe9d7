"""Gradients of the torch backend against the dense interpreter, and the
chunked strategy's adjoint backward (runtime/autograd.py) on its own."""

import itertools

import pytest
import torch
from conftest import CAUSAL, STDLIB, rel_err
from reference import make_inputs

from mixerc.codegen.torch.module import _env
from mixerc.runtime.torch import autograd, chunks
from mixerc.runtime.bind import bind

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("fresh_cache")


def small_config(m):
    """Chunks of 4 (sub-chunks of 2), so T = 13..23 spans several, the last partial."""
    cfg = dict(m._impl.module.DEFAULT_CONFIG)
    for key in cfg:
        if key.endswith(".chunk"):
            cfg[key] = 4
        elif key.endswith(".sub"):
            cfg[key] = 2
    return cfg


def run_torch(m, args, **kw):
    bound = bind(m.signature, args, check_finite=False)
    outs, state = m._impl.forward(bound, config=small_config(m), **kw)
    return outs[0], state


def leaves(name, T, seed):
    args = make_inputs(name, B=2, T=T, seed=seed)
    return {k: v.clone().requires_grad_() for k, v in args.items()}


def grads(y, w, args):
    return torch.autograd.grad((y * w).sum(), list(args.values()), allow_unused=True)


@pytest.mark.parametrize("name", STDLIB)
def test_gradients_equal_dense(name, compiled):
    T = 17
    args = leaves(name, T, seed=21)
    y_ref = compiled(name, "dense")(**args)
    w = torch.randn(y_ref.shape, dtype=f64, generator=torch.Generator().manual_seed(5))
    ref = grads(y_ref, w, args)
    y, _ = run_torch(compiled(name), args)
    got = grads(y, w, args)
    assert rel_err(y, y_ref) < 1e-9
    for n, g, r in zip(args, got, ref):
        assert r is not None, n
        assert g is not None, f"{name}: no gradient for {n}"
        assert rel_err(g, r) < 1e-8, n


@pytest.mark.parametrize("name", CAUSAL)
def test_gradients_through_a_carried_state(name, compiled):
    """Prefill a prefix, continue from its state: gradients reach the prefix
    through the state (dS of the first call, dS0 of the second)."""
    T, cut = 23, 10
    args = leaves(name, T, seed=22)
    m = compiled(name)
    y_ref = compiled(name, "dense")(**args)
    w = torch.randn(y_ref.shape, dtype=f64, generator=torch.Generator().manual_seed(6))
    ref = grads(y_ref, w, args)
    part = lambda a, b: {k: (v[:, a:b] if k in m.program.inputs else v)  # noqa: E731
                         for k, v in args.items()}
    y1, state = run_torch(m, part(0, cut), return_state=True)
    y2, _ = run_torch(m, part(cut, T), initial_state=state)
    got = grads(torch.cat([y1, y2], 1), w, args)
    for n, g, r in zip(args, got, ref):
        assert rel_err(g, r) < 1e-8, n


def render(strict, has_decay, segment=chunks.SEGMENT):
    src = _env().get_template("chunked.py.jinja").render(
        name="f", per_channel=False, strict=strict, has_decay=has_decay, title="test")
    from mixerc.runtime.torch.scalars import floored
    ns = {"torch": torch, "to_chunks": chunks.to_chunks, "from_chunks": chunks.from_chunks,
          "scan_states": chunks.scan_states, "segment_length": lambda x: segment,
          "floored": floored}
    exec(src, ns)
    return ns["f"]


@pytest.mark.parametrize("strict,has_decay,T", [(s, d, T) for s, d in
                                                itertools.product([False, True], repeat=2)
                                                for T in (1, 7)] + [(False, True, 6)])
def test_gradcheck_adjoint_function(strict, has_decay, T):
    """y and the final state w.r.t. q, k, v, a and a nonzero initial state;
    chunks of 3: one chunk (T = 1), a partial last chunk (7), whole chunks (6)."""
    fwd = render(strict, has_decay)
    g = torch.Generator().manual_seed(T + 2 * strict + 4 * has_decay)
    B, H, K, V = 1, 2, 2, 3
    r = lambda *s: torch.randn(*s, dtype=f64, generator=g).requires_grad_()  # noqa: E731
    q, k, v, S0 = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, H, K, V)
    a = (-torch.rand(B, T, H, dtype=f64, generator=g)).requires_grad_() if has_decay else None
    xs = [x for x in (q, k, v, a, S0) if x is not None]

    def f(*xs):
        it = iter(xs)
        q, k, v = next(it), next(it), next(it)
        a = next(it) if has_decay else None
        return autograd.ChunkedFn.apply(fwd, 3, q, k, v, a, next(it))
    assert torch.autograd.gradcheck(f, xs)
    # one output unused: its gradient arrives as None
    assert torch.autograd.gradcheck(lambda *xs: f(*xs)[0], xs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *xs: f(*xs)[1], xs, fast_mode=True)


@pytest.mark.parametrize("strict", [False, True])
def test_gradcheck_segmented_forward(strict):
    """Long inputs run in segments of SEGMENT tokens (here 6, chunks of 3): the
    forward, its chunk states and the adjoint backward stay exact."""
    fwd, whole = render(strict, True, segment=6), render(strict, True, segment=10 ** 9)
    g = torch.Generator().manual_seed(5)
    B, T, H, K, V = 1, 17, 2, 2, 3
    r = lambda *s: torch.randn(*s, dtype=f64, generator=g).requires_grad_()  # noqa: E731
    q, k, v, S0 = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, H, K, V)
    a = (-torch.rand(B, T, H, dtype=f64, generator=g)).requires_grad_()
    y, S, states = fwd(q, k, v, a, S0, 3, chunk_states=True)
    y2, S2, states2 = whole(q, k, v, a, S0, 3, chunk_states=True)
    assert torch.allclose(y, y2) and torch.allclose(S, S2) and torch.allclose(states, states2)
    assert torch.autograd.gradcheck(
        lambda *xs: autograd.ChunkedFn.apply(fwd, 3, *xs), (q, k, v, a, S0))


@pytest.mark.parametrize("wanted", ["q", "k", "v", "a", "state"])
def test_adjoint_with_one_input_requiring_grad(wanted):
    """The backward skips the adjoint runs nobody needs; what it returns
    matches autograd through the chunks."""
    fwd = render(False, True)
    g = torch.Generator().manual_seed(1)
    B, T, H, K, V = 2, 11, 2, 3, 4
    xs = dict(q=torch.randn(B, T, H, K, dtype=f64, generator=g),
              k=torch.randn(B, T, H, K, dtype=f64, generator=g),
              v=torch.randn(B, T, H, V, dtype=f64, generator=g),
              a=-torch.rand(B, T, H, dtype=f64, generator=g),
              state=torch.randn(B, H, K, V, dtype=f64, generator=g))
    xs[wanted].requires_grad_()
    w = torch.randn(B, T, H, V, dtype=f64, generator=g)
    wS = torch.randn(B, H, K, V, dtype=f64, generator=g)
    got = []
    for f in (lambda *x: autograd.ChunkedFn.apply(fwd, 4, *x), lambda *x: fwd(*x, 4)):
        y, S = f(*xs.values())
        got.append(torch.autograd.grad((y * w).sum() + (S * wS).sum(), xs[wanted])[0])
    assert rel_err(got[0], got[1]) < 1e-12


def grad_fn_names(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [nxt for nxt, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen}


def test_ssd_uses_the_adjoint_backward(compiled, monkeypatch):
    monkeypatch.setattr(autograd, "ADJOINT_BACKWARD", True)  # whatever the environment says
    assert "chunked_apply(chunked_has_decay," in compiled("ssd").source("torch")
    args = leaves("ssd", 9, seed=3)
    y, _ = run_torch(compiled("ssd"), args)
    assert "ChunkedFnBackward" in grad_fn_names(y)
    monkeypatch.setattr(autograd, "ADJOINT_BACKWARD", False)  # the switch for comparisons
    y, _ = run_torch(compiled("ssd"), args)
    assert "ChunkedFnBackward" not in grad_fn_names(y)
    with torch.no_grad():  # inference never builds the Function
        assert run_torch(compiled("ssd"), args)[0].grad_fn is None


def test_gla_differentiates_through_the_chunks(compiled):
    """Per-channel decay: no adjoint template yet, autograd records the chunks."""
    assert "# backward: autograd through the chunks" in compiled("gla").source("torch")
    y, _ = run_torch(compiled("gla"), leaves("gla", 9, seed=3))
    assert "ChunkedFnBackward" not in grad_fn_names(y)


def saved_bytes(fn):
    """Bytes autograd keeps for the backward (distinct storages)."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(storages.values())


def test_adjoint_saves_no_chunk_intermediates(compiled, monkeypatch):
    """O(T) saved memory: the adjoint keeps the inputs, autograd through the
    chunks keeps [chunk, chunk] blocks per chunk as well."""
    m = compiled("ssd")
    args = leaves("ssd", 512, seed=4)
    bound = bind(m.signature, args, check_finite=False)
    cfg = dict(m._impl.module.DEFAULT_CONFIG, **{"M.chunk": 64})
    run = lambda: m._impl.forward(bound, config=cfg)  # noqa: E731
    adjoint = saved_bytes(run)
    inputs = sum(x.numel() * x.element_size() for x in args.values())
    monkeypatch.setattr(autograd, "ADJOINT_BACKWARD", False)
    through_chunks = saved_bytes(run)
    assert adjoint < 4 * inputs < through_chunks


def test_float32_decay_gradient_does_not_degrade_with_length(compiled):
    """da_j sums the pair terms across j; the backward sums them by chunks
    from the chunk states (no running sum over the whole sequence), so
    float32 keeps its digits at T = 2048 (128 chunks)."""
    m = compiled("ssd")
    args = make_inputs("ssd", B=1, T=2048, seed=7)
    w = torch.randn(1, 2048, 4, 3, dtype=f64, generator=torch.Generator().manual_seed(8))
    cfg = dict(m._impl.module.DEFAULT_CONFIG, **{"M.chunk": 16})

    def grads_of(dtype):
        xs = {k: v.to(dtype).requires_grad_() for k, v in args.items()}
        y = m._impl.forward(bind(m.signature, xs, check_finite=False), config=cfg)[0][0]
        return torch.autograd.grad((y * w.to(dtype)).sum(), list(xs.values()))
    for n, g, r in zip(args, grads_of(torch.float32), grads_of(f64)):
        assert rel_err(g, r) < 5e-5, n
