"""The Triton backend's decode step (runtime/triton/cache.py and the split-K
kernel of templates/triton_flash.py.jinja) against the dense interpreter:
steps after a prefill and blocks of tokens between steps, over full caches
and rings that wrap (band masks), grouped heads, per-token values at the
keys, several splits per (batch, key head), fresh buffers poisoned with
NaN; the cache appended in place, states that were already continued, and
sequences of different lengths in one batch."""


import pytest
import torch
from conftest import compiled_mixers, rel_err

import mixerc
from mixerc.inputs import random_inputs
from test_plan_classes import FIXED, HEAD, inputs, instances, softmax_program

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

RING = HEAD.format(kh="G", body="  out y = softmax(q @ k^T / sqrt(D) - slope * (t - s), "
                               "mask = 0 <= t - s < 8 and col(doc) != 2) @ v")
STRICT_RING = HEAD.format(kh="H", body="  out y = softmax(q @ k^T, mask = 2 <= t - s < 7) @ v")
CAUSAL = [p for p in FIXED[:4] + instances(softmax_program, 8, 11)
          if mixerc.compile(p, backend="dense").causal] + [RING, STRICT_RING]


@pytest.fixture(scope="module")
def compiled():
    # several key blocks, hence splits, on short caches
    return compiled_mixers(block_k=16)


def split(m, x):
    tokens = set(m.program.inputs)
    block = lambda a, b: {n: (v[:, a:b] if n in tokens else v) for n, v in x.items()}  # noqa
    step = lambda t: {n: (v[:, t] if n in tokens else v) for n, v in x.items()}  # noqa
    return block, step


@pytest.mark.parametrize("src", CAUSAL, ids=range(len(CAUSAL)))
def test_steps_and_blocks_equal_dense(src, compiled, poisoned):
    """Prefill 5, 20 steps (rings of 7 or 8 slots wrap), a block of 4 over the
    cache, 11 more steps: every output against dense on the whole input."""
    m, d = compiled(src), compiled(src, "dense")
    args = inputs(m, B=2, T=40, seed=7)
    want = d(**args)
    block, step = split(m, {n: x.float().to(DEVICE) for n, x in args.items()})
    ys = []
    y, state = m(**block(0, 5), return_state=True)
    ys.append(y)
    for t in range(5, 25):
        y, state = m.step(state, **step(t))
        ys.append(y[:, None])
    y, state = m(**block(25, 29), initial_state=state, return_state=True)
    ys.append(y)
    for t in range(29, 40):
        y, state = m.step(state, **step(t))
        ys.append(y[:, None])
    got = torch.cat(ys, 1).cpu()
    for t in range(40):
        assert rel_err(got[:, t], want[:, t]) < 1e-4, t


def test_half_precision_steps(compiled):
    m, d = compiled(RING), compiled(RING, "dense")
    args = inputs(m, B=2, T=30, seed=8)
    want = d(**args)
    x = {n: (v.half() if n in m.program.inputs else v.float()).to(DEVICE)
         for n, v in args.items()}
    block, step = split(m, x)
    _, state = m(**block(0, 3), return_state=True)
    for t in range(3, 30):
        y, state = m.step(state, **step(t))
        assert y.dtype == torch.float16 and rel_err(y.cpu(), want[:, t]) < 2e-2, t


def test_the_cache_is_appended_in_place(compiled):
    """One buffer per doubling of the capacity, not a copy per token; the
    flash forward (a copy of the cache) never runs during the steps."""
    m = compiled(FIXED[0])
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.endswith("_op"))
    forward_calls = []
    real = getattr(mod, op)
    setattr(mod, op, lambda *a: forward_calls.append(1) or real(*a))
    try:
        args = inputs(m, B=1, T=130, seed=9)
        _, step = split(m, {n: x.float().to(DEVICE) for n, x in args.items()})
        state, buffers = None, set()
        for t in range(130):
            _, state = m.step(state, **step(t))
            buffers.add(state.tensors["y.k"].data_ptr())
    finally:
        setattr(mod, op, real)
    assert not forward_calls
    assert len(buffers) <= 2, len(buffers)  # 64, then 192 slots
    assert state.tensors["y.k"].shape[1] == 192 and int(state.tensors["y.pos"][0]) == 130


