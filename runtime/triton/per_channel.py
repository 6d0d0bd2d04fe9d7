"""Host-side helpers of the per-channel decay kernels (GLA, Mamba-1, H3's
modal kernel: a log-decay per token and channel of the contracted dim,
inside the sum over it): which path a call takes, the chunk-local
cumulative log-decays the kernels read at any row (their exact pairwise
decays on the diagonal sub-blocks gather them; a kernel of its own, shared
by the rendered forward and backward, whose three steps a rendered kernel
that computes the log-decay on load from its map's leaves reuses), and how
the custom ops' autograd joins them
(codegen/triton/templates/triton_per_channel*.py.jinja; with such a map
MappedPerChannelFn)."""

import torch
import triton
import triton.language as tl

from mixerc.runtime.triton.ops import grads_through_maps, recompute_maps

# a call of at most this many tokens (no gradient) is a decode step: the
# recurrence kernel (runtime/triton/recurrent.py), state updated in place
DECODE_TOKENS = 16

# the intra kernel (scores inside a chunk) takes K in blocks of at most this
# many channels (static fitness table, K = 128, bf16): a whole-K tile spills
# under Triton 3.6 on sm_90a and sm_80, blocks of 64 on sm_80 under 3.9;
# 32 fits both targets under both
INTRA_BLOCK_K = 32

# the chunk kernels' state tiles [K, BLOCK_V] (forward, bwd_states, bwd_dv;
# dqk's value blocks) hold at most this many float32 entries: BLOCK_V at most
# 4096 / BLOCK_K. Triton 3.9, K = V = 128, bf16: block_v = 64 spilled 8 B
# (sm_90a) and 272 B (sm_80) in the forward, 16 and 424 B in bwd_dv; 128
# spilled 904 / 7368 B there and in bwd_states and dqk; 32 fits both targets
PER_CHANNEL_STATE_ENTRIES = 4096


# float32 inputs: the dots in IEEE float32 are FMAs (no tensor cores), each
# thread holding its rows and columns of both operands over the contraction.
# Triton 3.9, K = V = 128, the default config (chunks of 64, whole-K state
# tiles [128, 32], 8 warps): the forward spilled 5224 B (sm_90a) / 6040 B
# (sm_80), bwd_dv 5184 / 5680 B, bwd_states 0 / 4432 B. Whole-K tiles spill
# at any chunk (chunks of 16: 632 B); K blocks of 32 at chunks of 64 (472 B),
# at 4 warps (8 B on sm_80) and with 64 value columns (32 B). So float32
# takes chunks of at most FP32_CHUNK steps, and the state kernels (forward,
# bwd_states, bwd_dv) take K over programs in blocks of FP32_BLOCK channels:
# [32, 32] state tiles at FP32_WARPS warps or more (211-221 registers at the
# default, at most 231 over the tuner's space, no spills on either target),
# each block's partial y or dv summed after them.
FP32_CHUNK = 32
FP32_BLOCK = 32
FP32_WARPS = 8


def per_channel_chunk(chunk, fp32):
    """The chunk a launch takes: the config's, at most FP32_CHUNK for float32
    inputs (fp32: whether q is float32)."""
    return min(chunk, FP32_CHUNK) if fp32 else chunk


def per_channel_block_k(block_k, fp32):
    """The state kernels' key channels per program: all of them (block_k: K
    as a power of two, at least 16), or FP32_BLOCK for float32 inputs."""
    return min(block_k, FP32_BLOCK) if fp32 else block_k


