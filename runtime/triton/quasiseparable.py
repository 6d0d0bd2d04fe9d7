"""A quasiseparable matrix's two scalar-decay low-rank passes (Hydra: a
lower one, its reversed twin over the same operand) and its diagonal:
which path computes them. The fused kernels, one states launch for both
directions and one output launch that adds both passes and d_t v_t and
writes y once, are rendered into the generated module
(codegen/triton/templates/triton_quasiseparable.py.jinja) and passed in as
`launch`.

`quasiseparable_apply` is what a generated module calls: the two launches
when no gradient is needed; with one, today's separate passes (each the
chunked kernels' adjoint backward, runtime/triton/chunked.py, on flipped
copies for the upper pass) recompute the forward under autograd, so the
gradient is theirs; float64 and empty inputs take the separate passes."""

import torch

from mixerc.runtime.torch.tokens import shift_tokens
from mixerc.runtime.triton.chunked import chunked_kernels_apply


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


class _QuasiseparableFn(torch.autograd.Function):
    """The two launches forward; the backward recomputes the separate passes
    under autograd and takes their gradient (no adjoint of the fused
    launches yet)."""

    @staticmethod
    def forward(ctx, launch, runs, modes, chunk, config, q, k, v, a, w, diag):
        ctx.save_for_backward(q, k, v, a, w, diag)
        ctx.args = runs, modes, chunk, config
        return launch(q, k, v, a, w, diag, modes, chunk, *config)

    @staticmethod
    def backward(ctx, dy):
        runs, modes, chunk, config = ctx.args
        saved = [None if x is None else x.detach().requires_grad_(x.requires_grad)
                 for x in ctx.saved_tensors]
        with torch.enable_grad():
            y = _separate(runs, *saved, modes, chunk, config)
            wanted = [x for x in saved if x is not None and x.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype), allow_unused=True))
        return (None,) * 5 + tuple(None if x is None or not x.requires_grad else next(grads)
                                   for x in saved)


def quasiseparable_apply(launch, runs, q, k, v, a, w, diag, modes, chunk, *config):
    """y [B, T, H, V] of a quasiseparable matrix's lower pass, its reversed
    twin and its diagonal. launch: the generated module's host function of
    the fused kernels, launch(q, k, v, a, w, diag, modes, chunk, *config) ->
    y (the template documents the arguments); runs: each pass's chunked
    kernel function, for the separate passes. No decode state: a matrix that
    reads the future has none."""
    _, B, T = q.shape[:3]
    if any(x.dtype == torch.float64 for x in (q, k, v)) or B == 0 or T == 0:
        return _separate(runs, q, k, v, a, w, diag, modes, chunk, config)
    tensors = [x for x in (q, k, v, a, w, diag) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _QuasiseparableFn.apply(launch, runs, modes, chunk, config, q, k, v, a, w, diag)
    return launch(q, k, v, a, w, diag, modes, chunk, *config)
