"""Chunking helpers shared by the chunked (semiseparable) templates.

Pure torch; `mixerc compile` inlines this file into standalone modules.
"""

import torch
import torch.nn.functional as F

# Long inputs run in segments of about this many tokens, carrying the state:
# the chunked intermediates then stay a few MiB each, which the allocator
# reuses, instead of whole-sequence buffers that glibc maps and page-faults
# afresh on every call (that made T=16k ~1.3x slower per token than T=2k).
SEGMENT = 2048
# On an accelerator the caching allocator reuses buffers whatever their size,
# and each segment costs a few hundred kernel launches: segments only there to
# bound memory (temporaries of ~100 MiB per tensor at these lengths).
DEVICE_SEGMENT = 1 << 16


def segment_length(x) -> int:
    """Tokens per segment for inputs like `x` (on its device)."""
    return SEGMENT if x.device.type == "cpu" else DEVICE_SEGMENT


def to_chunks(x, chunk):
    """[B, T, H, *rest] -> [B, H, n, chunk, *rest], zero-padded at the end.

    Zero padding is harmless for causal chunked algorithms: padded steps have
    k = v = 0 (add nothing to the state) and log-decay 0 (do not decay it)."""
    B, T = x.shape[0], x.shape[1]
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.reshape(B, n, chunk, *x.shape[2:])
    # H in front of (n, chunk); contiguous, or every matmul below copies it again
    return x.movedim(3, 1).contiguous()


def from_chunks(y, T):
    """[B, H, n, chunk, V] -> [B, T, H, V]."""
    B, H, n, C = y.shape[:4]
    return y.movedim(1, 3).reshape(B, n * C, H, *y.shape[4:])[:, :T]


def scan_states(start, decay, local):
    """State entering each chunk, and the state after the last one.

    start: [B, H, K, V]; decay: [B, H, n] or [B, H, n, K] (total decay of each
    chunk, exp of the summed log-decay); local: [B, H, n, K, V] (each chunk's
    own contribution at its end). S_c = decay_c * S_{c-1} + local_c."""
    entering = []
    S = start
    for c in range(local.shape[2]):
        entering.append(S)
        d = decay[:, :, c]
        S = (d[..., None, None] if d.dim() == 2 else d[..., None]) * S + local[:, :, c]
    return torch.stack(entering, dim=2), S


def shift_chunks(x, o):
    """x [B, H, n, ...] with chunk i holding what chunk i - o held (zeros where
    that is outside 0..n-1): pairs each query chunk with the key chunk o back."""
    n = x.shape[2]
    if o == 0:
        return x
    pad = x.new_zeros(x.shape[:2] + (min(abs(o), n),) + x.shape[3:])
    if o > 0:
        return torch.cat([pad, x[:, :, :n - o]], 2)
    return torch.cat([x[:, :, -o:], pad], 2)


def chunks_outermost(x, chunk):
    """[B, T, H, *rest] -> [n, B H, chunk, *rest], zero-padded at the end, in one
    copy: a range of chunks is then a contiguous block (matmuls over it read a
    view)."""
    B, T, H = x.shape[:3]
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.reshape(B, n, chunk, H, *x.shape[3:]).movedim(1, 0).movedim(3, 2)
    return x.reshape(n, B * H, chunk, *x.shape[4:])


def from_chunks_outermost(y, B, T):
    """[n, B H, chunk, V] -> [B, T, H, V] (the first T steps)."""
    n, BH, C = y.shape[:3]
    y = y.reshape(n, B, BH // B, C, *y.shape[3:]).movedim(0, 1).movedim(3, 2)
    return y.reshape(B, n * C, BH // B, *y.shape[4:])[:, :T]