def per_channel_block_v(block_v, block_k, dv, fp32=False):
    """The chunk kernels' value block: the config's, at most the value dim
    (a power of two, at least 16) and PER_CHANNEL_STATE_ENTRIES / block_k
    (block_k: the whole K's block), and FP32_BLOCK for float32 inputs."""
    return max(16, min(block_v, triton.next_power_of_2(dv),
                       PER_CHANNEL_STATE_ENTRIES // block_k, FP32_BLOCK if fp32 else block_v))


def per_channel_warps(num_warps, block_k, block_v, fp32=False):
    """The chunk kernels' warps: the config's, at least one per 512 entries of
    the [block_k, block_v] state tile (16 float32 registers a thread), and at
    least FP32_WARPS for float32 inputs. Triton 3.9, K = 128, 32 value
    columns, bf16: at 4 warps the forward spilled 128 B (sm_90a) and 224 B
    (sm_80), bwd_dv 112 B and 296 B; at 8 none."""
    return max(num_warps, block_k * block_v // 512, FP32_WARPS if fp32 else 1)


def per_channel_dqk_warps(num_warps, chunk):
    """The backward dq/dk kernel's warps: at most one per 8 rows of the chunk
    (its tiles are [chunk, bwd_block_k]). Triton 3.9, K = V = 128, bf16, chunks
    of 32: at 8 warps it took ptxas's 128 registers and spilled 8 B on
    sm_90a; at 4, 180 registers and no spills (sm_80: 168)."""
    return max(1, min(num_warps, chunk // 8))


def per_channel_kernels(*tensors) -> bool:
    """True when the term runs the Triton kernels: no input is float64 (they
    compute in float32). float64 runs the torch backend's chunked code,
    which autograd differentiates."""
    return not any(torch.is_tensor(x) and x.dtype == torch.float64 for x in tensors)


def per_channel_apply(run, q, k, v, a, state, config, bwd_block_k, leaves=None,
                      out_dtype=None):
    """run(q, k, v, a, state, *config, bwd_block_k, decode=...) -> (y, final
    state): the rendered host, whose custom op carries the backward's
    kernels as its gradient. Without a gradient, a few tokens may take the
    in-place decode kernel (run decides), except while torch.compile traces
    (it sees through the custom op only).

    leaves: None, or the inputs of the log-decay's map (a is then None):
    the cumsum kernel computes it on load (run.mapped, its map by torch ops
    run.prologue, codegen/triton/terms/per_channel.py). With a gradient
    MappedPerChannelFn; while torch.compile traces with a gradient the map by
    torch ops first; a decode step (a few tokens) the recurrence with the map
    on load (run.mapped_step). out_dtype: None, or the dtype a decode step's
    kernel stores y in (the inputs', when y is the mixer's output as is);
    every other path returns y in float32. config: (chunk, sub, block_v,
    num_warps, num_stages), the chunk capped for float32 (per_channel_chunk)."""
    tensors = [x for x in (q, k, v, a, state, *(leaves or ())) if x is not None]
    if q.dtype == torch.float32:  # float32's chunks: at most FP32_CHUNK steps (no spills)
        config = (per_channel_chunk(config[0], True), *config[1:])
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if q.shape[1] == 0:  # no tokens: the state passes through (torch ops)
        B, _, H, K = q.shape
        y = torch.zeros(B, 0, H, v.shape[-1], dtype=torch.float32, device=q.device)
        if state is None:
            return y, torch.zeros(B, H, K, v.shape[-1], dtype=torch.float32, device=q.device)
        return y, state.to(torch.float32)
    decode = not grad and not torch.compiler.is_compiling()
    if leaves is not None:
        if grad and not torch.compiler.is_compiling():
            return MappedPerChannelFn.apply(run, tuple(config), bwd_block_k, q, k, v,
                                            torch_state(state), *leaves)
        if decode and q.shape[1] <= DECODE_TOKENS:  # one launch, the map on load
            return run.mapped_step(q, k, v, leaves, state, out_dtype)
        if grad:  # traced: the map by torch ops (inductor fuses it)
            a = run.prologue(leaves, q.shape[2])
        else:
            return run.mapped(q, k, v, leaves, state, *config, bwd_block_k)
    return run(q, k, v, a, torch_state(state) if grad else state, *config, bwd_block_k,
               decode=decode, out_dtype=out_dtype)


class MappedPerChannelFn(torch.autograd.Function):
    """The per-channel kernels with the log-decay computed on load from its
    map's leaves (the forward stores nothing mapped: q, k, v, the state and
    the leaves). The backward's kernels take the leaves too (run.mapped_backward:
    the cumsum kernel maps them on load again), and where a leaf needs a
    gradient the map is recomputed by torch ops (run.prologue) to chain the
    log-decay's gradient through it by autograd (runtime/triton/ops.py
    recompute_maps, grads_through_maps), as MappedChunkedFn does."""

    @staticmethod
    def forward(ctx, run, config, bwd_block_k, q, k, v, state, *leaves):
        y, final = run.mapped(q, k, v, list(leaves), state, *config, bwd_block_k)
        ctx.run, ctx.config = run, (*config, bwd_block_k)
        ctx.save_for_backward(q, k, v, state, *leaves)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels: no double backward
    def backward(ctx, dy, d_final):
        q, k, v, state, *leaves = ctx.saved_tensors
        needs = ctx.needs_input_grad  # run, config, bwd_block_k, q, k, v, state, *leaves
        dq, dk, dv, da, d_state = ctx.run.mapped_backward(q, k, v, list(leaves), state, dy,
                                                          d_final, *ctx.config)
        gleaves = [None] * len(leaves)
        if any(needs[7:]):  # the map by torch, for its gradient only
            inputs, mapped = recompute_maps(
                lambda *ls: [ctx.run.prologue(list(ls), q.shape[2])], leaves, needs[7:])
            gleaves = grads_through_maps(inputs, mapped, [da])
        return (None, None, None, dq, dk, dv, None if state is None else d_state, *gleaves)


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


# channels per program of the chunk-local cumulative sum: a [chunk, 64]
# float32 tile (16 KB at chunks of 64) per 4 warps
CUMSUM_BLOCK_K = 64


@triton.jit
def _mx_chunk_tile(T, H, n_k, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # this program's tile of the chunk-local cumulative sum: one chunk of
    # BLOCK_T steps x one (batch, head) x BLOCK_K channels. (c0, b, h, rows'
    # and channels' offsets, the mask of the tile's tokens and channels);
    # int64 only in the program's base offsets
    c0 = tl.program_id(0) * BLOCK_T
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = ((c0 + offs_t) < T)[:, None] & (offs_k < n_k)[None, :]
    return c0, b, h, offs_t, offs_k, ok


@triton.jit
def _mx_chunk_load(A, c0, b, h, offs_t, offs_k, ok, stride_b, stride_t, stride_h, stride_k):
    # the tile of a [B, T, H, K] tensor (any strides, any float dtype) in
    # float32, zero outside it
    src = A + b * stride_b + h * stride_h + c0 * stride_t.to(tl.int64)
    return tl.load(src + offs_t[:, None] * stride_t + offs_k[None, :] * stride_k,
                   mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _mx_chunk_cumsum_store(x, CS, c0, b, h, offs_t, offs_k, T, H, n_k, stride_cs,
                           BLOCK_T: tl.constexpr):
    # the tile's log-decays x (float32, zero past T: no log-decay there, so
    # the padding rows repeat the last token's sum): their inclusive sums
    # within the chunk, written once in float32
    n_pad = tl.cdiv(T, BLOCK_T) * BLOCK_T
    dst = CS + ((b * n_pad + c0) * H + h) * n_k
    tl.store(dst + offs_t[:, None] * stride_cs + offs_k[None, :], tl.cumsum(x, 0),
             mask=(offs_k < n_k)[None, :])


@triton.jit
def _mx_chunk_cumsum(A, CS, T, H, n_k, stride_b, stride_t, stride_h, stride_k, stride_cs,
                     BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # a read in its own dtype once, its inclusive sums within the chunk
    # written once in float32. A kernel that computes the log-decay on load
    # (a map of its leaves: templates/triton_per_channel.py.jinja
    # _mapped_cumsum) is these three steps with the map in the middle
    c0, b, h, offs_t, offs_k, ok = _mx_chunk_tile(T, H, n_k, BLOCK_T, BLOCK_K)
    x = _mx_chunk_load(A, c0, b, h, offs_t, offs_k, ok, stride_b, stride_t, stride_h, stride_k)
    _mx_chunk_cumsum_store(x, CS, c0, b, h, offs_t, offs_k, T, H, n_k, stride_cs, BLOCK_T)


def chunk_cumsum_grid(shape, chunk, device):
    """(the float32 [B, n * chunk, H, K] output, the launch grid, BLOCK_K) of
    a chunk-local cumulative sum over [B, T, H, K] (chunk_cumsum, or a
    kernel computing the log-decay on load)."""
    B, T, H, K = shape
    n = -(-T // chunk)
    out = torch.empty(B, n * chunk, H, K, dtype=torch.float32, device=device)
    block_k = max(16, min(triton.next_power_of_2(max(K, 1)), CUMSUM_BLOCK_K))
    return out, (n, B * H, triton.cdiv(K, block_k)), block_k


def chunk_cumsum(a, chunk):
    """Inclusive cumulative sums of a [B, T, H, K] (any strides, bf16, fp16
    or fp32) within chunks of `chunk` steps (a power of 2), float32
    [B, n * chunk, H, K] (rows past T repeat the last token's: the padding
    adds zero log-decay): the layout the per-channel kernels read. A Triton
    kernel (one pass, where torch would take three over the float32 copy);
    its callers run only where the other kernels run (float64 takes the
    torch backend's code, which sums its own chunks)."""
    B, T, H, K = a.shape
    out, grid, block_k = chunk_cumsum_grid(a.shape, chunk, a.device)
    if out.numel():
        _mx_chunk_cumsum[grid](a, out, T, H, K, *a.stride(), H * K, BLOCK_T=chunk,
                               BLOCK_K=block_k, num_warps=4)
    return out
