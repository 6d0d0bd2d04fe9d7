"""The per-channel kernels' chunk-local cumulative log-decays
(runtime/triton/per_channel.py chunk_cumsum, a Triton kernel) against a
float64 sum chunk by chunk: inclusive sums within each chunk, float32
[B, n * chunk, H, K], the rows past T repeating the last token's (the
padding adds zero log-decay). T below, at and past a multiple of the chunk,
the configs' chunks (16, 32, 64), K not a power of 2 and over one block of
channels, bf16 / fp16 / fp32 input read as it is, strided views, strong
decays. Outputs poisoned (NaN) before the kernel writes. The kernel's static
fitness (sm_90a, sm_80): tests/test_triton_per_channel.py."""

import pytest
import torch

pytest.importorskip("triton")

from mixerc.runtime.triton.per_channel import chunk_cumsum  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(a, chunk):
    """float64, one chunk at a time: its rows' running sums, then its padding
    (past T) holding the last row's."""
    B, T, H, K = a.shape
    n = -(-T // chunk)
    x = a.cpu().to(torch.float64)
    out = torch.empty(B, n * chunk, H, K, dtype=torch.float64)
    for c in range(n):
        rows = x[:, c * chunk:min(T, (c + 1) * chunk)]
        sums = rows.cumsum(1)
        out[:, c * chunk:c * chunk + rows.shape[1]] = sums
        out[:, c * chunk + rows.shape[1]:(c + 1) * chunk] = sums[:, -1:]
    return out


def log_decays(B, T, H, K, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = -scale * torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    return a.to(device=DEVICE, dtype=dtype)


def check(a, chunk):
    got = chunk_cumsum(a, chunk)
    want = reference(a, chunk)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.is_contiguous()
    assert torch.isfinite(got).all()  # every element written (torch.empty is poisoned)
    err = float((got.cpu().double() - want).abs().max())
    assert err <= 1e-6 * max(1.0, float(want.abs().max()))  # float32's rounding
    T = a.shape[1]
    if T % chunk:  # the padding repeats the last token's sum exactly
        pad = got[:, T:]
        assert torch.equal(pad, got[:, T - 1:T].expand_as(pad))
    return got


@pytest.mark.parametrize("T,chunk", [(37, 16), (5, 64), (64, 32), (64, 64), (130, 64),
                                     (1, 16), (96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_float64_per_chunk(poisoned, T, chunk, dtype):
    check(log_decays(2, T, 3, 20, dtype, seed=T), chunk)


@pytest.mark.parametrize("K", [1, 16, 80, 130])
def test_channels_in_blocks(poisoned, K):
    """K over one program's block of channels (64), or not a power of 2."""
    check(log_decays(1, 45, 2, K, torch.float32, seed=K), 16)


def test_strided_inputs_read_in_place(poisoned):
    """A view (time and heads swapped in memory, a slice of channels) and a
    decay broadcast over the batch (stride 0): read through their strides."""
    base = log_decays(2, 3, 50, 24, torch.float32).transpose(1, 2)   # [2, 50, 3, 24]
    check(base, 16)
    check(base[..., 4:17], 32)
    shared = log_decays(1, 40, 2, 12, torch.bfloat16).expand(3, -1, -1, -1)
    assert shared.stride(0) == 0
    got = check(shared, 16)
    assert torch.equal(got[0], got[2])


def test_strong_decays_stay_finite(poisoned):
    """log-decay -5 per step over long inputs: sums of whole chunks only
    (-320 at chunks of 64), finite in float32 and equal to float64's."""
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.full((1, 1000, 2, 24), -5.0, dtype=dtype, device=DEVICE)
        a[:, ::7] = -0.01
        got = check(a, 64)
        assert float(got.min()) >= -5.0 * 64


def test_no_tokens_or_no_heads(poisoned):
    assert chunk_cumsum(torch.zeros(2, 0, 3, 8, device=DEVICE), 16).shape == (2, 0, 3, 8)
    assert chunk_cumsum(torch.zeros(0, 20, 3, 8, device=DEVICE), 16).shape == (0, 32, 3, 8)
    assert chunk_cumsum(torch.zeros(2, 20, 0, 8, device=DEVICE), 16).shape == (2, 32, 0, 8)
