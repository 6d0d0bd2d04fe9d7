"""Host-side helpers of the per-channel decay kernels (GLA, Mamba-1: a
log-decay per token and channel of the contracted dim, inside the sum over
it): which path a call takes, and the chunk-local cumulative log-decays the
kernel reads at any row (its exact pairwise decays on the diagonal
sub-blocks gather them)."""

import torch

# a call of at most this many tokens (no gradient) is a decode step: the
# recurrence kernel (runtime/triton/recurrent.py), state updated in place
DECODE_TOKENS = 16


def kernel_forward(*tensors) -> bool:
    """True when the forward runs the Triton kernel: no gradient is needed
    (grad mode off, or no input requires one) and no input is float64 (the
    kernels compute in float32). Otherwise the torch backend's chunked code
    runs, and autograd differentiates it."""
    xs = [x for x in tensors if torch.is_tensor(x)]
    if any(x.dtype == torch.float64 for x in xs):
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))


def torch_state(state):
    """A decode state for the torch backend's code: a copy when the state is
    one the decode step updates in place (its autograd graph may keep it)."""
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
