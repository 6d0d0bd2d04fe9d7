"""Host-side helpers of the polynomial kernels' quadratic form (Based:
y_t = sum_{s <= t} f(q_t . k_s) v_s with f of degree <= 2, rendered from
codegen/triton/templates/triton_poly.py.jinja): how the custom ops'
autograd calls the backward op, the value columns with the normalizer's
column of ones put back (for the torch code that computes the decode
state), and the feature-map state around a quadratic-form call (initial
state in, final state out)."""

import functools

import torch

from mixerc.runtime.torch.autograd import quotient_grad
from mixerc.runtime.torch.tokens import poly_features

# a call of at most this many tokens without gradients is a decode step: the
# torch backend's feature-state recurrence (codegen/torch/templates/poly_quadratic)
POLY_DECODE_TOKENS = 16

def poly_op_grads(bwd, inputs, outputs, dy):
    """[dq, dk, dv] of forward(q, k, v, coef, voff, noff, width, divide,
    *config) -> y by backward(dy, q, k, v, coef, *the same numbers): the
    custom ops' autograd (registered by runtime/triton/ops.py
    custom_op_pair). The coefficients are numbers of the program (no
    gradient). A dividing forward (y = [n / m, m], kept as `outputs`): dy
    is turned into the gradient of [n, m], what the backward kernels take."""
    if inputs[7]:
        dy = quotient_grad(dy, outputs[0])
    return bwd(dy.contiguous(), *inputs)


def poly_coefficients(coeffs, device):
    """c0, c1, c2 (zeros past the degree) as a float32 tensor on `device`,
    made once per coefficients and device (read-only for the kernels): a
    repeated call copies nothing to the device."""
    padded = tuple(float(c) for c in list(coeffs) + [0.0, 0.0])[:3]
    if torch.compiler.is_compiling():  # a constant of the traced graph (no cache to consult)
        return torch.tensor(padded, dtype=torch.float32, device=device)
    return _coefficients(padded, torch.device(device))


@functools.lru_cache(maxsize=64)
def _coefficients(padded, device):
    return torch.tensor(padded, dtype=torch.float32, device=device)


def with_ones(v, norm):
    """v [B, T, H, V] with the normalizer's column of ones where the matrix
    is applied to 1 (norm "first" or "last"; None: v as it is)."""
    if norm is None:
        return v
    ones = v.new_ones(v.shape[:-1] + (1,))
    return torch.cat([ones, v] if norm == "first" else [v, ones], -1)


# the feature maps around a quadratic-form call are computed this many elements
# at a time (B x tokens x H x features), so a long prefill never holds them whole
STATE_PIECE = 1 << 24


def poly_state_around(y, q, k, values, coeffs, state, want_state=True):
    """The feature-map state's part of a quadratic-form call (float32): y plus
    phi_c(q_t) . state for an initial state, and the state after the last
    token, state + sum_t phi_1(k_t) values_t^T [B, H, F, V] (the layout the
    torch backend's decode steps and chunked feature map use), by torch ops
    over pieces of the tokens; None without want_state (the keys' feature
    maps then neither computed nor kept for autograd)."""
    if state is None and not want_state:
        return y, None
    B, T, H, K = k.shape
    ones = [1.0] * len(coeffs)
    features = sum(K ** d for d in range(len(coeffs)))
    step = max(1, STATE_PIECE // max(1, B * H * features))
    new_state, reads = None, []
    for t0 in range(0, T, step):
        if want_state:
            kf = poly_features(k[:, t0:t0 + step].float(), ones)
            part = torch.einsum("bthf,bthv->bhfv", kf, values[:, t0:t0 + step].float())
            new_state = part if new_state is None else new_state + part
        if state is not None:
            qf = poly_features(q[:, t0:t0 + step].float(), coeffs)
            reads.append(torch.einsum("bthf,bhfv->bthv", qf, state.float()))
    if state is not None:
        y = y + (reads[0] if len(reads) == 1 else torch.cat(reads, 1))
    if want_state and state is not None:
        new_state = new_state + state.float()
    return y, new_state
