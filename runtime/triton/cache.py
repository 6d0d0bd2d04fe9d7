"""The KV cache of a softmax term on the Triton backend: buffers [B, C, ...]
holding key (value, per-token value) s at slot s mod W, where W is the
window (the band's hi + 1; None: every key is kept). While the tokens fit,
slot s is just s; the capacity C grows by doubling up to W, after which the
buffer is a ring. A decode step writes its tokens into the buffers in place,
so the cache is never copied per token.

In place is safe only for the newest state of a buffer: each buffer records
(`_mixerc_tokens`) how many tokens the state that last wrote it had seen. A
state that was already continued (an older one reused: beam search, a retry)
no longer matches and gets a copy; a ring whose needed keys were overwritten
since is refused clearly (MixerState.clone() keeps a state reusable). Buffers
that were not written in place (a prefill's, a state moved with .to()) carry
no record and are copied on their first step."""

import functools

import torch
import triton
import triton.language as tl

from mixerc.runtime.bind import MixerValueError  # inline: drop

_WRITTEN = "_mixerc_tokens"  # attribute on a buffer: the tokens its last writer had seen


def cache_of(keys, total, window):
    """The cache layout (slot = time mod window) of keys [B, S, ...] holding the
    times total - S .. total - 1 (a prefill's keys, or the window's tail and
    the new block): no copy while nothing wraps."""
    if window is None or total <= window:
        return keys[:, keys.shape[1] - total:] if keys.shape[1] > total else keys
    tail = keys[:, keys.shape[1] - window:]
    return torch.roll(tail, shifts=total % window, dims=1)


def cache_in_order(buf, seen, window):
    """(keys in time order, time of the first) of a cache holding `seen` tokens."""
    if window is None or seen <= buf.shape[1]:
        return buf[:, :seen], 0
    return torch.roll(buf, shifts=-(seen % window), dims=1), seen - window


def check_not_stale(buf, seen, window, what):
    """A ring's keys that a state at `seen` tokens still needs may have been
    overwritten by a later step of the same buffer: refuse that state."""
    written = getattr(buf, _WRITTEN, None)
    if window is not None and written is not None and written - 1 >= max(seen + 1, window):
        raise MixerValueError(
            f"{what}: this decode state ({seen} tokens) was already continued to "
            f"{written} tokens, and those steps overwrote the window of keys it needs "
            "(the cache is updated in place); continue the newest state, or keep a copy "
            "with state.clone() before stepping")


def _writable(buf, seen, new, window, dtype):
    return (getattr(buf, _WRITTEN, None) == seen and buf.dtype == dtype
            and (not buf.is_inference() or torch.is_inference_mode_enabled())
            and (seen + new <= buf.shape[1] or buf.shape[1] == window))


def cache_append(bufs, xs, pos, seen, window):
    """Write xs (each [B, T, ...]) at slots (pos[b] + i) mod window of bufs
    (each [B, C, ...], or None at the first token), in place where the
    buffers belong to this state, else into a copy with room to grow.
    seen: the most tokens any sequence has seen (pos.max()). Returns the
    buffers."""
    T = xs[0].shape[1]
    if any(b is None for b in bufs):
        bufs = [None] * len(xs)
    if bufs[0] is None or not all(_writable(b, seen, T, window, x.dtype)
                                  for b, x in zip(bufs, xs)):
        bufs = [_grown(b, x, seen, T, window) for b, x in zip(bufs, xs)]
    B = xs[0].shape[0]
    times = pos[:, None] + torch.arange(T, device=pos.device)
    slots = times if window is None else times % window
    batch = torch.arange(B, device=pos.device)[:, None]
    for b, x in zip(bufs, xs):
        b[batch, slots] = x.to(b.dtype)
        setattr(b, _WRITTEN, seen + T)
    return bufs


def _grown(buf, x, seen, new, window):
    """A fresh buffer for x's kind of rows with room for seen + new tokens
    (doubling, at most the window), holding buf's slots."""
    need = seen + new
    # twice what is needed, in whole blocks of 64 slots
    cap = 64 * -(-2 * need // 64) if buf is None or buf.shape[1] < need else buf.shape[1]
    cap = cap if window is None else min(cap, window)
    dtype = x.dtype if buf is None else torch.promote_types(buf.dtype, x.dtype)
    out = torch.empty(x.shape[0], cap, *x.shape[2:], dtype=dtype, device=x.device)
    if buf is not None:
        kept = min(buf.shape[1], cap)
        out[:, :kept] = buf[:, :kept]
    return out


def cache_tokens(pos, uniform=False):
    """The most tokens any sequence of a cache has seen (pos [B]); uniform:
    they must all have seen as many (a prefill block over the cache)."""
    if pos.device.type == "meta" or not pos.numel():
        return 0  # shapes only, or no sequences
    most = int(pos.max())
    if uniform and int(pos.min()) != most:
        raise MixerValueError(
            "a block of several tokens continues a cache whose sequences have seen "
            f"{int(pos.min())} to {most} tokens: only decode steps (one token, or a few "
            "queries per head) run over sequences of different lengths")
    return most


@functools.lru_cache(maxsize=None)
def _multiprocessors(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_programs(device):
    """How many programs a decode launch should run to fill the device: two per
    streaming multiprocessor on a GPU; a few elsewhere (the interpreter), so
    there are several splits per (batch, key head) even there."""
    if device.type == "cuda":
        return 2 * _multiprocessors(device.index if device.index is not None
                                    else torch.cuda.current_device())
    return 16


@triton.jit
def _mx_combine(ACC, TOP, TOTAL, OUT, n_splits, n_rows, BLOCK_M: tl.constexpr, DV: tl.constexpr):
    # one (batch, key head) x BLOCK_M rows: the softmax over the splits' partial ones
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < n_rows
    cols = tl.arange(0, DV)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for i in range(0, n_splits):
        best = tl.maximum(best, tl.load(TOP + (n * n_splits + i) * n_rows + rows, mask=ok,
                                        other=float("-inf")))
    best = tl.where(best == float("-inf"), 0.0, best)  # a row no split saw a key for
    norm = tl.zeros([BLOCK_M], tl.float32)
    out = tl.zeros([BLOCK_M, DV], tl.float32)
    for i in range(0, n_splits):
        at = (n * n_splits + i) * n_rows + rows
        w = tl.exp2(tl.load(TOP + at, mask=ok, other=float("-inf")) - best)
        norm += w * tl.load(TOTAL + at, mask=ok, other=0.0)
        part = tl.load(ACC + at[:, None] * DV + cols[None, :], mask=ok[:, None], other=0.0)
        out += w[:, None] * part
    out = out / tl.where(norm > 0, norm, 1.0)[:, None]  # a row with no allowed key is 0
    tl.store(OUT + (n * n_rows + rows)[:, None] * DV + cols[None, :], out, mask=ok[:, None])


def combine_splits(acc, top, total):
    """Softmax over the splits of a decode launch: acc [N, splits, M, DV]
    (unnormalized), top and total [N, splits, M] (base-2 max and sum of
    each split) -> [N, M, DV], in one launch."""
    N, splits, M, DV = acc.shape
    out = torch.empty(N, M, DV, dtype=torch.float32, device=acc.device)
    block = min(16, M)
    _mx_combine[(N, -(-M // block))](acc, top, total, out, splits, M, BLOCK_M=block, DV=DV)
    return out
