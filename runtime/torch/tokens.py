"""Token-level helpers used by generated modules. Pure torch."""

import torch
import torch.nn.functional as F

from mixerc.runtime.bind import MixerValueError  # inline: drop


def shift_tokens(x, k, buf):
    """x [B, T, ...] delayed by k steps (zeros before the start), and the last k
    values, which the next call needs (decode state). buf: those values from the
    previous call, or None at the start. k < 0 reads ahead (no state)."""
    if k == 0:
        return x, None
    if k < 0:  # reads ahead: the last |k| rows have nothing to read (all of them if T <= |k|)
        pad = (0, 0) * (x.dim() - 2) + (0, min(-k, x.shape[1]))
        return F.pad(x[:, -k:], pad), None
    if buf is None:
        buf = x.new_zeros(x.shape[0], k, *x.shape[2:])
    full = torch.cat([buf.to(x.dtype), x], 1)
    return full[:, :x.shape[1]], full[:, -k:]


# Features per token a polynomial kernel's feature map may have (sum_d K^d):
# (1 + z)^8 at K = 8 would need 19 million. Above it, a kernel without decay
# runs in its quadratic form with the keys and values as state
# (poly_history.py.jinja); one with a decay has no such form: a clear error.
MAX_POLY_FEATURES = 1 << 16


def poly_feature_count(k: int, degree: int) -> int:
    return sum(k ** d for d in range(degree + 1))


def poly_features(x, coeffs, what="a polynomial kernel"):
    """Feature map of a polynomial kernel: phi(x) = [c_0, c_1 x, c_2 x(x)x, ...]
    over the last dim, so phi_c(u) . phi_1(w) = sum_d c_d (u . w)^d.
    x: [B, T, H, K]; coeffs: numbers c_0..c_degree (all ones on the key side).
    `what` names the mixer term in the error for a too large feature map."""
    B, T, H, K = x.shape
    size = poly_feature_count(K, len(coeffs) - 1)
    if size > MAX_POLY_FEATURES:
        raise MixerValueError(
            f"{what}: a polynomial kernel of degree {len(coeffs) - 1} with K = {K} needs "
            f"{size} features per token (limit {MAX_POLY_FEATURES}); use a lower degree or "
            f"a smaller K, or drop the decay so that its quadratic form can run")
    feats, power = [], x.new_ones(B, T, H, 1)
    for d, c in enumerate(coeffs):
        feats.append(power * c)
        if d + 1 < len(coeffs):
            power = (power[..., :, None] * x[..., None, :]).reshape(B, T, H, -1)
    return torch.cat(feats, -1)
