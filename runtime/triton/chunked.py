"""Chunked scalar-decay kernels' helpers: the custom op registration, the
torch step that decodes one token, and the adjoint backward of
runtime/torch/autograd.py for operands read at group heads.

The rendered kernels (codegen/triton/templates/triton_chunked.py.jinja) are
a forward with an initial state in and the final state and the state
entering each chunk out. The backward runs that same forward on the
three adjoint problems (dq causal; dk and dv on reversed time) and sums the
decay gradient in reverse, exactly as `ChunkedFn` does for the torch
backend; here q, k and v may each sit at a divisor of the H heads (B and C
shared by a group of heads in SSD), so the adjoint runs produce per-head
gradients that are summed over each group."""

import torch
import torch.nn.functional as F

from mixerc.runtime.torch.autograd import _decay_grad

_CHUNKED_OPS = {}  # op name -> op: a module loaded twice reuses it


def chunked_op(name, launch, launch_fake):
    """The custom op `name` ("mixerc::chunked_<digest>") around a kernel
    launch, with its fake (shapes only) implementation. No autograd of its
    own: `chunked_kernels_apply` differentiates through more launches."""
    if name in _CHUNKED_OPS:
        return _CHUNKED_OPS[name]
    op = torch.library.custom_op(name, launch, mutates_args=())
    op.register_fake(launch_fake)
    _CHUNKED_OPS[name] = op
    return op


def chunk_dots_dtype(*xs):
    """The dots' operand dtype: the narrowest of the operands' (a float32
    gradient meets bf16 inputs in the backward: it is read in bf16); float64
    only when every operand is."""
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if any(x.dtype == dt for x in xs):
            return dt
    return torch.float64


def chunk_heads(x, H):
    """[B, T, Hx, ...] at H heads (head h reads group h // (H / Hx))."""
    return x if x.shape[2] == H else x.repeat_interleave(H // x.shape[2], 2)


def chunk_fold_heads(g, like):
    """A per-head gradient [B, T, H, ...] summed over each group of `like`'s heads."""
    Hx = like.shape[2]
    if g.shape[2] != Hx:
        g = g.reshape(g.shape[0], g.shape[1], Hx, g.shape[2] // Hx, *g.shape[3:]).sum(3)
    return g.to(like.dtype)


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


def chunked_kernels_apply(run, q, k, v, a, state, chunk, *config):
    """run(q, k, v, a, state, chunk, *config, chunk_states=...) -> (y, final
    state[, entering states]), with the adjoint backward when anything needs
    a gradient."""
    def fwd(q, k, v, a, state, chunk, chunk_states=False):
        return run(q, k, v, a, state, chunk, *config, chunk_states=chunk_states)
    tensors = [x for x in (q, k, v, a, state) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return GroupedChunkedFn.apply(fwd, chunk, q, k, v, a, state)
    # no gradient: a short block may take the in-place decode kernel (not while
    # torch.compile traces, which sees through the custom op only)
    return run(q, k, v, a, state, chunk, *config,
               decode=not torch.compiler.is_compiling())


class GroupedChunkedFn(torch.autograd.Function):
    """runtime/torch/autograd.py `ChunkedFn` (see its docstring for the
    adjoint problems) with q, k, v at group heads: the adjoint runs read them
    where they are, and their per-head gradients are summed per group."""

    @staticmethod
    def forward(ctx, fwd, chunk, q, k, v, a, state):
        y, final = fwd(q, k, v, a, state, chunk)
        ctx.fwd, ctx.chunk = fwd, chunk
        ctx.save_for_backward(q, k, v, a, state, final)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dS):
        q, k, v, a, S0, final = ctx.saved_tensors
        fwd, C = ctx.fwd, ctx.chunk
        need_q, need_k, need_v, need_a, need_S0 = ctx.needs_input_grad[2:]
        B, T = q.shape[0], q.shape[1]
        H = final.shape[1]
        if dy is None:
            dy = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float32, device=q.device)
        n = -(-T // C)
        pad = n * C - T
        rev = lambda x: F.pad(x.flip(1), (0, 0) * (x.dim() - 2) + (pad, 0))  # noqa: E731
        unrev = lambda x: x[:, pad:].flip(1)  # noqa: E731
        b = None if a is None else F.pad(a.flip(1)[:, :-1], (0, 0, 1 + pad, 0))
        states = bool(need_a and n > 1)
        dq = dk = dv = da = dS0 = None
        dq_h = dk_h = None
        if need_q or need_a:
            out = fwd(dy, v, k, a, None if S0 is None else S0.transpose(-1, -2), C,
                      chunk_states=states)
            dq_h = out[0]
        if need_k or need_a:
            back = fwd(rev(v), rev(dy), rev(q), b,
                       None if dS is None else dS.transpose(-1, -2), C, chunk_states=states)
            dk_h = unrev(back[0])
        if need_v or need_S0:
            dv_h, last = fwd(rev(k), rev(q), rev(dy), b, dS, C)[:2]
            dv = chunk_fold_heads(unrev(dv_h), v) if need_v else None
            if need_S0:
                dS0 = last if a is None else torch.exp(a[:, 0].float())[..., None, None] * last
                dS0 = dS0.to(S0.dtype)
        if need_a:
            da = _decay_grad(chunk_heads(q, H).float(), chunk_heads(k, H).float(), a.float(), dq_h,
                             dk_h, dS, final, C, out[2] if states else None,
                             back[2] if states else None).to(a.dtype)
        if need_q:
            dq = chunk_fold_heads(dq_h, q)
        if need_k:
            dk = chunk_fold_heads(dk_h, k)
        return None, None, dq, dk, dv, da, dS0
