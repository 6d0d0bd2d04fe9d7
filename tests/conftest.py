import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

torch.set_num_threads(min(2, torch.get_num_threads()))

STDLIB = ["attention", "sliding_window", "linear_attention", "based", "retnet", "gla", "ssd",
          "mamba", "hydra", "h3", "gated_conv"]
CAUSAL = [n for n in STDLIB if n != "hydra"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def stdlib():
    return STDLIB
