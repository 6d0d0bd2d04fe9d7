"""The Triton backend's per-channel decay kernels (GLA, Mamba-1, H3's modal
kernel: a log-decay per token and channel inside the contraction) against
the dense interpreter: forward without gradients in float32 (< 1e-4),
float16 and bfloat16 (< 2e-2; bf16 through the test-only dot patch), T not a
multiple of the chunk, batch > 1, K and V not powers of 2, strict masks,
strong decays over long inputs, initial and final states, decode steps
after a prefill; outputs poisoned before the kernels write (gradients:
tests/test_triton_per_channel_grad.py). Static fitness: the forward and
backward kernels and the runtime's (decode step, chunk-local cumsum:
tests/test_triton_chunk_cumsum.py) compile for sm_90a and sm_80 at their
default config with no spills (in a subprocess without TRITON_INTERPRET), for
bf16 and, at the config float32's launches take (chunks of 32, the state
kernels over K blocks of 32: forward and backward checked here against the
dense interpreter), float32."""

import textwrap

import pytest
import torch
from conftest import compiled_mixers, rel_err, run_without_interpreter
from reference import make_inputs

import mixerc

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64

STRICT_GLA = """
mixer gla_strict {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  input f : [H, K]
  out y = (decay(log(sigmoid(f))) * (q @ k^T) * (s < t)) @ v
}
"""


@pytest.fixture(scope="module")
def compiled():
    # these small shapes would scan (tests/test_triton_scan.py has the scan)
    return compiled_mixers(algorithm="chunks")


def kernel_calls(m, monkeypatch):
    """Records, per call of the term, whether the Triton kernels ran."""
    mod = m._impl.module
    original = mod.per_channel_kernels
    calls = []

    def spy(*tensors):
        calls.append(original(*tensors))
        return calls[-1]
    monkeypatch.setattr(mod, "per_channel_kernels", spy)
    return calls


def on_device(args, dtype=None):
    """Token inputs ([B, T, ...]) in dtype (float32 by default), params in float32
    (inputs of different dtypes are promoted to a common one)."""
    return {n: x.to(device=DEVICE, dtype=dtype if (dtype is not None and x.dim() >= 3) else
                    torch.float32) for n, x in args.items()}


def strict_inputs(B, T, H=2, K=20, V=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), f=r(B, T, H, K) + 2)


def test_explain_and_source_say_where_it_runs(compiled):
    m = compiled("gla")
    text = m.explain()
    assert "runs on: Triton kernels (forward: a scan of the state in registers, or chunks" in text
    assert "or the chunks' adjoint state back over the chunks" in text
    assert "the torch backend for float64" in text
    src = m.source()
    assert "def per_channel_fwd(" in src and "def per_channel_fwd_intra(" in src
    for kernel in ("bwd_states", "bwd_dv", "bwd_dqk"):
        assert f"def per_channel_{kernel}(" in src
    assert "per_channel_apply(" in src and "chunked_has_decay_per_channel(" in src


@pytest.mark.parametrize("name,T,dtype,tol", [
    ("gla", 100, torch.float32, 1e-4), ("gla", 77, torch.float16, 2e-2),
    ("mamba", 70, torch.float32, 1e-4), ("h3", 40, torch.float32, 1e-4)])
def test_forward_equals_dense(compiled, monkeypatch, poisoned, name, T, dtype, tol):
    m = compiled(name)
    calls = kernel_calls(m, monkeypatch)
    args = make_inputs(name, B=2, T=T, seed=1)
    want = compiled(name, "dense")(**args)
    with torch.no_grad():
        y = m(**on_device(args, dtype))
    assert calls == [True] and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), want) < tol


def test_bf16_dots(compiled, monkeypatch, bf16_dots):
    m = compiled("gla")
    calls = kernel_calls(m, monkeypatch)
    args = make_inputs("gla", B=1, T=50, seed=2)
    want = compiled("gla", "dense")(**args)
    with torch.no_grad():
        y = m(**on_device(args, torch.bfloat16))
    assert calls == [True]
    assert rel_err(y.float().cpu(), want) < 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_strict_mask_odd_dims(compiled, monkeypatch, poisoned, dtype, tol):
    m = compiled(STRICT_GLA)
    assert m._impl.plan.matrices[0].terms[0].flags["strict"]
    calls = kernel_calls(m, monkeypatch)
    args = strict_inputs(B=3, T=45)
    want = compiled(STRICT_GLA, "dense")(**args)
    with torch.no_grad():
        y = m(**on_device(args, dtype))
    assert calls == [True]
    assert rel_err(y.cpu(), want) < tol


@pytest.mark.parametrize("dtype,chunk,tol", [(torch.float32, 64, 1e-4),
                                              (torch.float16, 32, 2e-2)])
