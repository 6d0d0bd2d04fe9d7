"""Attention helpers for generated modules (flash strategy). Pure torch.

Positions: a block of queries sits after `past` cached keys, so query i is at
time past + i and key j (cache first, then the block's own keys) at time j.
A band lo <= t - s <= hi (bounds may be +-math.inf) says which pairs mix.
"""

import math

import torch


def key_span(t0, t1, lo, hi, n_keys):
    """Keys [first, last) that queries at times [t0, t1) may see under the band:
    every key block outside it is skipped, never computed."""
    first = 0 if hi == math.inf else max(0, t0 - int(hi))
    last = n_keys if lo == -math.inf else min(n_keys, t1 - int(lo))
    return first, max(first, last)


def allowed_pairs(t0, t1, s0, s1, lo, hi, filled, device):
    """Which (query, key) pairs of the block [t0, t1) x [s0, s1) may mix, as a
    bool [t1 - t0, s1 - s0] (band only) or [B, 1, t1 - t0, s1 - s0] (band and
    `filled` [B, S] or None, the cache slots that hold a token); None when
    all may."""
    ok = None
    if not (t0 - (s1 - 1) >= lo and (t1 - 1) - s0 <= hi):  # the block straddles the band
        d = torch.arange(t0, t1, device=device)[:, None] - torch.arange(s0, s1, device=device)
        ok = (d >= lo) & (d <= hi)
    if filled is not None:
        f = filled[:, None, None, s0:s1]
        ok = f if ok is None else ok & f
    return ok


def as_bias(ok, dtype):
    """A bool mask as an additive score bias (0 or -inf): adding it is much
    cheaper than masked_fill on the [B, H, n, m] scores."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, -math.inf)


def window_tail(x, size):
    """The last `size` steps of x [B, T, ...] along time, zero-padded in front
    when T < size: a window cache keeps one fixed shape from the first token."""
    T = x.shape[1]
    if T >= size:
        return x[:, T - size:]
    return torch.cat([x.new_zeros(x.shape[0], size - T, *x.shape[2:]), x], 1)
