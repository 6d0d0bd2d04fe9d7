"""Host-side helpers of the per-channel decay scan kernel
(codegen/triton/templates/triton_scan.py.jinja): the combine step of its
time scan, which algorithm a call runs (the scan or the chunked kernels)
from the config's choice and the cost model's two estimates, and ScanFn,
which differentiates its forward and backward custom ops (registered by
runtime/triton/ops.py custom_op_pair without autograd: the forward's
checkpoints are saved beside the inputs), and MappedScanFn, for a forward
that computes maps on load (Mamba's delta from dt and dt_bias, the values'
scale, a skip term, or a [B, T, H, K] log-decay that does not factor from
its leaves: GLA's logsigmoid(gk) / 16; codegen/triton/terms/scan.py),
whose backward takes the maps' chain rule in its kernel where the template
renders it (Mamba's) and by torch autograd otherwise."""

import torch
import triton

from mixerc.runtime.triton.ops import grads_through_maps, recompute_maps


@triton.jit
def _mx_scan_combine(decay_a, state_a, decay_b, state_b):
    # two spans of the recurrence S <- g S + u, earlier (a) then later (b):
    # together they decay by g_a g_b and add g_b u_a + u_b
    return decay_a * decay_b, decay_b * state_a + state_b


def scan_or_chunks(choice, scan_cost, chunks_cost):
    """"scan" or "chunks": the config's choice, or for "auto" the cheaper by
    the cost model (mixerc/cost.py gpu_per_channel_choice; ties scan)."""
    if choice != "auto":
        return choice
    return "scan" if scan_cost <= chunks_cost else "chunks"


# state entries per warp the scan keeps in registers without spilling (the
# fitness table: 32 heads x K = 16 at 4 warps take 80 registers; 1024 entries
# at 4 warps spill on sm_80 for K = 64)
SCAN_ENTRIES_PER_WARP = 128


