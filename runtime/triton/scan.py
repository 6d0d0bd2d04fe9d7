"""Host-side helpers of the per-channel decay scan kernel
(codegen/triton/templates/triton_scan.py.jinja): the combine step of its
time scan, and which algorithm a call runs (the scan or the chunked
kernels) from the config's choice and the cost model's two estimates."""

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
