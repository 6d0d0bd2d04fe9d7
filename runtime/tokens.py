"""Token-level helpers used by generated modules. Pure torch."""

import torch
import torch.nn.functional as F


def shift_tokens(x, k, buf):
    """x [B, T, ...] delayed by k steps (zeros before the start), and the last k
    values, which the next call needs (decode state). buf: those values from the
    previous call, or None at the start. k < 0 reads ahead (no state)."""
    if k == 0:
        return x, None
    if k < 0:
        pad = (0, 0) * (x.dim() - 2) + (0, -k)
        return F.pad(x[:, -k:], pad), None
    if buf is None:
        buf = x.new_zeros(x.shape[0], k, *x.shape[2:])
    full = torch.cat([buf.to(x.dtype), x], 1)
    return full[:, :x.shape[1]], full[:, -k:]


def poly_features(x, coeffs):
    """Feature map of a polynomial kernel: phi(x) = [c_0, c_1 x, c_2 x(x)x, ...]
    over the last dim, so phi_c(u) . phi_1(w) = sum_d c_d (u . w)^d.
    x: [B, T, H, K]; coeffs: numbers c_0..c_degree (all ones on the key side)."""
    B, T, H, K = x.shape
    feats, power = [], x.new_ones(B, T, H, 1)
    for d, c in enumerate(coeffs):
        feats.append(power * c)
        if d + 1 < len(coeffs):
            power = (power[..., :, None] * x[..., None, :]).reshape(B, T, H, -1)
    return torch.cat(feats, -1)
