"""Registering generated kernels as torch custom ops: opaque to
torch.compile (no graph break, shapes from the fake implementations) and
differentiable through torch.library's autograd registration. Every Triton
family registers its launches here; what differs per family is only how its
backward op is called (attention_op_grads, poly_op_grads and
per_channel_op_grads beside each family's helpers). The chunked kernels'
single op and the scan's pair have no autograd of their own: their callers
differentiate through more launches (ChunkedFn, ScanFn). Their variants for
kernels that compute maps on load (MappedChunkedFn, MappedScanFn) recompute
the maps in the backward and chain through them: recompute_maps and
grads_through_maps."""

import torch

_OPS = {}  # op name -> op: a module loaded twice reuses them


def recompute_maps(maps, raw, needs):
    """(inputs, outputs): maps(*inputs) by torch ops with autograd on, inputs
    being detached copies of `raw` (None stays None) that require a gradient
    where `needs` says: the backward of a forward whose kernels computed the
    maps on load, so the forward stored nothing mapped."""
    with torch.enable_grad():
        inputs = [None if x is None else x.detach().requires_grad_(n)
                  for x, n in zip(raw, needs)]
        return inputs, maps(*inputs)


def grads_through_maps(inputs, outputs, grads):
    """The gradients of recompute_maps' `inputs` (None where unused) given
    `grads` of its `outputs` (an output without a gradient or not depending
    on an input that requires one counts for nothing)."""
    outs = [(o, g) for o, g in zip(outputs, grads)
            if o is not None and o.requires_grad and g is not None]
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    found = torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs],
                                allow_unused=True) if outs and wanted else []
    by_input = dict(zip(map(id, wanted), found))
    return [None if x is None else by_input.get(id(x)) for x in inputs]


def custom_op(name, fn, fake):
    """The torch custom op `name` running fn, fake (the same arguments) its
    shapes-only implementation. `name` ("mixerc::<family>_<digest>") names
    the rendered code, so an op registered by an identical earlier module is
    the same code."""
    if name not in _OPS:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        _OPS[name] = op
    return _OPS[name]


def custom_op_pair(name, forward, forward_fake, backward, backward_fake, grads=None,
                   keep_outputs=False):
    """(forward op, backward op): custom ops `name`_fwd and `name`_bwd. With
    grads, the forward op is differentiable: its inputs are tensors (None for
    an absent one) then numbers (the config); it saves the tensors (and its
    outputs, with keep_outputs), and grads(backward op, inputs, outputs,
    *output gradients) gives the gradients of the leading inputs (the rest
    get None)."""
    new = name + "_fwd" not in _OPS
    fwd = custom_op(name + "_fwd", forward, forward_fake)
    bwd = custom_op(name + "_bwd", backward, backward_fake)

    def save(ctx, inputs, output):
        ctx.tensors = sum(1 for x in inputs if x is None or torch.is_tensor(x))
        outputs = (output,) if torch.is_tensor(output) else tuple(output)
        ctx.save_for_backward(*inputs[:ctx.tensors], *(outputs if keep_outputs else ()))
        ctx.numbers = inputs[ctx.tensors:]

    def input_grads(ctx, *output_grads):
        saved = ctx.saved_tensors
        inputs = (*saved[:ctx.tensors], *ctx.numbers)
        out = tuple(grads(bwd, inputs, saved[ctx.tensors:], *output_grads))
        return out + (None,) * (len(inputs) - len(out))

    if new and grads is not None:
        fwd.register_autograd(input_grads, setup_context=save)
    return fwd, bwd
