"""Chunked scalar-decay kernels' helpers: the torch step that decodes one
token, and the apply that differentiates the kernels' custom op (no
autograd of its own, runtime/triton/ops.py custom_op) through
runtime/torch/autograd.py's adjoint backward.

The rendered kernels (codegen/triton/templates/triton_chunked.py.jinja) are
a forward with an initial state in and the final state and the state
entering each chunk out. The backward runs that same forward on the
three adjoint problems (dq causal; dk and dv on reversed time) and sums the
decay gradient in reverse: `ChunkedFn`, shared with the torch backend, which
also takes q, k and v at a divisor of the H heads (B and C shared by a group
of heads in SSD) and sums their per-head gradients over each group. It also
takes what the kernels compute on load (a key scale, a normalizer's ones
column and its division, a skip term): see ChunkedFn; the paths without the
kernels (float64, a single torch step while traced or with gradients) apply
them in torch here; a decode step's kernel computes them too."""

from types import SimpleNamespace

import torch

from mixerc.runtime.torch.autograd import ChunkedFn, chunk_heads
from mixerc.runtime.triton.ops import grads_through_maps, recompute_maps

def chunk_dots_dtype(*xs):
    """The dots' operand dtype: the narrowest of the operands' (a float32
    gradient meets bf16 inputs in the backward: it is read in bf16); float64
    only when every operand is."""
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if any(x.dtype == dt for x in xs):
            return dt
    return torch.float64


def chunk_step(q, k, v, a, state, H, strict, chunk, chunk_states=False):
    """The chunked mixer on T <= 1 tokens by torch ops (decode), float32."""
    B, T, _, K = q.shape
    V = v.shape[-1]
    if state is None:
        state = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    if T == 0:
        y = torch.zeros(B, 0, H, V, dtype=torch.float32, device=q.device)
        entering = state.new_zeros(B, H, 0, K, V)
        return (y, state, entering) if chunk_states else (y, state)
    q1, k1, v1 = (chunk_heads(x, H)[:, 0].float() for x in (q, k, v))
    entering = state
    if a is not None:
        state = torch.exp(a[:, 0].float())[..., None, None] * state
    if strict:
        y = torch.einsum("bhk,bhkv->bhv", q1, state)
    state = state + k1[..., :, None] * v1[..., None, :]
    if not strict:
        y = torch.einsum("bhk,bhkv->bhv", q1, state)
    if chunk_states:
        return y[:, None], state, entering[:, :, None]
    return y[:, None], state


