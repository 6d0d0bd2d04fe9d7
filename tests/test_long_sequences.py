"""Long sequences and extreme decays: float32 stays finite and close to
float64 at T = 16k with log-decays from -5 to -1e-4 per step, and float64
matches the dense interpreter at T = 3k."""

import math

import mixerc
import pytest
import torch
from conftest import rel_err

f64 = torch.float64


def inputs(name, T, log_decay, seed=0):
    """Small dims, long T, every step decaying by exp(log_decay)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    if name == "retnet":
        return dict(q=r(1, T, 2, 4), k=r(1, T, 2, 4), v=r(1, T, 2, 3),
                    log_gamma=torch.full((2,), log_decay, dtype=f64))
    if name == "gla":
        return dict(q=r(1, T, 2, 4), k=r(1, T, 2, 4), v=r(1, T, 2, 3),
                    g=torch.full((1, T, 2, 4), log_decay, dtype=f64) * (1 + 0.1 * r(1, T, 2, 4)))
    # ssd / mamba: delta = softplus(dt + dt_bias) = 1, A = -exp(A_log) = log_decay
    one = math.log(math.e - 1)
    if name == "ssd":
        return dict(x=r(1, T, 2, 3), dt=torch.zeros(1, T, 2, dtype=f64), B=r(1, T, 1, 4),
                    C=r(1, T, 1, 4), A_log=torch.full((2,), math.log(-log_decay), dtype=f64),
                    dt_bias=torch.full((2,), one, dtype=f64), D=r(2))
    return dict(x=r(1, T, 3), dt=torch.zeros(1, T, 3, dtype=f64), B=r(1, T, 4), C=r(1, T, 4),
                A_log=torch.full((3, 4), math.log(-log_decay), dtype=f64) + 0.1 * r(3, 4),
                dt_bias=torch.full((3,), one, dtype=f64), D=r(3))


@pytest.mark.parametrize("name", ["ssd", "gla", "mamba", "retnet"])
@pytest.mark.parametrize("log_decay", [-5.0, -1e-4])
def test_float32_at_16k(name, log_decay):
    m = mixerc.compile(name, backend="torch")
    args = inputs(name, 16384, log_decay)
    y64 = m(**args)
    y32 = m(**{k: v.float() for k, v in args.items()})
    assert torch.isfinite(y32).all() and torch.isfinite(y64).all()
    assert rel_err(y32, y64) < 1e-4


@pytest.mark.parametrize("name", ["ssd", "gla"])
@pytest.mark.parametrize("log_decay", [-5.0, -1e-4])
def test_float64_matches_dense_at_3k(name, log_decay):
    args = inputs(name, 3000, log_decay, seed=1)
    y = mixerc.compile(name, backend="torch")(**args)
    ref = mixerc.compile(name, backend="dense")(**args)
    assert rel_err(y, ref) < 1e-9
