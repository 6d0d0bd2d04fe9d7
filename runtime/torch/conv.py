"""Convolution helpers for generated modules (toeplitz strategy). Pure torch.

All of them compute the last T outputs of the causal convolution of x
[B, N, H, V] (N >= T; the first N - T steps are history) with a kernel h
[L, H], broadcast over V:

    y[i] = sum_{0 <= j < L} h[j] x[N - T + i - j]     (x = 0 before its start)

Only shapes drive the control flow, so torch.compile can trace them.
"""

import torch
import torch.nn.functional as F


def conv_taps(x, h, T):
    """Direct form, one multiply-add per tap: O(N L) work, no big temporaries.
    For short kernels (a shift SSM, a short conv)."""
    N, L = x.shape[1], h.shape[0]
    hv = h[:, :, None]                                     # [L, H, 1]
    y = x[:, N - T:] * hv[0]
    for j in range(1, min(L, N)):
        start = max(N - T, j)                              # first output with x[p - j] defined
        y[:, start - (N - T):].addcmul_(x[:, start - j:N - j], hv[j])  # no temporary
    return y


def conv_windows(x, h, T):
    """Direct form, one dot product per output over its window of L inputs:
    O(T L). For a few steps (decode) against a long kernel."""
    N, L = x.shape[1], h.shape[0]
    hr = h.flip(0)[:, :, None]                             # hr[L - 1 - j] = h[j]
    out = []
    for i in range(T):
        p = N - T + i
        w = min(L, p + 1)                                  # taps that reach inside x
        # multiply and sum: einsum would run H tiny batched matmuls here
        out.append((x[:, p + 1 - w:p + 1] * hr[L - w:]).sum(1))
    return torch.stack(out, 1)


def fft_size(n):
    """Smallest m 2^a >= n with m in (1, 3, 5, 9, 15): at most 1.25 n (the next
    power of two can be 2 n), and a large power-of-two factor, which FFT
    libraries handle fastest (3^7 or 5^6 points run 3-4x slower per point)."""
    return min(m << max(-(-n // m) - 1, 0).bit_length() for m in (1, 3, 5, 9, 15))


# On the CPU, spectra of about this many complex elements per block of channels:
# whole-sequence spectra (134 MB for 512 channels at T=16k) go past glibc's mmap
# threshold and are page-faulted in afresh on every call, and leave the caches;
# blocks of channels took gated_conv at T=16k from ~340 to ~255-300 ms on 2 cores.
FFT_BLOCK = 1 << 20


def conv_fft(x, h, T):
    """FFT convolution: O((T + L) log(T + L)). Circular convolution of size
    n >= T + L - 1 wraps only into the outputs before N - T, which are dropped.
    Transforms run over the last (contiguous) axis; the dtype is kept (float64
    stays float64). On the CPU channels go in blocks (FFT_BLOCK)."""
    N, L, H = x.shape[1], h.shape[0], x.shape[2]
    n = fft_size(max(N, T + L - 1))
    per_channel = x.shape[0] * x.shape[3:].numel() * (n // 2 + 1)  # complex elements
    step = H if x.device.type != "cpu" else max(1, FFT_BLOCK // per_channel)
    step = -(-H // -(-H // step))    # as many blocks as that needs, filled evenly
    xt, ht = x.movedim(1, -1), h.t()                     # [B, H, V, N], [H, L]
    ys = []
    for c in range(0, H, step):
        # contiguous time axis first: faster transforms than strided ones
        xf = torch.fft.rfft(xt[:, c:c + step].contiguous(), n=n)  # [B, h, V, n/2 + 1]
        hf = torch.fft.rfft(ht[c:c + step].contiguous(), n=n)     # [h, n/2 + 1]
        ys.append(torch.fft.irfft(xf * hf[:, None], n=n)[..., N - T:N].movedim(-1, 1))
    return ys[0] if len(ys) == 1 else torch.cat(ys, 2)     # [B, T, H, V]


def causal_conv(x, h, T, direct_max):
    """Pick the algorithm by shape: direct for a short kernel (L <= direct_max)
    or a few outputs (T <= direct_max, e.g. a decode step: O(L), not an FFT of
    the history), FFT otherwise."""
    if h.shape[0] <= direct_max:
        return conv_taps(x, h, T)
    if T <= direct_max:
        return conv_windows(x, h, T)
    return conv_fft(x, h, T)


def conv_history(history, u, n):
    """The last n steps of history ++ u (history: [B, n, ...] or None = zeros):
    the decode state of a causal conv with n + 1 taps. A copy, never a view
    that would keep all of u alive."""
    T = u.shape[1]
    if T >= n:
        return u[:, T - n:].clone()
    if history is None:
        return F.pad(u, (0, 0) * (u.dim() - 2) + (n - T, 0))
    return torch.cat([history[:, T:].to(u.dtype), u], 1)
