"""Softmax (flash) kernels' helpers: the device functions the rendered score
modifications call, the block lists that drive block skipping, and how the
forward op's autograd calls the backward op (attention_op_grads, registered
by runtime/triton/ops.py custom_op_pair).

Block lists: for every query block, the key blocks its kernel visits and, per
block, whether the mask must be evaluated pair by pair (partial: the block
straddles the mask or the last key) or holds on the whole block (full); blocks the band or the mask rule out are not listed,
so the kernel never loads them. The backward's dK/dV kernel walks the same
pairs from the key side (the transposed lists)."""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _mx_softplus(x):
    # log(1 + e^x) without overflow: x + log(1 + e^-x) for x > 0
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _mx_tanh(x):
    # tanh from exp (libdevice does not run in the interpreter), e^-2|x| never overflows
    e = tl.exp(-2.0 * tl.abs(x))
    return tl.where(x >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)


@triton.jit
def _mx_pow(a, b):
    # a^b for a > 0 (the dense reference is nan below 0 except at integer b)
    return tl.exp(b * tl.log(a))


def _pack(visit, partial):
    """(indices, kinds, counts) of the True entries of visit [L, N] per row,
    in increasing order, as int32 [L, max(1, most per row)], [L, ...], [L]."""
    counts = visit.sum(1)
    width = max(1, int(counts.max())) if visit.numel() else 1
    order = torch.argsort((~visit).to(torch.int8), dim=1, stable=True)[:, :width]
    kinds = partial.gather(1, order)
    # row-major, as the kernels index them (row * width + i): argsort and gather
    # keep the strides of a transposed `visit` (the per-key-block lists), and
    # .to() keeps those of a dense tensor
    return tuple(x.to(torch.int32).contiguous() for x in (order, kinds, counts))


def _as4(x):
    return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def tile_masks(bounds, n_q, n_k):
    """(full, any) bool [Bx, Hx, n_q, n_k] from a mask's (must, may) tile
    bounds (which broadcast to [..., n_q, n_k]): per batch and head where the
    mask reads per-token or per-head values, so a document mask skips each
    sequence's own blocks."""
    return tuple(_as4(torch.as_tensor(x, dtype=torch.bool)).broadcast_to(
        *_as4(torch.as_tensor(x)).shape[:2], n_q, n_k) for x in bounds)


def block_lists(T, S, past, start, lo, hi, block_q, block_k, tile_full, tile_any, exact,
                window, device):
    """Block lists for a launch (see _block_lists); those the band alone
    decides are cached per shape and device (read-only for the kernels), so a
    repeated call neither rebuilds them nor copies them to the device again."""
    if tile_any is None:
        return _band_lists(T, S, past, start, float(lo), float(hi), block_q, block_k, exact,
                           window, torch.device(device))
    return _block_lists(T, S, past, start, lo, hi, block_q, block_k, tile_full, tile_any,
                        exact, window, device)


@functools.lru_cache(maxsize=64)
def _band_lists(T, S, past, start, lo, hi, block_q, block_k, exact, window, device):
    return _block_lists(T, S, past, start, lo, hi, block_q, block_k, None, None, exact,
                        window, device)


def _block_lists(T, S, past, start, lo, hi, block_q, block_k, tile_full, tile_any, exact,
                 window, device):
    """Block lists for queries at times past .. past + T - 1 and keys at start ..
    start + S - 1 under the band lo <= t - s <= hi, refined by the mask's tile
    classes (bool [Bx, Hx, n_q, n_k] with Bx in {1, B}, Hx in {1, H}; None:
    the band decides alone; exact: the band is the whole mask).

    Returns (bidx, bkind, bcnt, qidx, qkind, qcnt, Bx, Hx): per (b, h, query
    block) row the key blocks to visit (row ((b % Bx) * Hx + h % Hx) * n_q + i),
    and per (b, h, key block) row the query blocks, all int32 on `device`."""
    n_q, n_k = -(-T // block_q), -(-S // block_k)
    i = torch.arange(n_q, dtype=torch.float64)[:, None]
    j = torch.arange(n_k, dtype=torch.float64)[None, :]
    t0 = past + i * block_q
    t1 = past + torch.clamp((i + 1) * block_q, max=T) - 1
    s0 = start + j * block_k
    s1 = start + torch.clamp((j + 1) * block_k, max=S) - 1
    d_min, d_max = t0 - s1, t1 - s0  # t - s over the block pair
    visit = (d_max >= lo) & (d_min <= hi)
    full = (d_min >= lo) & (d_max <= hi)
    if tile_any is not None:
        visit = visit & tile_any
        full = full & tile_full
    elif not exact:
        full = torch.zeros_like(full)  # no bounds on the mask: evaluate it everywhere
    if window:
        full = full & (s0 >= 0)  # window slots not filled yet hold no key
    # the kernels mask keys past the end only on partial blocks
    full = full & ((j + 1) * block_k <= S)
    full = full & visit
    visit, full = torch.broadcast_tensors(_as4(visit), _as4(full))
    Bx, Hx = visit.shape[0], visit.shape[1]
    partial = visit & ~full
    rows = _pack(visit.reshape(-1, n_k), partial.reshape(-1, n_k))
    cols = _pack(visit.transpose(-1, -2).reshape(-1, n_q),
                 partial.transpose(-1, -2).reshape(-1, n_q))
    return tuple(x.to(device) for x in rows + cols) + (Bx, Hx)


@triton.jit
def _mx_tile(ptrs, row_ok, offs_col, n_cols: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # a [rows, BLOCK_COLS] tile, rows past the end and padding columns read as 0
    # (no column mask when the width is a power of 2: fewer predicate registers)
    if n_cols == BLOCK_COLS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & (offs_col[None, :] < n_cols), other=0.0)


def attention_op_grads(bwd, inputs, outputs, do, dlse):
    """The six input gradients of forward(q, k, v, rows, cols, heads, *ints
    and floats) -> (o, lse), kept outputs included: backward(do, q, k, v, o,
    lse, rows, cols, heads, *the same)."""
    q, k, v, rows, cols, heads, *args = inputs
    return bwd(do, q, k, v, *outputs, rows, cols, heads, *args)
