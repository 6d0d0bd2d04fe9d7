"""The per-channel scan's decode step (templates/triton_scan.py.jinja
`_decode`): with a factored log-decay (Mamba-1's -exp(A_log) times delta,
H3's, a plain dt given) a decode step of up to 16 tokens is one launch of
the scan's forward kernel without checkpoints, which computes the maps
(delta = softplus(dt + dt_bias), the values' scale delta * x) and the skip
term D * x on load as in a prefill, and updates the state in place
(runtime/triton/recurrent.py step_state). An unfactored log-decay (GLA's)
stays on the recurrence kernel.

Against the dense float64 interpreter: a prefill of the scan kernel (21
tokens, not a multiple of any block), single-token steps, blocks of 5 and
16 tokens from the state, batch 3, q and k at one head or at groups, value
dims above 1, strict masks, random mapped programs, float32 and bfloat16,
outputs poisoned; the state after the steps equals the torch backend's
(float64), and a prefill by the chunked kernels continues into the same
steps. Every step is exactly one kernel launch and runs none of the torch
paths (the prologue, the recurrence kernel); the state's buffer is the same
across steps and an older state is refused. Kernels run in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import (assert_one_launch_per_step, assert_steps_in_place, compiled_mixers,
                      rel_err, to_device)
from reference import make_inputs
from test_triton_decode_fused import no_torch_paths
from test_triton_scan import GROUPED, STRICT, grouped_inputs, strict_inputs
from test_triton_scan_prologue import SEEDS, mapped_program
from test_triton_scan_prologue import args_of as mapped_args


pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

# dt as given (no map) times -exp(A_log): the factored path without maps or
# skip; q and k at groups, K = 5 and V = 3 (masked lanes, several columns)
PLAIN = """mixer plain_factored {
  dims H, G divides H, K, V
  input q : [G, K]
  input k : [G, K]
  input v : [H, V]
  input dt : [H]
  param A_log : [H, K] = log(uniform(1, 4))
  out y = (decay(-exp(A_log) * dt) * (q @ k^T)) @ v
}"""
# the same with a strict mask: y_t reads the state before token t's update
STRICT_PLAIN = PLAIN.replace("plain_factored", "plain_strict").replace(
    "(q @ k^T))", "(q @ k^T) * (s < t))")


def plain_inputs(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return dict(q=r(B, T, 2, 5), k=r(B, T, 2, 5), v=r(B, T, 6, 3),
                dt=torch.rand(B, T, 6, generator=g, dtype=f64) * 0.5, A_log=r(6, 5) * 0.5)


# (source, inputs(B, T, seed), the scan term's state key)
CASES = {
    "mamba": ("mamba", lambda B, T, s: make_inputs("mamba", B=B, T=T, seed=s), "M"),
    "h3": ("h3", lambda B, T, s: make_inputs("h3", B=B, T=T, seed=s), "K"),
    "grouped": (GROUPED, lambda B, T, s: grouped_inputs(B, T, H=6, G=2, K=5, V=2, seed=s), "y"),
    "plain": (PLAIN, plain_inputs, "y"),
    "plain_strict": (STRICT_PLAIN, plain_inputs, "y"),
    **{f"mapped{s}": (mapped_program(s), None, "M") for s in SEEDS},
}


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


def inputs(name, m, B, T, seed):
    make = CASES[name][1]
    return mapped_args(m, B=B, T=T, seed=seed) if make is None else make(B, T, seed)


def scan_kernel(mod, suffix="_fwd") -> str:
    # (not the fitness table's alias of the forward kernel, <name>_fwd_decode)
    (name,) = [n for n in vars(mod) if n.startswith("per_channel_scan") and n.endswith(suffix)
               and not n.endswith("_fwd" + suffix)]
    return name


def slicer(m, x):
    """(block(a, b), step(t)): the token inputs over [a, b) or at t, the rest as given."""
    tokens = set(m.program.inputs)
    return (lambda a, b: {n: (v[:, a:b] if n in tokens else v) for n, v in x.items()},
            lambda t: {n: (v[:, t] if n in tokens else v) for n, v in x.items()})


def test_the_cases_scan_with_a_factored_decay(compiled):
    """Each case's scan term factors its log-decay (else its decode step is
    the recurrence kernel's and the tests below would not test the fused one),
    and explain says where its decode step runs."""
    for name, (src, _, key) in CASES.items():
        m = compiled(src)
        mod = m._impl.module
        assert scan_kernel(mod, "_decode"), name
        assert key in mod.STATE_KEYS, name
        assert "a decode step: with the scan one launch of its forward kernel" in m.explain()
    assert "forward kernel without checkpoints (the maps and the skip on load)" in \
        compiled("mamba").explain()


@pytest.mark.parametrize("name", list(CASES))
def test_steps_are_one_launch_equal_dense(name, compiled, launches, monkeypatch, poisoned):
    """Prefill 21 tokens (the scan), 3 single-token steps, a 5-token and a
    16-token block from the state, then single steps, batch 3: each equals
    dense; every step after the prefill is one launch of the scan's forward
    kernel and nothing else, on the same state buffer; the state after them
    equals the torch backend's in float64."""
    src, _, key = CASES[name]
    m, d = compiled(src), compiled(src, "dense")
    mod = m._impl.module
    args = inputs(name, m, 3, 47, 1)
    want = d(**args)
    block, step = slicer(m, to_device(args, torch.float32))
    with torch.no_grad():
        y, state = m(**block(0, 21), return_state=True)
        assert rel_err(y.cpu(), want[:, :21]) < 1e-4
        no_torch_paths(mod, monkeypatch)
        state, t = assert_one_launch_per_step(m, to_device(args, torch.float32), want,
                                              launches, scan_kernel(mod), 21, state, key)
    assert t == 47
    _, s_ref = compiled(src, "torch")(**args, return_state=True)
    assert rel_err(state.tensors[key].cpu(), s_ref.tensors[key]) < 1e-4