def test_strong_decays_stay_finite(compiled, monkeypatch, dtype, chunk, tol):
    """log-decay -5 per step over T = 512: every exponent the kernels take is
    <= 0 (the sub-chunks' dots rebased on their own start: from the chunk's
    start, exp(5 * 48) overflows float32, exp(5 * 16) float16)."""
    m = mixerc.compile("gla", backend="triton")
    m._impl.pin_config(tri_chunk=chunk, algorithm="chunks")
    calls = kernel_calls(m, monkeypatch)
    args = make_inputs("gla", B=1, T=512, seed=3)
    args["g"] = torch.full_like(args["g"], -5.0)
    args["g"][:, ::7] = -0.01  # some slow steps too: decays spanning whole chunks
    want = compiled("gla", "dense")(**args)
    with torch.no_grad():
        y, state = m(**on_device(args, dtype), return_state=True)
    assert calls == [True]
    assert torch.isfinite(y).all() and torch.isfinite(state.tensors["y"]).all()
    assert rel_err(y.cpu(), want) < tol


def test_prefill_state_and_initial_state(compiled, monkeypatch, poisoned):
    m, ref = compiled("gla"), compiled("gla", "torch")
    calls = kernel_calls(m, monkeypatch)
    args = make_inputs("gla", B=2, T=90, seed=4)
    head = {n: x[:, :50] for n, x in args.items()}
    tail = {n: x[:, 50:] for n, x in args.items()}
    want = compiled("gla", "dense")(**args)
    _, s_ref = ref(**head, return_state=True)  # the torch backend in float64
    with torch.no_grad():
        y1, s1 = m(**on_device(head), return_state=True)
        y2, s2 = m(**on_device(tail), initial_state=s1, return_state=True)
    assert calls == [True, True]
    assert rel_err(s1.tensors["y"].cpu(), s_ref.tensors["y"]) < 1e-5
    _, s_all = ref(**args, return_state=True)
    assert rel_err(s2.tensors["y"].cpu(), s_all.tensors["y"]) < 1e-5
    assert rel_err(torch.cat([y1, y2], 1).cpu(), want) < 1e-4


@pytest.mark.parametrize("name", ["gla", "mamba"])
def test_decode_steps_after_prefill(compiled, monkeypatch, poisoned, name):
    m = compiled(name)
    calls = kernel_calls(m, monkeypatch)
    T0, steps = 40, 3
    args = make_inputs(name, B=2, T=T0 + steps, seed=5)
    want = compiled(name, "dense")(**args)
    dev = on_device(args)
    tokens = [n for n, x in args.items() if x.dim() >= 2 and x.shape[:2] == (2, T0 + steps)]
    with torch.no_grad():
        y0, state = m(**{n: (x[:, :T0] if n in tokens else x) for n, x in dev.items()},
                      return_state=True)
        ys, buffers = [y0], []
        for t in range(T0, T0 + steps):
            y_t, state = m.step(state, **{n: (x[:, t] if n in tokens else x)
                                          for n, x in dev.items()})
            ys.append(y_t[:, None])
            buffers.append(state.tensors["M" if name == "mamba" else "y"].data_ptr())
    assert calls == [True] * (1 + steps)
    # the decode step kernel: a fresh buffer after the prefill's, then in place
    assert len(set(buffers)) == 1
    assert rel_err(torch.cat(ys, 1).cpu(), want) < 1e-4


def test_varlen_equals_dense_per_sequence(compiled, monkeypatch):
    """Packed sequences (cu_seqlens): one kernel call per sequence, long and short
    (a decode-sized sequence takes the recurrence kernel)."""
    m, d = compiled("gla"), compiled("gla", "dense")
    calls = kernel_calls(m, monkeypatch)
    args = make_inputs("gla", B=1, T=60, seed=8)
    offsets = [0, 5, 41, 60]
    with torch.no_grad():
        y = m(**on_device(args),
              cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=DEVICE))
    assert calls and all(calls)
    for a, b in zip(offsets, offsets[1:]):
        want = d(**{n: x[:, a:b] for n, x in args.items()})
        assert rel_err(y[:, a:b].cpu(), want) < 1e-4


def test_float64_runs_the_torch_backend(compiled, monkeypatch):
    m = compiled("gla")
    calls = kernel_calls(m, monkeypatch)
    args = make_inputs("gla", B=1, T=40, seed=7)
    with torch.no_grad():
        y = m(**{n: x.to(DEVICE) for n, x in args.items()})
    assert calls == [False]
    assert rel_err(y.cpu(), compiled("gla", "dense")(**args)) < 1e-10


