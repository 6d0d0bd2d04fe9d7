"""Independent float64 references for the standard library, written from the
formulas in each examples/*.mx comment (not from the mixer language).

Where a recurrence exists it is used instead of a matrix, so the check is
independent of the dense interpreter's approach. Shapes follow the public
layout: tokens [B, T, *dims], params [*dims], kernels [L, *dims].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

f64 = torch.float64


def _causal(T, window=None):
    t = torch.arange(T)
    m = t[:, None] >= t[None, :]
    if window is not None:
        m &= (t[:, None] - t[None, :]) < window
    return m


def _softmax_attention(q, k, v, mask):
    H, G = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // G, dim=2)
    v = v.repeat_interleave(H // G, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), v)


def attention(q, k, v):
    return _softmax_attention(q, k, v, _causal(q.shape[1]))


def sliding_window(q, k, v):
    return _softmax_attention(q, k, v, _causal(q.shape[1], 64))


def _normalized(A, v):
    return torch.einsum("bhts,bshv->bthv", A, v) / A.sum(-1).transpose(1, 2)[..., None]


def linear_attention(q, k, v):
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    A = torch.einsum("bthk,bshk->bhts", phi(q), phi(k)) * _causal(q.shape[1])
    return _normalized(A, v)


def based(q, k, v):
    z = torch.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    A = (1 + z + z * z / 2) * _causal(q.shape[1])
    return _normalized(A, v)


def retnet(q, k, v, log_gamma):
    T = q.shape[1]
    t = torch.arange(T, dtype=f64)
    lag = (t[:, None] - t[None, :]).clamp(min=0)
    D = torch.exp(log_gamma[:, None, None] * lag) * _causal(T)
    A = torch.einsum("bthk,bshk->bhts", q, k) * D
    return torch.einsum("bhts,bshv->bthv", A, v)


def gla(q, k, v, g):
    """Recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, y_t = q_t S_t."""
    Bsz, T, H, K = q.shape
    S = torch.zeros(Bsz, H, K, v.shape[-1], dtype=f64)
    ys = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(ys, 1)


def ssd(x, dt, B, C, A_log, dt_bias, D):
    """Recurrence h_t = exp(delta_t A) h_{t-1} + delta_t x_t B_t^T, y_t = h_t C_t + D x_t."""
    Bsz, T, H, P = x.shape
    G = B.shape[2]
    delta = F.softplus(dt + dt_bias)
    A = -torch.exp(A_log)
    Bh, Ch = B.repeat_interleave(H // G, 2), C.repeat_interleave(H // G, 2)
    h = torch.zeros(Bsz, H, P, B.shape[-1], dtype=f64)
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, t] * A)[..., None, None] * h + \
            (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, 1)


def mamba(x, dt, B, C, A_log, dt_bias, D):
    """Selective scan: h_t[e,n] = exp(delta_t[e] A[e,n]) h + delta_t[e] x_t[e] B_t[n]."""
    Bsz, T, E = x.shape
    delta = F.softplus(dt + dt_bias)
    A = -torch.exp(A_log)
    h = torch.zeros(Bsz, E, A.shape[1], dtype=f64)
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + \
            (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(torch.einsum("ben,bn->be", h, C[:, t]) + D * x[:, t])
    return torch.stack(ys, 1)


def hydra(x, dt_f, B_f, C_f, dt_b, B_b, C_b, delta, A_log, dt_bias):
    """The entry formula, one (t, s) at a time."""
    Bsz, T, H, P = x.shape
    A = -torch.exp(A_log)
    df = F.softplus(dt_f + dt_bias)
    db = F.softplus(dt_b + dt_bias)
    M = torch.zeros(Bsz, H, T, T, dtype=f64)
    for t in range(T):
        for s in range(T):
            if s < t:
                seg = df[:, s + 1:t].sum(1)  # r in (s, t-1]
                M[:, :, t, s] = (C_f[:, t - 1] * B_f[:, s]).sum(-1)[:, None] * df[:, s] * \
                    torch.exp(A * seg)
            elif s > t:
                seg = db[:, t + 1:s].sum(1)  # r in [t+1, s)
                M[:, :, t, s] = (C_b[:, t + 1] * B_b[:, s]).sum(-1)[:, None] * db[:, s] * \
                    torch.exp(A * seg)
            else:
                M[:, :, t, t] = delta[:, t]
    return torch.einsum("bhts,bshp->bthp", M, x)


def _causal_conv(u, h):
    """y_t = sum_{l < L, l <= t} h_l u_{t-l}; u [B, T, E], h [L, E]."""
    T = u.shape[1]
    y = torch.zeros_like(u)
    for lag in range(min(h.shape[0], T)):
        y[:, lag:] += h[lag] * u[:, :T - lag]
    return y


def h3(q, k, v, w_shift, A_log, log_dt, Bs, Cs, D):
    T = q.shape[1]
    kshift = _causal_conv(k, w_shift.T)                 # taps j of w_shift[:, j]
    u = kshift * v
    lags = torch.arange(T, dtype=f64)
    rate = torch.exp(A_log) * torch.exp(log_dt)[:, None]          # [E, N]
    h = (Cs * Bs * torch.exp(-rate * lags[:, None, None])).sum(-1)  # [T, E]
    return q * (_causal_conv(u, h) + D * u)


def gated_conv(q, k, v, h):
    return q * _causal_conv(k * v, h)


REFERENCES = {
    "attention": attention, "sliding_window": sliding_window,
    "linear_attention": linear_attention, "based": based, "retnet": retnet, "gla": gla,
    "ssd": ssd, "mamba": mamba, "hydra": hydra, "h3": h3, "gated_conv": gated_conv,
}


def make_inputs(name: str, B: int = 2, T: int = 37, seed: int = 0, dtype=f64) -> dict:
    """Random arguments with the right domains (log-decays negative, ...)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=f64)  # noqa: E731
    H, G, D, K, V, P, N, E = 4, 2, 8, 6, 5, 3, 4, 6
    if name == "attention":
        args = dict(q=r(B, T, H, D), k=r(B, T, G, D), v=r(B, T, G, D))
    elif name == "sliding_window":
        # long enough that the window of 64 cuts
        args = dict(q=r(B, T, H, D), k=r(B, T, H, D), v=r(B, T, H, D))
    elif name in ("linear_attention", "based"):
        args = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V))
    elif name == "retnet":
        args = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
                    log_gamma=-torch.rand(H, generator=g, dtype=f64) * 0.5 - 0.01)
    elif name == "gla":
        args = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
                    g=F.logsigmoid(r(B, T, H, K) + 2))
    elif name == "ssd":
        args = dict(x=r(B, T, H, P), dt=r(B, T, H) - 1, B=r(B, T, G, N), C=r(B, T, G, N),
                    A_log=r(H) * 0.5, dt_bias=r(H) * 0.5, D=r(H))
    elif name == "mamba":
        args = dict(x=r(B, T, E), dt=r(B, T, E) - 1, B=r(B, T, N), C=r(B, T, N),
                    A_log=r(E, N) * 0.5, dt_bias=r(E) * 0.5, D=r(E))
    elif name == "hydra":
        args = dict(x=r(B, T, H, P), dt_f=r(B, T, H) - 1, B_f=r(B, T, N), C_f=r(B, T, N),
                    dt_b=r(B, T, H) - 1, B_b=r(B, T, N), C_b=r(B, T, N), delta=r(B, T, H),
                    A_log=r(H) * 0.5, dt_bias=r(H) * 0.5)
    elif name == "h3":
        args = dict(q=r(B, T, E), k=r(B, T, E), v=r(B, T, E), w_shift=r(E, 4),
                    A_log=r(E, N) * 0.5 - 1, log_dt=r(E) * 0.5 - 1, Bs=r(E, N), Cs=r(E, N),
                    D=r(E))
    elif name == "gated_conv":
        args = dict(q=r(B, T, E), k=r(B, T, E), v=r(B, T, E), h=r(9, E) * 0.5)
    else:
        raise KeyError(name)
    return {k: v.to(dtype) for k, v in args.items()}