@pytest.mark.parametrize("name", ["mamba", "plain"])
def test_an_older_state_is_refused_a_clone_continues(name, compiled):
    """Continuing a state that was already continued is a MixerValueError;
    a clone taken before continues correctly; the prefill's state is never
    written (its first step copies it into a fresh buffer)."""
    src, _, key = CASES[name]
    m, d = compiled(src), compiled(src, "dense")
    args = inputs(name, m, 2, 22, 2)
    want = d(**args)
    assert_steps_in_place(m, to_device(args, torch.float32), want, key)


def test_a_chunked_prefill_continues_into_the_steps(compiled, launches):
    """The per-channel chunked kernels' state (the algorithm knob: chunks) has
    the [B, H, K, V] float32 layout the scan's decode step reads."""
    m, d = compiled("mamba"), compiled("mamba", "dense")
    mod = m._impl.module
    args = make_inputs("mamba", B=3, T=26, seed=5)
    want = d(**args)
    block, step = slicer(m, to_device(args, torch.float32))
    chunks = compiled_mixers(algorithm="chunks")("mamba")  # the same mixer, pinned to chunks
    with torch.no_grad():
        y, state = chunks(**block(0, 23), return_state=True)
        assert "per_channel_fwd" in launches  # the chunked kernels ran the prefill
        assert not any(n.startswith("per_channel_scan") for n in launches)
        assert rel_err(y.cpu(), want[:, :23]) < 1e-4
        assert state.tensors["M"].shape == (3, 6, 4, 1)
        for t in range(23, 26):
            del launches[:]
            y, state = m.step(state, **step(t))
            assert launches == [scan_kernel(mod)] and rel_err(y.cpu(), want[:, t]) < 1e-4, t


@pytest.mark.parametrize("name", ["mamba", "mapped3"])
def test_half_precision_steps(name, compiled, launches, bf16_dots):
    """bf16 inputs: the kernel reads x, dt, B and C in bf16 and computes the
    maps, the state and the skip in float32; y comes back in bf16."""
    src, _, key = CASES[name]
    m, d = compiled(src), compiled(src, "dense")
    args = inputs(name, m, 3, 28, 3)
    want = d(**args)
    x = to_device(args, torch.bfloat16)
    x = {n: (v if v.dim() >= 3 else v.float()) for n, v in x.items()}  # params in float32
    block, step = slicer(m, x)
    with torch.no_grad():
        _, state = m(**block(0, 19), return_state=True)
        for t in range(19, 23):
            del launches[:]
            y, state = m.step(state, **step(t))
            assert launches == [scan_kernel(m._impl.module)], launches
            assert y.dtype == torch.bfloat16 and rel_err(y.float().cpu(), want[:, t]) < 2e-2, t
        y, state = m(**block(23, 28), initial_state=state, return_state=True)
        assert rel_err(y.float().cpu(), want[:, 23:]) < 2e-2
        assert state.tensors[key].dtype == torch.float32


def test_unfactored_decay_steps_on_the_recurrence_kernel(compiled, launches, poisoned):
    """A log-decay per token and channel (GLA's, [B, T, H, K]): the scan's
    state tile is strided by the value dim, so its decode step stays on the
    recurrence kernel (one launch) and renders no `_decode`. Here the
    log-decay is a map of f (log(sigmoid(f))): the chunked family's
    recurrence that computes it on load (`_fwd_step`, strict: y before the
    token's own update; tests/test_triton_scan_maps.py)."""
    m, d = compiled(STRICT), compiled(STRICT, "dense")
    mod = m._impl.module
    assert "a decode step: the recurrence kernel (the log-decay does not factor)" in m.explain()
    assert not [n for n in vars(mod) if n.startswith("per_channel_scan") and
                n.endswith("_decode")]
    args = strict_inputs(B=3, T=24, seed=6)
    want = d(**args)
    block, step = slicer(m, to_device(args, torch.float32))
    with torch.no_grad():
        _, state = m(**block(0, 21), return_state=True)
        for t in range(21, 24):
            del launches[:]
            y, state = m.step(state, **step(t))
            assert len(launches) == 1 and launches[0].endswith("_strict_fwd_step"), launches
            assert rel_err(y.cpu(), want[:, t]) < 1e-4