FITNESS = textwrap.dedent("""
    import json
    import mixerc
    from mixerc.codegen.triton import fitness
    m = mixerc.compile("gla", backend="triton")
    out = []
    for target in ("sm_90a", "sm_80"):
        for f in fitness.check(m._impl, {"H": 16, "K": 128, "V": 128}, target):
            out.append(dict(target=target, kernel=f.kernel, regs=f.registers,
                            spill=f.spill_bytes, shared=f.shared, limit=f.shared_limit,
                            mma=f.mma, hmma=f.hmma, error=f.error))
    print(json.dumps(out))
""")


def test_kernels_fit_sm90a_and_sm80():
    fits = run_without_interpreter(FITNESS, timeout=600)
    assert sorted(f["kernel"] for f in fits) == sorted(
        ["per_channel_fwd", "per_channel_fwd_intra", "per_channel_bwd_states",
         "per_channel_bwd_dv", "per_channel_bwd_dqk", "_mx_recurrent_step",
         "_mx_chunk_cumsum", "per_channel_scan_fwd", "per_channel_scan_bwd"] * 2)
    for f in fits:
        where = f"{f['target']} {f['kernel']}"
        assert not f["error"], where + ": " + f["error"]
        assert f["spill"] == 0 and f["shared"] <= f["limit"], where
        if f["kernel"] == "_mx_chunk_cumsum":  # memory-bound: few registers, many programs
            assert f["regs"] <= 64, where
        if f["kernel"] in ("_mx_recurrent_step", "_mx_chunk_cumsum", "per_channel_scan_fwd",
                           "per_channel_scan_bwd"):  # vector math, no dots
            continue
        assert f["shared"] > 0, where
        assert f["mma"] + f["hmma"] > 0, where  # the dots run on tensor cores
        if f["target"] == "sm_90a":  # chunks of 64 rows: warpgroup MMA (wgmma), backward too
            assert f["mma"] > 0, where
        assert f["regs"] <= 255, where


# the chunk kernels at K = V = 128 (bf16) at configs of the tuner's space that
# spilled before their launches capped them (runtime/triton/per_channel.py:
# block_v 64 and 128 -> 32, 4 warps -> 8 for the state tiles, 4 warps for dq/dk
# at chunks of 32, at most 2 stages for bwd_dv), and chunks of 32 (sub-chunks
# of 32 with them), 1 stage
FITNESS_CONFIGS = textwrap.dedent("""
    import json
    import mixerc
    from mixerc.codegen.triton import fitness
    r = mixerc.compile("gla", backend="triton")._impl
    mod = r.module
    key, D, DV = r.kernel_shapes({"H": 16, "K": 128, "V": 128})["per_channel"]
    base = {k: mod.DEFAULT_CONFIG[key + "." + k] for k in mod.per_channel_compile_meta.knobs}
    changes = [{"block_v": 64}, {"block_v": 128, "num_warps": 4}, {"num_warps": 4},
               {"num_stages": 3}, {"tri_chunk": 32, "tri_sub": 32}, {"num_stages": 1}]
    out = []
    for function, name, kernel in fitness.kernels_of(mod):
        if function != "per_channel":
            continue
        meta = getattr(mod, name + "_compile_meta", None) or mod.per_channel_compile_meta
        for target in ("sm_90a", "sm_80"):
            for change in changes:
                cfg = dict(base, **change)
                assert all(v in mod.CONFIG_SPACE[key + "." + k] for k, v in cfg.items())
                f = fitness._fit(kernel, function, name, cfg, target, "bf16", False,
                                 lambda: meta(D, DV, cfg, "bf16"))
                out.append(dict(target=target, kernel=name, cfg=change, regs=f.registers,
                                spill=f.spill_bytes, shared=f.shared, limit=f.shared_limit,
                                error=f.error))
    print(json.dumps(out))
""")


def test_configs_that_spilled_at_k128_fit():
    """The configs of the tuner's space that spilled at K = V = 128 (bf16,
    triton 3.9: block_v 64 and 128 by up to 7 KB, 4 warps by up to 296 B,
    3 stages in bwd_dv and chunks of 32 in dq/dk by 8 B) compile for sm_90a and
    sm_80 with no spills, every chunk kernel; the backward's dq/dk channels
    are 16 only (32 and 64 spilled on sm_80)."""
    fits = run_without_interpreter(FITNESS_CONFIGS, timeout=900)
    assert sorted({f["kernel"] for f in fits}) == sorted(
        ["per_channel_fwd", "per_channel_fwd_intra", "per_channel_bwd_states",
         "per_channel_bwd_dv", "per_channel_bwd_dqk"])
    assert len(fits) == 5 * 2 * 6
    for f in fits:
        where = f"{f['target']} {f['kernel']} {f['cfg']} {f['regs']} {f['error']}"
        assert not f["error"] and f["spill"] == 0 and f["shared"] <= f["limit"], where


