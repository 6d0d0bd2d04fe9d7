"""The elementwise math the chunked scalar-decay kernels compute on load
(codegen/triton/prologue.py): feature maps of q and k, the log-decay and the
key scale from per-token inputs and per-head params. The generated forward
must not compute them in torch (a fusion that silently stops fails here),
the kernels' op must receive what the user passed (not its map), and every
path must equal the dense float64 interpreter: forward in float32 and
bfloat16, the gradient of every input and param (the backward recomputes the
maps), prefill then decode, T not a multiple of the chunk and head dims not
a power of two (the map of a padded zero is not zero: elu(0) + 1 = 1),
groups, batch > 1, outputs poisoned. Kernels run in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1)."""

import random
import re

import pytest
import torch
from conftest import (assert_gradients_equal_dense, assert_prefill_then_decode, compiled_mixers,
                      rel_err, to_device)

from mixerc.inputs import random_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64
SMALL = {"chunk": 16, "block_k": 16, "block_v": 16}
SIZES = {"H": 4, "G": 2, "D": 20, "K": 20, "N": 20, "V": 20, "P": 20}


def mapped_program(seed: int) -> str:
    """A random mixer whose q and k go through feature maps and whose decay
    and key scale are maps of a token input and per-head params."""
    rng = random.Random(seed)
    maps = ["elu({x}) + 1", "exp(-softplus({x}))", "sigmoid({x}) * 2", "relu({x}) + 0.5",
            "silu({x}) + 1", "{x}"]
    phi_q, phi_k = (rng.choice(maps) for _ in range(2))
    decay = rng.choice(["", "decay(-exp(p) * softplus(u + b)) * ", "decay(p - 2) * ",
                        "decay(-softplus(u)) * "])
    keys, scale = rng.choice([("H", ""), ("G", "softplus(u + b) * "), ("G", "sigmoid(u) * ")])
    mask = rng.choice(["(s <= t)", "(s < t)"])
    return f"""mixer mapped_{seed} {{
  dims H, G divides H, D, V
  input q : [H, D]
  input k : [{keys}, D]
  input v : [H, V]
  input u : [H]
  param p : [H] = uniform(-1, 1)
  param b : [H] = uniform(-1, 1)
  out y = ({decay}(({phi_q.format(x="q")}) @ ({scale}({phi_k.format(x="k")}))^T) * {mask}) @ v
}}"""


# a constant decay: a map with no leaves at all (the fuzzer's seed 31, case 8)
CONST_DECAY = """mixer const_decay {
  dims H, D, V
  input q : [H, D]
  input k : [H, D]
  input v : [H, V]
  out y = (decay(-0.1) * (k @ q^T) * (s < t)) @ v
}"""
SEEDS = [1, 2, 5, 8]
CASES = ["linear_attention", "ssd", "retnet"] + [mapped_program(s) for s in SEEDS] + [CONST_DECAY]
IDS = ["linear_attention", "ssd", "retnet"] + [f"mapped{s}" for s in SEEDS] + ["const_decay"]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(**SMALL)


def args_of(m, B=2, T=29, seed=1):
    return random_inputs(m.program, SIZES, B, T, seed=seed, dtype=f64)


def forward_source(m) -> str:
    return m.source().split("\ndef forward(")[1].split("\ndef ")[0]


