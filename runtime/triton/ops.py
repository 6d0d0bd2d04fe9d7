"""Registering generated kernels as torch custom ops: opaque to
torch.compile (no graph break, shapes from the fake implementations) and
differentiable through torch.library's autograd registration."""

import torch

_OPS = {}  # op name -> (forward op, backward op): a module loaded twice reuses them
_LAUNCH_OPS = {}  # op name -> op


def launch_op(name, launch, launch_fake):
    """The custom op `name` ("mixerc::<family>_<digest>": a digest of what
    the kernel is rendered from) around a forward-only kernel launch, with
    its fake (shapes only) implementation; no autograd."""
    if name in _LAUNCH_OPS:
        return _LAUNCH_OPS[name]
    op = torch.library.custom_op(name, launch, mutates_args=())
    op.register_fake(launch_fake)
    _LAUNCH_OPS[name] = op
    return op


def attention_ops(name, forward, forward_fake, backward, backward_fake):
    """Custom ops `name`_fwd / `name`_bwd for a softmax's kernels.

    forward(q, k, v, rows, cols, heads, *ints and floats) -> (o, lse);
    backward(do, q, k, v, o, lse, rows, cols, heads, *the same) -> the six
    input gradients. `name` ("mixerc::flash_<digest>") names the rendered
    code, so an op registered by an identical earlier module is the same code."""
    if name in _OPS:
        return _OPS[name][0]
    fwd = torch.library.custom_op(name + "_fwd", forward, mutates_args=())
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(name + "_bwd", backward, mutates_args=())
    bwd.register_fake(backward_fake)

    def save(ctx, inputs, output):
        q, k, v, rows, cols, heads, *args = inputs
        ctx.save_for_backward(q, k, v, rows, cols, heads, *output)
        ctx.args = args

    def grads(ctx, do, dlse):
        q, k, v, rows, cols, heads, o, lse = ctx.saved_tensors
        out = bwd(do, q, k, v, o, lse, rows, cols, heads, *ctx.args)
        return tuple(out) + (None,) * len(ctx.args)

    fwd.register_autograd(grads, setup_context=save)
    _OPS[name] = (fwd, bwd)
    return fwd