def test_float32_state_kernels_over_k_blocks(compiled, monkeypatch, poisoned):
    """float32 inputs (the dots in IEEE float32) launch chunks of at most 32
    steps (the default's 64 capped) and the state kernels over K blocks of
    32 channels, their partial y and dv summed after them
    (runtime/triton/per_channel.py FP32_CHUNK, FP32_BLOCK): forward and
    backward against the dense interpreter in float64 (< 1e-4) at K = 40 (two
    K blocks, the second partial), V = 36 (two value blocks), T = 75 (not a
    multiple of the chunk) in two calls (the second from the first's state:
    the initial state's gradient), batch 2. The compile meta the fitness
    table compiles float32 at is the one these launches take."""
    m = compiled("gla")
    mod = m._impl.module
    calls = []
    original = mod.per_channel_op

    def spy(*args):
        calls.append(args[5:])  # chunk, sub, block_v, num_warps, num_stages, bwd_block_k
        return original(*args)
    monkeypatch.setattr(mod, "per_channel_op", spy)
    g = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    B, T, H, K, V, T0 = 2, 75, 2, 40, 36, 29
    args = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
                g=torch.nn.functional.logsigmoid(r(B, T, H, K) + 2))
    w = torch.randn(B, T, H, V, generator=g, dtype=f64)
    leaves = {n: x.to(DEVICE, torch.float32).requires_grad_(True) for n, x in args.items()}
    y1, s1 = m(**{n: x[:, :T0] for n, x in leaves.items()}, return_state=True)
    y2 = m(**{n: x[:, T0:] for n, x in leaves.items()}, initial_state=s1)
    y = torch.cat([y1, y2], 1)
    (y * w.to(y)).sum().backward()
    ref = {n: x.clone().requires_grad_(True) for n, x in args.items()}
    y_ref = compiled("gla", "dense")(**ref)
    (y_ref * w).sum().backward()
    assert [c[0] for c in calls] == [32, 32]  # the default's chunks of 64, capped
    assert rel_err(y.detach().cpu(), y_ref) < 1e-4
    for n in args:
        assert rel_err(leaves[n].grad.cpu(), ref[n].grad) < 1e-4, n
    # the launches' blocks (per_channel_meta) and warps are the compile meta's for fp32
    key, D, DV = m._impl.kernel_shapes({"H": H, "K": K, "V": V})["per_channel"]
    cfg = {k: mod.DEFAULT_CONFIG[key + "." + k] for k in mod.per_channel_compile_meta.knobs}
    constexprs, warps, _ = mod.per_channel_compile_meta(D, DV, cfg, "fp32")
    meta = mod.per_channel_meta(leaves["q"], leaves["v"], calls[0][0], cfg["tri_sub"],
                                cfg["block_v"])
    assert meta["BLOCK_K"] == constexprs["BLOCK_K"] == 32 and constexprs["SPLIT_K"]
    assert meta["BLOCK_T"] == constexprs["BLOCK_T"] == 32
    assert meta["BLOCK_V"] == constexprs["BLOCK_V"] == 32
    assert warps == mod.per_channel_warps(cfg["num_warps"], meta["BLOCK_K"], meta["BLOCK_V"],
                                          meta["FP32"]) == 8


# float32 inputs at K = V = 128 and 64: the launched config (the default, its
# chunks and state blocks capped for float32: per_channel_apply, per_channel_meta)
FITNESS_FP32 = textwrap.dedent("""
    import json
    import mixerc
    from mixerc.codegen.triton import fitness
    m = mixerc.compile("gla", backend="triton")
    out = []
    for K in (128, 64):
        for target in ("sm_90a", "sm_80"):
            for f in fitness.check(m._impl, {"H": 16, "K": K, "V": K}, target,
                                   mm_dtype="fp32"):
                out.append(dict(K=K, target=target, kernel=f.kernel, regs=f.registers,
                                spill=f.spill_bytes, shared=f.shared, limit=f.shared_limit,
                                error=f.error))
    print(json.dumps(out))
""")


def test_float32_kernels_fit_sm90a_and_sm80():
    """float32 inputs (IEEE float32 dots: FMAs) at the config their launch
    takes compile with no spills for sm_90a and sm_80 at K = V = 128 and 64,
    every kernel (before chunks of 32 and K blocks of 32 for the state
    kernels, K = 128: the forward spilled 5224 / 6040 B, bwd_dv 5184 / 5680 B,
    bwd_states 0 / 4432 B)."""
    fits = run_without_interpreter(FITNESS_FP32, timeout=900)
    assert len({f["kernel"] for f in fits}) == 9 and len(fits) == 9 * 2 * 2
    for f in fits:
        where = f"K={f['K']} {f['target']} {f['kernel']} {f['regs']} {f['error']}"
        assert not f["error"] and f["spill"] == 0 and f["shared"] <= f["limit"], where
        assert f["regs"] <= 255, where