def test_a_state_continued_twice(compiled):
    """A full cache: the older state still computes the right thing (its
    tokens are intact; it gets a copy). A ring whose needed keys were
    overwritten: a clear error; clone() keeps a state reusable."""
    for src, steps in ((FIXED[0], 5), (RING, 1), (RING, 4)):
        m, d = compiled(src), compiled(src, "dense")
        args = inputs(m, B=2, T=30, seed=10)
        x = {n: v.float().to(DEVICE) for n, v in args.items()}
        block, step = split(m, x)
        _, s0 = m(**block(0, 20), return_state=True)
        for t in range(20, 25):
            _, s0 = m.step(s0, **step(t))
        kept = s0.clone()
        s = s0
        for t in range(25, 25 + steps):
            _, s = m.step(s, **step(t))
        # another continuation of s0: token 25 with other inputs
        other = {n: v.clone() for n, v in x.items()}
        for n in ("q", "k", "v"):
            other[n][:, 25] = torch.randn_like(other[n][:, 25])
        ref_args = {n: v.double().cpu() for n, v in other.items()}
        want = d(**{n: (v[:, :26] if n in m.program.inputs else v) for n, v in ref_args.items()})
        _, step_other = split(m, other)
        if src == RING and steps > 1:
            with pytest.raises(mixerc.MixerError, match="already continued"):
                m.step(s0, **step_other(25))
        else:
            y, _ = m.step(s0, **step_other(25))
            assert rel_err(y.cpu(), want[:, 25]) < 1e-4, (src, steps)
        y, _ = m.step(kept, **step_other(25))
        assert rel_err(y.cpu(), want[:, 25]) < 1e-4


@pytest.mark.parametrize("src,rewind", [(FIXED[3], 7), (RING, 12)], ids=["documents", "ring"])
def test_sequences_of_different_lengths(src, rewind, compiled, poisoned):
    """The kernel reads each sequence's own length (y.pos): sequence 1 rewound
    to `rewind` tokens continues as if it had only ever seen those (a ring of
    8 slots still holds the keys a rewind by one needs)."""
    m, d = compiled(src), compiled(src, "dense")
    args = inputs(m, B=2, T=24, seed=11)
    x = {n: v.float().to(DEVICE) for n, v in args.items()}
    block, step = split(m, x)
    _, state = m(**block(0, 12), return_state=True)
    _, state = m.step(state, **step(12))  # now an in-place buffer of 13 tokens
    state.tensors["y.pos"] = torch.tensor([13, rewind], device=DEVICE)
    tokens = set(m.program.inputs)
    for t in range(13, 24):
        y, state = m.step(state, **step(t))
        for b in (0, 1):  # sequence 1: tokens 0 .. rewind - 1, then 13 .. t
            seq = {n: (torch.cat([v[b:b + 1, :rewind], v[b:b + 1, 13:t + 1]], 1) if b else
                       v[b:b + 1, :t + 1]) if n in tokens else v for n, v in args.items()}
            want = d(**seq)[:, -1]
            assert rel_err(y[b:b + 1].cpu(), want) < 1e-4, (t, b)
    if src == RING:  # a block over a ring runs the prefill kernels: equal lengths only
        with pytest.raises(mixerc.MixerError, match="different lengths"):
            m(**block(0, 3), initial_state=state)


LOW_RANK = ["retnet", "ssd", "linear_attention"]  # fixed states: the fused decode kernel


@pytest.mark.parametrize("src", [FIXED[3], RING] + LOW_RANK, ids=["documents", "ring"] + LOW_RANK)
def test_stack_states_of_different_lengths(src, compiled, poisoned):
    """Separate prefills of 5 and 17 tokens stacked into one batch: the
    steps that follow equal the dense interpreter on each sequence."""
    m, d = compiled(src), compiled(src, "dense")
    sizes = {"H": 2, "G": 1, "K": 8, "V": 8, "N": 8, "P": 8}
    args = inputs(m, B=2, T=26, seed=12) if src not in LOW_RANK else \
        {n: x.double() for n, x in random_inputs(m.program, sizes, 2, 26, seed=12).items()}
    x = {n: v.float().to(DEVICE) for n, v in args.items()}
    tokens = set(m.program.inputs)
    one = lambda b, a, e: {n: (v[b:b + 1, a:e] if n in tokens else v) for n, v in x.items()}  # noqa
    lengths = (5, 17)
    states = [m(**one(b, 0, n), return_state=True)[1] for b, n in enumerate(lengths)]
    state = m.stack_states(states)
    for i in range(4):  # token lengths[b] + i of each sequence, in one batch
        step = {n: (torch.stack([v[b, lengths[b] + i] for b in range(2)]) if n in tokens else v)
                for n, v in x.items()}
        y, state = m.step(state, **step)
        for b, n in enumerate(lengths):
            seq = {k: (v[b:b + 1, :n + i + 1] if k in tokens else v) for k, v in args.items()}
            assert rel_err(y[b:b + 1].cpu(), d(**seq)[:, -1]) < 1e-4, (i, b)


def test_stack_states_refused_where_lengths_must_agree(compiled):
    m = mixerc.compile("attention", backend="torch")
    with pytest.raises(mixerc.MixerError, match="backend='triton'"):
        m.stack_states([None])
    t = compiled("sliding_window")
    with pytest.raises(mixerc.MixerError, match="MixerStates"):
        t.stack_states([])
    banded = compiled(FIXED[5])  # a window of a low-rank term: the torch backend's cache
    x = {n: v.float().to(DEVICE) for n, v in inputs(banded, B=1, T=9).items()}
    _, s1 = banded(**x, return_state=True)
    with pytest.raises(mixerc.MixerError, match="runs on the torch backend"):
        banded.stack_states([s1, s1])
