"""Host-side helpers of the per-channel decay kernels (GLA, Mamba-1, H3's
modal kernel: a log-decay per token and channel of the contracted dim,
inside the sum over it): which path a call takes, the chunk-local
cumulative log-decays the kernels read at any row (their exact pairwise
decays on the diagonal sub-blocks gather them), and how the custom ops'
autograd joins the rendered forward and backward
(codegen/triton/templates/triton_per_channel*.py.jinja)."""

import torch

# a call of at most this many tokens (no gradient) is a decode step: the
# recurrence kernel (runtime/triton/recurrent.py), state updated in place
DECODE_TOKENS = 16

# the intra kernel (scores inside a chunk) takes K in blocks of at most this
# many channels (static fitness table, K = 128, bf16): a whole-K tile spills
# under Triton 3.6 on sm_90a and sm_80, blocks of 64 on sm_80 under 3.9;
# 32 fits both targets under both
INTRA_BLOCK_K = 32


def per_channel_kernels(*tensors) -> bool:
    """True when the term runs the Triton kernels: no input is float64 (they
    compute in float32). float64 runs the torch backend's chunked code,
    which autograd differentiates."""
    return not any(torch.is_tensor(x) and x.dtype == torch.float64 for x in tensors)


def per_channel_apply(run, q, k, v, a, state, config, bwd_block_k):
    """run(q, k, v, a, state, *config, bwd_block_k, decode=...) -> (y, final
    state): the rendered host, whose custom op carries the backward's
    kernels as its gradient. Without a gradient, a few tokens may take the
    in-place decode kernel (run decides), except while torch.compile traces
    (it sees through the custom op only)."""
    tensors = [x for x in (q, k, v, a, state) if x is not None]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if q.shape[1] == 0:  # no tokens: the state passes through (torch ops)
        B, _, H, K = q.shape
        y = torch.zeros(B, 0, H, v.shape[-1], dtype=torch.float32, device=q.device)
        if state is None:
            return y, torch.zeros(B, H, K, v.shape[-1], dtype=torch.float32, device=q.device)
        return y, state.to(torch.float32)
    return run(q, k, v, a, torch_state(state) if grad else state, *config, bwd_block_k,
               decode=not grad and not torch.compiler.is_compiling())


def per_channel_op_grads(bwd, inputs, outputs, dy, d_final):
    """[dq, dk, dv, da, d_state] of forward(q, k, v, a, state, *config) ->
    (y, final state) by backward(q, k, v, a, state, dy, d_final, *the same
    config): the custom ops' autograd (registered by runtime/triton/ops.py
    custom_op_pair). The forward keeps only its inputs (the backward
    recomputes the chunk states). The backward is made of kernels: no double
    backward."""
    q, k, v, a, state, *config = inputs
    *grads, d_state = bwd(q, k, v, a, state, dy, d_final, *config)
    return (*grads, None if state is None else d_state)


def torch_state(state):
    """A decode state an autograd graph may keep (the torch backend's code,
    or the custom op's saved inputs): a copy when it is one the decode step
    updates in place, which a later step would change under the graph."""
    if state is not None and hasattr(state, "_mixerc_newest"):
        return state.clone()
    return state


def chunk_cumsum(a, chunk):
    """Inclusive cumulative sums of a [B, T, H, K] within chunks of `chunk`
    steps, float32 [B, n * chunk, H, K] (rows past T repeat the last
    token's: the padding adds zero log-decay)."""
    B, T, H, K = a.shape
    n = -(-T // chunk)
    out = torch.zeros(B, n * chunk, H, K, dtype=torch.float32, device=a.device)
    out[:, :T] = a
    return out.view(B, n, chunk, H, K).cumsum(2).view(B, n * chunk, H, K)
