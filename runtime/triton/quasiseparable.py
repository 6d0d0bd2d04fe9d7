"""A quasiseparable matrix's two scalar-decay low-rank passes (Hydra: a
lower one, its reversed twin over the same operand) and its diagonal:
which path computes them. The fused kernels, one states launch for both
directions and one output launch that adds both passes and d_t v_t and
writes y once, are rendered into the generated module
(codegen/triton/templates/triton_quasiseparable.py.jinja) and passed in as
`launch`.

`quasiseparable_apply` is what a generated module calls: the two launches
forward; with a gradient, the backward is each pass's adjoint backward
(the chunked kernels', runtime/torch/autograd.py ChunkedFn, on flipped
copies for the upper pass), without recomputing the forward; float64 and
empty inputs take the separate passes under autograd."""

from types import SimpleNamespace

import torch

from mixerc.runtime.torch.autograd import ChunkedFn
from mixerc.runtime.torch.tokens import shift_tokens
from mixerc.runtime.triton.chunked import chunked_kernels_apply, kernel_runs


def _separate(runs, q, k, v, a, w, diag, modes, chunk, config):
    """The passes one by one (the chunked kernels, torch flips and sums): the
    path with a gradient, and float64's."""
    y = None
    for d in range(2):
        rev = (lambda x: x.flip(1)) if d else (lambda x: x)  # noqa: E731
        scale = {} if w is None else {"key_scale": rev(w[d])}
        yd, _ = chunked_kernels_apply(runs[d], rev(q[d]), rev(k[d]), rev(v), rev(a[d]), None,
                                      chunk, *config, **scale)
        if modes[d] == 2:
            yd, _ = shift_tokens(yd, 1, None)
        yd = rev(yd)
        y = yd if y is None else y + yd
    return y if diag is None else y + diag[..., None] * v


def quasiseparable_apply(launch, runs, q, k, v, a, w, diag, modes, chunk, *config,
                         out_dtype=None):
    """y [B, T, H, V] of a quasiseparable matrix's lower pass, its reversed
    twin and its diagonal. launch: the generated module's host function of
    the fused kernels, launch(q, k, v, a, w, diag, modes, chunk, *config) ->
    y (the template documents the arguments); runs: each pass's chunked
    kernel function, for the separate passes. No decode state: a matrix that
    reads the future has none. out_dtype: None, or the dtype the output
    kernel stores y in (the inputs', when y is the mixer's output as is)."""
    _, B, T = q.shape[:3]
    if any(x.dtype == torch.float64 for x in (q, k, v)) or B == 0 or T == 0:
        return _separate(runs, q, k, v, a, w, diag, modes, chunk, config)
    tensors = [x for x in (q, k, v, a, w, diag) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _QuasiseparableFn.apply(launch, runs, modes, chunk, config, out_dtype, q, k, v,
                                       a, w, diag)
    return launch(q, k, v, a, w, diag, modes, chunk, *config, out_dtype=out_dtype)


class _QuasiseparableFn(torch.autograd.Function):
    """The two launches forward; the backward is each pass's adjoint backward
    (ChunkedFn's, on the chunked kernels), from dy and the inputs: nothing of
    the forward is recomputed (the adjoint runs need no y)."""

    @staticmethod
    def forward(ctx, launch, runs, modes, chunk, config, out_dtype, q, k, v, a, w, diag):
        ctx.save_for_backward(q, k, v, a, w, diag)
        ctx.args = runs, modes, chunk, config
        return launch(q, k, v, a, w, diag, modes, chunk, *config, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, dy):
        runs, modes, chunk, config = ctx.args
        return (None,) * 6 + _adjoint(runs, modes, chunk, config, *ctx.saved_tensors, dy,
                                      ctx.needs_input_grad[6:])


def _adjoint(runs, modes, chunk, config, q, k, v, a, w, diag, dy, need):
    """The gradients of q, k, v, a, w and diag (None where not needed): the
    passes' as ChunkedFn.backward takes them on the operands _separate runs
    (the upper pass on flipped copies), dy through the upper pass's flip and
    a shift's adjoint (it reads one step ahead), summed over the passes for v."""
    need_q, need_k, need_v, need_a, need_w, need_d = need
    B, T, H = v.shape[:3]
    grads = {"q": [], "k": [], "a": [], "w": []}
    dv = None
    for d in range(2):
        rev = (lambda x: x.flip(1)) if d else (lambda x: x)  # noqa: E731
        g = rev(dy)
        if modes[d] == 2:  # y = shift(pass): the pass's dy is g one step ahead
            g, _ = shift_tokens(g, -1, None)
        inner = SimpleNamespace(
            # ChunkedFn's context of the pass (its final state only gives H: none here)
            saved_tensors=(rev(q[d]), rev(k[d]), rev(v), rev(a[d]), None,
                           v.new_empty(B, H, 0, 0), None if w is None else rev(w[d]), None,
                           None),
            fwd=kernel_runs(runs[d], config), chunk=chunk, ones=False,
            needs_input_grad=(False, False, need_q, need_k, need_v, need_a, False,
                              need_w and w is not None, False, False, False, False))
        _, _, gq, gk, gv, ga, _, gw, *_ = ChunkedFn.backward(inner, g, None)
        for name, x in (("q", gq), ("k", gk), ("a", ga), ("w", gw)):
            grads[name].append(None if x is None else rev(x))
        if gv is not None:
            dv = rev(gv) if dv is None else dv + rev(gv)
    if diag is not None and need_v:  # y += diag_t v_t
        dv = dv + diag[..., None] * dy
    ddiag = (dy * v).sum(-1).to(diag.dtype) if diag is not None and need_d else None
    stacked = {n: None if any(x is None for x in gs) else torch.stack(
        [x.to(like.dtype) for x in gs]) for (n, gs), like in zip(grads.items(), (q, k, a, w))}
    return (stacked["q"], stacked["k"], dv, stacked["a"], stacked["w"], ddiag)