def test_the_random_programs_have_maps(compiled):
    """Every random program is planned with at least one map in its kernels
    (else the tests below would not test them), and explain names them."""
    for src in CASES:
        text = compiled(src).explain()
        assert "computed by the kernels as they load" in text, text


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_generated_forward_computes_no_map(src, compiled):
    """No elementwise math of the mapped operands in the generated forward:
    the kernels are told the maps' leaves (leaves=) and compute them."""
    m = compiled(src)
    forward = forward_source(m)
    call = next(line for line in forward.splitlines() if "chunked_kernels_apply(" in line)
    assert "leaves=[" in call, call
    assert not re.search(r"F\.(elu|softplus|silu)|torch\.(exp|sigmoid|relu)\(", forward), forward
    assert "if MAP:" in m.source()


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_forward_equals_dense(src, compiled, bf16_dots, poisoned):
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m)
    want = d(**args)
    y = m(**to_device(args, torch.float32))
    assert not y.isnan().any() and rel_err(y.cpu(), want) < 1e-4
    y = m(**to_device(args, torch.bfloat16))
    assert y.dtype == torch.bfloat16 and rel_err(y.float().cpu(), want) < 2e-2
    assert rel_err(m(**to_device(args, f64)).cpu(), want) < 1e-9  # the torch chunks


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_the_op_receives_what_the_user_passed(src, compiled, monkeypatch):
    """The kernels' op is called with the inputs as given (q and k before
    their maps) and no log-decay or key-scale tensor where a map computes it."""
    m = compiled(src)
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.startswith("chunked_kernel") and n.endswith("_op"))
    real, seen = getattr(mod, op), []

    def spy(q, k, v, a, key_scale, *rest):
        # (leaves, mapped): a list then a bool (the backward's features, a list
        # of ints, follow them where the kernels map q or k in the backward)
        leaves, mapped = next(rest[i:i + 2] for i in range(len(rest) - 1)
                              if isinstance(rest[i], list) and isinstance(rest[i + 1], bool))
        seen.append((q, k, a, key_scale, mapped))
        return real(q, k, v, a, key_scale, *rest)
    monkeypatch.setattr(mod, op, spy)
    args = to_device(args_of(m, T=40), torch.float32)
    m(**args)
    assert len(seen) == 1 and seen[0][-1] is True
    q, k, a, key_scale, _ = seen[0]
    pro = re.search(r"computed by the kernels as they load[^:]*: (.*)", m.explain())[1]
    roles = dict(part.split(" = ", 1) for part in pro.split("; "))
    names = {"q": ("q", "C"), "k": ("k", "B")}
    for role, x in (("q", q), ("k", k)):
        if role in roles:  # the raw input itself, at its heads
            raw = next(args[n] for n in names[role] if n in args)
            assert torch.equal(x.reshape(raw.shape), raw), role
    assert ("log_decay" in roles) <= (a is None)
    assert ("k_scale" in roles) <= (key_scale is None)


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_gradients_equal_dense(src, compiled, poisoned, monkeypatch):
    """Every input's and param's gradient, through the backward that
    recomputes the maps (MappedChunkedFn: the forward stores none of them)."""
    from mixerc.runtime.triton import chunked
    calls = []
    real = chunked.MappedChunkedFn.forward
    monkeypatch.setattr(chunked.MappedChunkedFn, "forward",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    m, d = compiled(src), compiled(src, "dense")
    base = args_of(m, T=27, seed=2)  # the params too
    assert set(m.program.params) <= set(base)
    assert_gradients_equal_dense(m, d, base)
    assert calls, "the backward did not go through MappedChunkedFn"


@pytest.mark.parametrize("src", CASES[1:2] + CASES[3:5], ids=IDS[1:2] + IDS[3:5])
def test_prefill_then_decode_equal_dense(src, compiled):
    """A prefill, a continuation from its state through the kernels, then
    token-by-token decode steps (the maps in torch) equal dense."""
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, T=40, seed=3)
    want = d(**args)
    assert_prefill_then_decode(m, to_device(args, torch.float32), want, 18, 36)


def test_strong_decay_from_maps_stays_finite(compiled):
    """SSD with log-decays near -5 per step (computed on load from dt and
    A_log) over T = 1024 is finite and equals dense."""
    m, d = compiled("ssd"), compiled("ssd", "dense")
    args = args_of(m, B=1, T=1024, seed=4)
    args["dt"] = torch.full_like(args["dt"], 3.0)
    args["dt_bias"] = torch.zeros_like(args["dt_bias"])
    args["A_log"] = torch.full_like(args["A_log"], 0.5)  # -exp(0.5) * softplus(3) ~ -5
    want = d(**args)
    y = m(**to_device(args, torch.float32))
    assert torch.isfinite(y).all() and rel_err(y.cpu(), want) < 1e-4
