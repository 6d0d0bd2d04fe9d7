"""The chunked scalar-decay family's decode step (linear attention, RetNet,
Mamba-2 SSD and random programs with maps): one launch of the rendered
decode kernel (templates/triton_chunked.py.jinja `_decode_kernel`) per step,
which computes on load what the chunk kernels do (the maps of q, k, the
log-decay and the key scale from their leaves, the keys' scale at the keys'
groups, the normalizer's ones column and the division by it, the skip term)
and updates the state in place (runtime/triton/recurrent.py step_state).

Against the dense float64 interpreter: a prefill, single-token steps and a
block of several tokens from the state (a step of its own, <= 16 tokens),
batch > 1, head dims not powers of two and wider than one value block,
outputs poisoned. Every step is exactly one kernel launch and runs none of
the torch paths (the prologue, the scaled keys, the ones column, the
division, the skip); the state's buffer is the same across steps. Kernels
run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import (assert_one_launch_per_step, assert_steps_in_place, compiled_mixers,
                      rel_err, to_device)

from mixerc.inputs import random_inputs
from test_triton_prologue import CONST_DECAY, mapped_program

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

# K = 40, V = 70: the decode kernel's K block is 64, so two value blocks of
# 64 (a normalizer's program takes both, the others one each)
SIZES = {"H": 4, "G": 2, "D": 40, "K": 40, "N": 40, "V": 70, "P": 70}
# a decay, a key scale at the key groups, q at the groups too, feature maps,
# and the normalizer with its division: all the kernel computes on load but
# the skip
NORMALIZED = """mixer normalized_grouped {
  dims H, G divides H, K, V
  input q : [G, K]
  input k : [G, K]
  input v : [H, V]
  input u : [H]
  param p : [H] = uniform(-1, 1)
  let M = decay(p - 2) * ((relu(q) + 0.5) @ (softplus(u + p) * (silu(k) + 1))^T) * (s <= t)
  out y = (M @ v) / (M @ 1)
}"""
CASES = [("linear_attention", 2), ("retnet", 2), ("ssd", 2), ("ssd", 1), (NORMALIZED, 2),
         (mapped_program(3), 2), (mapped_program(5), 2), (CONST_DECAY, 2)]
IDS = ["linear_attention", "retnet", "ssd_G2", "ssd_G1", "normalized", "mapped3", "mapped5",
       "const_decay"]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(chunk=16, block_k=16, block_v=16)


def no_torch_paths(mod, monkeypatch):
    """The torch versions of what the decode kernel computes on load fail if called."""
    def refuse(name):
        def fail(*a, **k):
            raise AssertionError(f"the decode step ran {name} in torch")
        return fail
    for name in vars(mod).copy():
        if name.endswith("_prologue") or name in ("scaled_keys", "with_skip", "divided",
                                                  "recurrent_step", "chunk_step"):
            monkeypatch.setattr(mod, name, refuse(name))


def decode_kernel(mod) -> str:
    (name,) = [n for n in vars(mod) if n.startswith("chunked_kernel") and
               n.endswith("_decode_kernel")]
    return name


def args_of(m, G, B=3, T=24, seed=1):
    return random_inputs(m.program, dict(SIZES, G=G), B, T, seed=seed, dtype=f64)


@pytest.mark.parametrize("src,G", CASES, ids=IDS)
def test_steps_are_one_fused_launch_equal_dense(src, G, compiled, launches, monkeypatch,
                                                poisoned):
    """Prefill 9 tokens, 3 single-token steps, a 5-token block from the state,
    a 16-token block, then single steps: each equals dense; every step after
    the prefill is one launch of the decode kernel and nothing else, on the
    same state buffer."""
    m, d = compiled(src), compiled(src, "dense")
    mod = m._impl.module
    args = args_of(m, G, T=40)
    want = d(**args)
    x = to_device(args, torch.float32)
    tokens = set(m.program.inputs)
    y, state = m(**{n: (v[:, :9] if n in tokens else v) for n, v in x.items()},
                 return_state=True)
    assert rel_err(y.cpu(), want[:, :9]) < 1e-4
    no_torch_paths(mod, monkeypatch)
    (key,) = mod.STATE_KEYS
    assert_one_launch_per_step(m, x, want, launches, decode_kernel(mod), 9, state, key)


@pytest.mark.parametrize("src", ["linear_attention", "ssd"])
def test_an_older_state_is_refused_a_clone_continues(src, compiled):
    """The state is updated in place: continuing one that was already
    continued is a clear error; a clone taken before continues correctly;
    a prefill's state (of the chunk kernels: > 16 tokens) is never written."""
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, 2, B=2, T=22, seed=2)
    want = d(**args)
    (key,) = m._impl.module.STATE_KEYS
    assert_steps_in_place(m, to_device(args, torch.float32), want, key)


def test_half_precision_steps(compiled, launches):
    """bf16 inputs: the feature maps round to bf16 as in the chunk kernels."""
    m, d = compiled("linear_attention"), compiled("linear_attention", "dense")
    args = args_of(m, 2, B=2, T=12, seed=3)
    want = d(**args)
    x = to_device(args, torch.bfloat16)
    tokens = set(m.program.inputs)
    _, state = m(**{n: v[:, :8] for n, v in x.items()}, return_state=True)
    for t in range(8, 12):
        y, state = m.step(state, **{n: (v[:, t] if n in tokens else v) for n, v in x.items()})
        assert y.dtype == torch.bfloat16 and rel_err(y.float().cpu(), want[:, t]) < 2e-2, t
