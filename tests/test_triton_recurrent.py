"""The fixed-state decode step kernel (runtime/triton/recurrent.py) against
the recurrence in float64: no decay, a decay per head, per channel; strict
and not; q and k at fewer heads than v; several tokens per step; state in
place for the newest state, a fresh buffer otherwise, and a clear error for a
state that was already continued. Output and state buffers poisoned first."""


import pytest
import torch

import mixerc

pytest.importorskip("triton")
from mixerc.runtime.triton.recurrent import recurrent_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64


def reference(q, k, v, a, state, strict, H=None):
    B, T, _, V = v.shape
    H = H or v.shape[2]
    q = q.double().repeat_interleave(H // q.shape[2], 2)
    k = k.double().repeat_interleave(H // k.shape[2], 2)
    v = v.double().repeat_interleave(H // v.shape[2], 2)
    S = torch.zeros(B, H, q.shape[-1], V, dtype=f64) if state is None else state.double()
    ys = []
    for t in range(T):
        g = 1.0 if a is None else torch.exp(a[:, t].double())
        g = g if a is None else g[..., None] if a.dim() == 4 else g[..., None, None]
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        if strict:
            S = S * g
            ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
            S = S + kv
        else:
            S = S * g + kv
            ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("decay", ["none", "head", "channel"])
@pytest.mark.parametrize("strict", [False, True])
def test_steps_equal_the_recurrence(decay, strict, poisoned):
    g = torch.Generator().manual_seed(0)
    B, H, HQ, K, V = 2, 4, 2, 5, 70  # padded rows (K) and columns (V) of the state tile
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    x = [(r(B, T, HQ, K), r(B, T, HQ, K), r(B, T, H, V),
          None if decay == "none" else -torch.rand(B, T, H, *((K,) if decay == "channel" else ()),
                                                   generator=g, dtype=f64) * 2)
         for T in (3, 1, 2)]
    state_ref = r(B, H, K, V)
    state = state_ref.float().to(DEVICE)
    for q, k, v, a in x:
        want, state_ref = reference(q, k, v, a, state_ref, strict)
        dev = [None if t is None else t.float().to(DEVICE) for t in (q, k, v, a)]
        y, state = recurrent_step(*dev, state, strict, "test")
        assert (y.cpu().double() - want).abs().max() < 1e-5
        assert (state.cpu().double() - state_ref).abs().max() < 1e-5


def test_values_at_group_heads():
    """v at fewer heads than the decay (a per-head decay over shared values)."""
    g = torch.Generator().manual_seed(2)
    B, T, H, K, V = 2, 2, 4, 8, 16
    q, k = torch.randn(B, T, 1, K, generator=g), torch.randn(B, T, 2, K, generator=g)
    v, a = torch.randn(B, T, 2, V, generator=g), -torch.rand(B, T, H, generator=g)
    y, state = recurrent_step(q, k, v, a, None, False, "test", heads=H)
    want, s_want = reference(q, k, v, a, None, False, H=H)
    assert y.shape == (B, T, H, V) and (y.double() - want).abs().max() < 1e-5
    assert (state.double() - s_want).abs().max() < 1e-5


def test_newest_state_in_place_older_refused_clone_kept():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 2, 8, generator=g), torch.randn(1, 1, 2, 8, generator=g)
    v = torch.randn(1, 1, 2, 16, generator=g)
    s0 = torch.randn(1, 2, 8, 16, generator=g)
    _, s1 = recurrent_step(q, k, v, None, s0, False, "term y")
    assert s1.data_ptr() != s0.data_ptr()   # a prefill's state is never written
    kept = s1.clone()
    _, s2 = recurrent_step(q, k, v, None, s1, False, "term y")
    assert s2.data_ptr() == s1.data_ptr()   # the newest state: updated in place
    with pytest.raises(mixerc.MixerError, match="term y: this decode state was already"):
        recurrent_step(q, k, v, None, s1, False, "term y")
    y, _ = recurrent_step(q, k, v, None, kept, False, "term y")
    want, _ = reference(q, k, v, None, kept, False)
    assert (y.double() - want).abs().max() < 1e-5
