"""Attention helpers for generated modules (flash strategy). Pure torch.

Positions: a block of queries sits after `past` cached keys, so query i is at
time past + i and key j (cache first, then the block's own keys) at time j.
A band lo <= t - s <= hi (bounds may be +-math.inf) says which pairs mix.
"""

import math

import torch
import torch.nn.functional as F


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


def inside_band(t0, t1, s0, s1, lo, hi):
    """Every pair of queries [t0, t1) x keys [s0, s1) has lo <= t - s <= hi."""
    return t0 - (s1 - 1) >= lo and (t1 - 1) - s0 <= hi


def band_keep(t_pos, s_pos, lo, hi):
    """Which pairs of a tile lie in the band lo <= t - s <= hi (bool)."""
    d = t_pos - s_pos
    return (d >= lo) & (d <= hi)


def tile_classes(bounds, n_q, n_k):
    """(full, any) as [n_q][n_k] lists of bools from a mask's (must, may) tile
    bounds, which broadcast to [..., n_q, n_k]: a tile is full when the mask
    holds on all of it for every batch and head, and is visited when it may
    hold somewhere."""
    out = []
    for x, reduce in zip(bounds, (torch.all, torch.any)):
        x = torch.as_tensor(x, dtype=torch.bool)
        x = x.reshape((1,) * max(0, 2 - x.dim()) + tuple(x.shape))
        x = x.broadcast_to(*x.shape[:-2], n_q, n_k).reshape(-1, n_q, n_k)
        out.append(reduce(x, 0).tolist())
    return out[0], out[1]


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def sdpa_attention(q, k, v, causal, dtype=None):
    """softmax(q k^T) v with SDPA's fused kernels (scale 1: the scale is in q),
    computed in `dtype` (bf16/fp16 on a GPU: its flash kernel), returned in
    q's dtype. q: [B, T, H, D]; k, v: [B, S, Hk, *] with Hk dividing H
    (grouped heads are passed as they are where SDPA supports it)."""
    out_dtype = q.dtype
    q, k, v = (x.transpose(1, 2).to(dtype or out_dtype) for x in (q, k, v))
    r = q.shape[1] // k.shape[1]
    if r > 1 and not _SDPA_GQA:  # torch < 2.5: repeat the key heads for the call only
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    extra = {"enable_gqa": True} if r > 1 and _SDPA_GQA else {}
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0, **extra)
    return y.transpose(1, 2).to(out_dtype)


def tokens_seen(pos):
    """The token count a cache's `pos` [B] records (0 for meta tensors: shapes
    only, no values to read)."""
    return 0 if pos.device.type == "meta" or not pos.numel() else int(pos[0])


def add_range(ranges, a, b):
    """Append [a, b) to a sorted list of ranges, merging it with the last one
    when they touch."""
    if ranges and ranges[-1][1] == a:
        ranges[-1] = (ranges[-1][0], b)
    else:
        ranges.append((a, b))


def gather_runs(keys, values, cols, runs, partial, start, dtype):
    """The keys, values and per-key values [B, Hk, S, *] of the ranges `runs`,
    side by side (views when there is one range), their times, and `partial`
    re-expressed in the gathered positions."""
    if len(runs) == 1:
        a, b = runs[0]
        K, V, C = keys[:, :, a:b], values[:, :, a:b], [c[:, :, a:b] for c in cols]
        pos = torch.arange(start + a, start + b, device=keys.device, dtype=dtype)
    else:
        K = torch.cat([keys[:, :, a:b] for a, b in runs], 2)
        V = torch.cat([values[:, :, a:b] for a, b in runs], 2)
        C = [torch.cat([c[:, :, a:b] for a, b in runs], 2) for c in cols]
        pos = torch.cat([torch.arange(start + a, start + b, device=keys.device, dtype=dtype)
                         for a, b in runs])
    where, offset, i = [], 0, 0
    for a, b in runs:  # both lists are sorted: walk them together
        while i < len(partial) and partial[i][0] < b:
            c0, c1 = max(partial[i][0], a), min(partial[i][1], b)
            if c0 < c1:
                where.append((offset + c0 - a, offset + c1 - a))
            if partial[i][1] <= b:
                i += 1
            else:
                break
        offset += b - a
    return K, V, C, pos, where


# scores one softmax piece may hold (elements): 64 MiB in float32
SCORE_BUDGET = 1 << 24


def piece_keys(B, H, n, block_k):
    """Keys per softmax piece for n queries of B x H heads: whole tiles, at
    least one, the scores within SCORE_BUDGET."""
    return max(block_k, SCORE_BUDGET // max(1, B * H * n) // block_k * block_k)


def mask_ranges(score, masked, grad):
    """score with -inf where the mask rules a pair out: `masked` lists
    (start, end, allowed) column ranges of the tile; elsewhere it holds."""
    for c0, c1, keep in masked:
        if grad:
            score = torch.cat([score[..., :c0], score[..., c0:c1].masked_fill(~keep, -math.inf),
                               score[..., c1:]], -1)
        else:
            score[..., c0:c1].masked_fill_(~keep, -math.inf)
    return score
