"""Host-side helpers of the per-channel decay scan kernel
(codegen/triton/templates/triton_scan.py.jinja): the combine step of its
time scan, and which algorithm a call runs (the scan or the chunked
kernels) from the config's choice and the cost model's two estimates."""

import torch
import triton


@triton.jit
def _mx_scan_combine(decay_a, state_a, decay_b, state_b):
    # two spans of the recurrence S <- g S + u, earlier (a) then later (b):
    # together they decay by g_a g_b and add g_b u_a + u_b
    return decay_a * decay_b, decay_b * state_a + state_b


def scan_forward(*tensors) -> bool:
    """True when the scan may run: it is forward-only, so no input needs a
    gradient (or grad mode is off), and none is float64 (it computes in
    float32). Otherwise the chunked kernels run (their backward is Triton's
    too; float64 takes the torch backend's code)."""
    xs = [x for x in tensors if torch.is_tensor(x)]
    if any(x.dtype == torch.float64 for x in xs):
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))


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