def scan_heads(block_h, block_k, num_warps):
    """Heads per program of the scan: the config's, fewer where K is large
    (GLA's K = 128 would spill at 32 heads), at least one."""
    return max(1, min(block_h, SCAN_ENTRIES_PER_WARP * num_warps // block_k))


def scan_decode_heads(block_h, block_k, num_warps):
    """Heads per program of a decode step's launch of the forward kernel
    (without checkpoints): scan_heads, at most 32. 64 heads at 8 warps (K =
    16, Mamba's N) took ptxas's limit of 128 registers and 8 B of stack on
    sm_90a (triton 3.9); 32 take 48 and spill nothing. Every other config
    has at most 32 heads there already."""
    return scan_heads(min(block_h, 32), block_k, num_warps)


def scan_one_qk(num_warps) -> bool:
    """Whether the backward sums q's and k's gradients over the program's heads
    before its atomic adds (q and k at one head: Mamba's B and C): at up to 4
    warps. At 8 the cross-warp sum takes 16 bytes of stack on sm_80 (the
    fitness table); per-entry atomic adds then."""
    return num_warps <= 4


def scan_bwd_maxnreg(num_warps):
    """The backward's register limit (Triton's `maxnreg` launch option), or
    None for ptxas's own. ptxas holds the reverse scan to 128 registers, and
    at 2 and 8 warps that spills (triton 3.9, K = 128, the value dim per head
    128: 8 B of stack at 2 warps on sm_80, 24 B at 8 warps on sm_80, 32 B on
    sm_90a; 8 to 32 B at K = 32 and 64 too). With the limit at 255 they take
    171 to 182 registers and spill nothing. The 4-warp default keeps ptxas's
    limit: 123 to 128 registers without spills at K = 16, 32 and 128, where
    the limit would raise it to about 176."""
    return None if num_warps == 4 else 255


# tokens between the forward's checkpoints of the state when a gradient is
# needed: the backward recomputes each segment from its checkpoint into a
# scratch of SCAN_SEGMENT states per program (BLOCK_H x BLOCK_K float32 each)
SCAN_SEGMENT = 64


def scan_runs(*tensors) -> bool:
    """True when the scan takes a call (with or without gradients): no input is
    float64 (the kernels compute in float32; float64 runs the torch code)."""
    return not any(torch.is_tensor(x) and x.dtype == torch.float64 for x in tensors)


def scan_needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(x) and x.requires_grad
                                           for x in tensors)


def scan_apply(ops, q, k, v, dt, a, state, block_h, num_warps):
    """(y, final state) by the forward op, differentiable by the backward op
    when a gradient is needed."""
    if scan_needs_grad(q, k, v, dt, a, state):
        return ScanFn.apply(ops, (block_h, num_warps), q, k, v, dt, a, state)
    q, k, v, dt, a, state = _scan_inputs(q, k, v, dt, a, state)
    return ops[0](q, k, v, dt, a, state, block_h, num_warps, 0)[:2]


def _scan_inputs(q, k, v, dt, a, state):
    """The kernels' operands: contiguous; dt, a and the state float32."""
    f32 = lambda x: None if x is None else x.to(torch.float32).contiguous()  # noqa: E731
    return q.contiguous(), k.contiguous(), v.contiguous(), f32(dt), f32(a), f32(state)


class ScanFn(torch.autograd.Function):
    """The scan forward storing a checkpoint every SCAN_SEGMENT tokens, and
    its reverse scan (templates/triton_scan.py.jinja _bwd) as the backward.
    Saves the inputs and the checkpoints only (O(T / SCAN_SEGMENT) states)."""

    @staticmethod
    def forward(ctx, ops, cfg, q, k, v, dt, a, state):
        xs = _scan_inputs(q, k, v, dt, a, state)
        y, final, ck = ops[0](*xs, *cfg, SCAN_SEGMENT)
        ctx.ops, ctx.cfg = ops, cfg
        ctx.dtypes = [None if x is None else x.dtype for x in (q, k, v, dt, a, state)]
        ctx.save_for_backward(*xs[:5], ck)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels: no double backward
    def backward(ctx, dy, dfinal):
        q, k, v, dt, a, ck = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        dy = dy.to(torch.float32).contiguous()
        if dfinal is not None:
            dfinal = dfinal.to(torch.float32).contiguous()
        grads = ctx.ops[1](dy, dfinal, q, k, v, dt, a, ck, *ctx.cfg, SCAN_SEGMENT)
        grads = [None if want is None else g.to(want)
                 for g, want in zip(grads, ctx.dtypes)]
        return (None, None, *grads)


def scan_out_dtype(out_dtype):
    """y's dtype in a forward op given the dtype the mixer outputs (None:
    y is not an output as is): a half as given (stored rounded from float32
    accumulators; no cast after the kernel, and a backward receives dy in it,
    which its kernel widens), else float32."""
    return out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.float32


def scan_mapped_apply(ops, prologue, q, k, v, dt, a, state, block_h, num_warps, leaves, skip,
                      fused_grad=False, out_dtype=None):
    """(y, final state) by a forward op that computes maps on load: leaves
    (None: dt, a and v as given) and a skip term d [H] (or None);
    prologue(v, dt, leaves, skip) -> (values, dt, d v or None, the log-decay
    [B, T, H, K] or None) computes the same by torch ops (a None log-decay:
    `a` as given, or the kernel's factors; with an unfactored map of leaves
    `a` is None). With a gradient: MappedScanFn, or while torch.compile traces
    the maps as torch ops before ScanFn (inductor fuses them) and the skip
    term after it. fused_grad: the backward op takes the maps' chain rule in
    its kernel (a factored log-decay's per-token factor and the values'
    scale: Mamba's; the template's `maps`), given the leaves. out_dtype: y's
    where it is the mixer's output as is (scan_out_dtype), without torch.compile."""
    tensors = (q, k, v, dt, a, state, skip, *(leaves or ()))
    if scan_needs_grad(*tensors):
        if not torch.compiler.is_compiling():
            return MappedScanFn.apply(ops, (block_h, num_warps), prologue,
                                      (fused_grad and leaves is not None, out_dtype), q, k, v,
                                      dt, a, state, skip, *(leaves or ()))
        v, dt, extra, mapped_a = prologue(v, dt, leaves, skip)
        y, final = ScanFn.apply(ops, (block_h, num_warps), q, k, v, dt,
                                a if mapped_a is None else mapped_a, state)
        return (y if extra is None else y + extra), final
    return _mapped_forward(ops, (block_h, num_warps), q, k, v, dt, a, state, skip, leaves,
                           0, out_dtype)[:2]


def _mapped_forward(ops, cfg, q, k, v, dt, a, state, skip, leaves, seg, out_dtype=None):
    """The forward op on the raw inputs (the kernel maps them; the rendered
    launch reads the leaves as it needs them: contiguous, or by strides)."""
    q, k, v, dt, a, state = _scan_inputs(q, k, v, dt, a, state)
    return ops[0](q, k, v, dt, a, state, *cfg, seg, [] if leaves is None else list(leaves),
                  leaves is not None, None if skip is None else skip.to(torch.float32).contiguous(),
                  out_dtype)


class MappedScanFn(torch.autograd.Function):
    """ScanFn for a forward that computes maps on load: it runs on the raw
    inputs and stores nothing mapped (the inputs, the leaves, the
    checkpoints). Its backward, `fused`: one op whose kernel computes the
    maps on load again and takes their chain rule (and the skip term's) on
    the values it holds, so no map or its gradient is a torch tensor
    (Mamba's: the template's `_mapped_grad_launch`). Otherwise (GLA's
    unfactored log-decay map, or no leaves) it recomputes the maps by torch
    ops (`prologue`), runs the reverse scan on the mapped values, decay step
    and log-decay, and takes the maps' (and the skip term's) gradients by
    autograd."""

    @staticmethod
    def forward(ctx, ops, cfg, prologue, how, q, k, v, dt, a, state, skip, *leaves):
        fused, out_dtype = how  # (the fused backward, y's dtype: scan_mapped_apply)
        ls = list(leaves) if leaves else None
        y, final, ck = _mapped_forward(ops, cfg, q, k, v, dt, a, state, skip, ls, SCAN_SEGMENT,
                                       out_dtype)
        ctx.ops, ctx.cfg, ctx.prologue, ctx.mapped = ops, cfg, prologue, ls is not None
        ctx.fused = fused
        ctx.dtypes = [None if x is None else x.dtype for x in (q, k, a, state)]
        ctx.save_for_backward(q, k, v, dt, a, ck, skip, *leaves)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels: no double backward
    def backward(ctx, dy, dfinal):
        q, k, v, dt, a, ck, skip, *leaves = ctx.saved_tensors
        if ctx.fused:
            return (None, None, None, None, *_fused_backward(ctx, dy, dfinal, q, k, v, a, ck,
                                                             skip, leaves))
        n = ctx.needs_input_grad  # ops, cfg, prologue, how, q, k, v, dt, a, state, skip, *leaves
        needs = n[:3] + n[4:]  # (as if without how)
        inputs, mapped = recompute_maps(
            lambda v, dt, skip, *ls: ctx.prologue(v, dt, list(ls) if ctx.mapped else None, skip),
            [v, dt, skip, *leaves], [needs[5], needs[6], needs[9], *needs[10:]])
        if dy is None:
            dy = torch.zeros(*v.shape[:3], ck.shape[-1], dtype=torch.float32, device=v.device)
        dy = dy.to(torch.float32).contiguous()
        if dfinal is not None:
            dfinal = dfinal.to(torch.float32).contiguous()
        mv, mdt, ma = (None if m is None else m.detach().to(torch.float32).contiguous()
                       for m in (mapped[0], mapped[1], mapped[3]))
        gq, gk, gv, gdt, ga, gs = ctx.ops[1](
            dy, dfinal, *_scan_inputs(q, k, mv, mdt, a if ma is None else ma, None)[:5],
            ck, *ctx.cfg, SCAN_SEGMENT)
        # the log-decay's gradient: a's (as given or its factor), or through its map
        gv_, gdt_, gskip, *gleaves = grads_through_maps(
            inputs, mapped, (gv, gdt, dy, None if ma is None else ga))
        gq, gk, ga, gs = (None if want is None else g.to(want)
                          for g, want in zip((gq, gk, ga, gs), ctx.dtypes))
        return (None, None, None, None, gq, gk, gv_, gdt_, ga, gs, gskip, *gleaves)


def _fused_backward(ctx, dy, dfinal, q, k, v, a, ck, skip, leaves):
    """MappedScanFn's backward in one op (the maps' chain rule in its
    kernel): the gradients of q, k, v, dt (None: unused), a, the state, the
    skip's d and the leaves, each in its input's dtype. dy is read in its
    own dtype (the kernel widens it)."""
    if dy is None:
        dy = torch.zeros(*v.shape[:3], ck.shape[-1], dtype=torch.float32, device=v.device)
    if dfinal is not None:
        dfinal = dfinal.to(torch.float32).contiguous()
    q, k, v, _, a, _ = _scan_inputs(q, k, v, None, a, None)
    gq, gk, gv, ga, gs, *gl, gd = ctx.ops[1](dy.contiguous(), dfinal, q, k, v, None, a, ck,
                                             *ctx.cfg, SCAN_SEGMENT, leaves, skip)
    gq, gk, ga, gs = (None if want is None else g.to(want)
                      for g, want in zip((gq, gk, ga, gs), ctx.dtypes))
    gd = None if skip is None else gd.to(skip.dtype)
    return (gq, gk, gv, None, ga, gs, gd, *gl)