def chunked_kernels_apply(run, q, k, v, a, state, chunk, *config, key_scale=None,
                          ones_column=False, skip=None, divide=False, leaves=None,
                          out_dtype=None):
    """run(q, k, v, a, state, chunk, *config, chunk_states=..., key_scale=...)
    -> (y, final state[, entering states]), with the adjoint backward when
    anything needs a gradient. key_scale: None, or w [B, T, H] scaling the
    keys k [B, T, G, K] per token and head (scaled on load, never stored).
    ones_column: the values are [v, 1] (a normalizer), the ones added by the
    kernels (y and the states have V + 1 columns). skip: None, or d [H]: y
    gets d_h v_t added (a skip term, added in the output kernel's epilogue).
    leaves: None, or the inputs of the maps the kernels compute on load
    (run.prologue, codegen/triton/prologue.py); q and k are then the maps'
    inputs, and a or key_scale None where a map computes them. out_dtype:
    None, or the dtype the output kernel stores y in (the inputs', when y is
    the mixer's output as is; it accumulates in float32 either way): the
    backward's runs keep float32, and so does a forward whose y the backward
    reads (the quotient, with divide)."""
    scaled = {} if key_scale is None else {"key_scale": key_scale}
    if ones_column:
        scaled["ones_column"] = True
    if divide:  # y[..., :V] / y[..., V], the normalizer kept in y[..., V]
        scaled["divide"] = True
    if skip is not None:
        scaled["skip"] = skip

    def fwd(q, k, v, a, state, chunk, chunk_states=False, **extra):
        return run(q, k, v, a, state, chunk, *config, chunk_states=chunk_states, **extra)
    tensors = [x for x in (q, k, v, a, state, key_scale, skip) + tuple(leaves or ())
               if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        if divide:  # the backward reads the saved quotient: float32
            out_dtype = None
        if leaves is not None:
            if not torch.compiler.is_compiling():
                return MappedChunkedFn.apply(fwd, run.prologue, chunk, ones_column, divide,
                                             out_dtype, q, k, v, a, state, key_scale, skip,
                                             *leaves)
            # traced: the maps as torch ops before the kernels (inductor fuses them)
            q, k, a, key_scale = run.prologue(q, k, a, key_scale, leaves, _heads(v, leaves))
        return ChunkedFn.apply(fwd, chunk, q, k, v, a, state, key_scale, ones_column, skip,
                               divide, out_dtype)
    if leaves is not None:
        scaled["leaves"] = leaves
    if out_dtype is not None:
        scaled["out_dtype"] = out_dtype
    # no gradient: a short block may take the in-place decode kernel (not while
    # torch.compile traces, which sees through the custom op only)
    return run(q, k, v, a, state, chunk, *config,
               decode=not torch.compiler.is_compiling(), **scaled)


def _heads(v, leaves):
    """The matrix's heads H: the values' or the maps' leaves' (v may sit at groups)."""
    return max([v.shape[2]] + [x.shape[-1] for x in leaves])


class MappedChunkedFn(torch.autograd.Function):
    """ChunkedFn for kernels that compute maps on load (feature maps of q and
    k, the log-decay and the key scale from their leaves): the forward runs
    them on the maps' inputs and stores nothing mapped; the backward
    recomputes the maps by torch ops (`prologue`), runs ChunkedFn's adjoint
    backward on the mapped tensors and takes the maps' gradients by autograd."""

    @staticmethod
    def forward(ctx, fwd, prologue, chunk, ones, divide, out_dtype, q, k, v, a, state, w, d,
                *leaves):
        extra = dict(leaves=list(leaves), **({} if w is None else {"key_scale": w}),
                     **({"ones_column": True} if ones else {}),
                     **({} if out_dtype is None else {"out_dtype": out_dtype}),
                     **({} if d is None else {"skip": d}), **({"divide": True} if divide else {}))
        y, final = fwd(q, k, v, a, state, chunk, **extra)
        ctx.fwd, ctx.prologue, ctx.chunk, ctx.ones = fwd, prologue, chunk, ones
        ctx.save_for_backward(q, k, v, a, state, w, d, final, y if divide else None, *leaves)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dS):
        q, k, v, a, S0, w, d, final, quotient, *leaves = ctx.saved_tensors
        needs = ctx.needs_input_grad
        inputs, mapped = recompute_maps(
            lambda q, k, a, w, *ls: ctx.prologue(q, k, a, w, list(ls), final.shape[1]),
            [q, k, a, w, *leaves], [needs[6], needs[7], needs[9], needs[11], *needs[13:]])
        need = [m is not None and m.requires_grad for m in mapped]
        plain = [None if m is None else m.detach() for m in mapped]
        inner = SimpleNamespace(  # ChunkedFn's context, on the mapped tensors
            saved_tensors=(plain[0], plain[1], v, plain[2], S0, final, plain[3], d, quotient),
            fwd=ctx.fwd, chunk=ctx.chunk, ones=ctx.ones,
            needs_input_grad=(False, False, need[0], need[1], needs[8], need[2], needs[10],
                              need[3], False, needs[12], False, False))
        g = ChunkedFn.backward(inner, dy, dS)
        gq, gk, ga, gw, *gleaves = grads_through_maps(inputs, mapped, (g[2], g[3], g[5], g[7]))
        return (None,) * 6 + (gq, gk, g[4], ga, g[6], gw, g[9]) + tuple(gleaves)


def divided(out, divide):
    """(y[..., :V] / y[..., V] beside y[..., V], *rest) for the paths that do
    not run the output kernel, when it would divide."""
    if not divide:
        return out
    y = out[0]
    return (torch.cat([y[..., :-1] / y[..., -1:], y[..., -1:]], -1),) + tuple(out[1:])


def with_skip(out, v, skip, H):
    """(y + d_h v_t, *rest) for the paths that do not run the output kernel."""
    if skip is None:
        return out
    y = out[0]
    return (y + skip.to(y.dtype)[:, None] * chunk_heads(v, H).to(y.dtype),) + tuple(out[1:])


def scaled_keys(k, key_scale, H):
    """w_s k_s at the H heads (a torch step's token, or float64 inputs on
    the torch backend's chunks, read the keys per head)."""
    return key_scale[..., None] * chunk_heads(k, H).to(key_scale.dtype)
