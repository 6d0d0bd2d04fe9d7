"""Host-side helpers of the per-channel decay scan kernel
(codegen/triton/templates/triton_scan.py.jinja): the combine step of its
time scan, which algorithm a call runs (the scan or the chunked kernels)
from the config's choice and the cost model's two estimates, and ScanFn,
which differentiates its forward and backward custom ops (registered by
runtime/triton/ops.py custom_op_pair without autograd: the forward's
checkpoints are saved beside the inputs)."""

import torch
import triton


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


def scan_one_qk(num_warps) -> bool:
    """Whether the backward sums q's and k's gradients over the program's heads
    before its atomic adds (q and k at one head: Mamba's B and C): at up to 4
    warps. At 8 the cross-warp sum takes 16 bytes of stack on sm_80 (the
    fitness table); per-entry atomic adds then."""
    return num_warps <= 4


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
