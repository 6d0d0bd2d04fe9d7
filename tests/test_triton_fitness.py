"""GPU fitness without a GPU: every Triton kernel of the standard library's
softmax mixers (forward, backward, decode step) and the chunked kernels of its
scalar-decay ones (as the forward and the backward's runs launch them)
compile for sm_90a and sm_80 at the default config (bf16,
D = 128 / K = V = 64) with no spills, within the architecture's shared memory,
on matrix instructions
(HGMMA on sm_90a, HMMA on sm_80); the tuner's screen drops a config that
spills before benchmarking it. The compiles run in a subprocess without
TRITON_INTERPRET (conftest sets it for the interpreter tests)."""

import textwrap

import pytest
from conftest import run_without_interpreter

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import json, sys
    import mixerc
    from mixerc.codegen.triton import fitness
    from mixerc.codegen.triton import tuning
    out = {"fits": [], "screen": {}}
    for name in ("attention", "sliding_window"):
        m = mixerc.compile(name, backend="triton")
        for D in (128,):
            sizes = {"H": 16, "G": 8, "D": D}
            for target in ("sm_90a", "sm_80"):
                for f in fitness.check(m._impl, sizes, target):
                    out["fits"].append(dict(mixer=name, D=D, target=target, kernel=f.kernel,
                                            regs=f.registers, spill=f.spill_bytes,
                                            shared=f.shared, limit=f.shared_limit,
                                            mma=f.mma, hmma=f.hmma, error=f.error))
    # the chunked scalar-decay kernels at K = V = 64 (N = P = 64 for SSD)
    out["chunked"] = []
    # and a normalizer beside a decay and a key scale (their default config: 8 warps)
    normalized = '''mixer normalized {
      dims H, G divides H, K, V
      input q : [H, K]
      input k : [G, K]
      input v : [H, V]
      input u : [H]
      let M = decay(-softplus(u)) * ((elu(q) + 1) @ (sigmoid(u) * (elu(k) + 1))^T) * (s <= t)
      out y = (M @ v) / (M @ 1)
    }'''
    for name in ("linear_attention", "retnet", "ssd", normalized):
        m = mixerc.compile(name, backend="triton")
        sizes = {"H": 16, "G": 4, "K": 64, "V": 64, "N": 64, "P": 64}
        for target in ("sm_90a", "sm_80"):
            for f in fitness.check(m._impl, sizes, target):
                out["chunked"].append(dict(mixer=name[:20], target=target, kernel=f.kernel,
                                           run=f.run, regs=f.registers, spill=f.spill_bytes,
                                           shared=f.shared, limit=f.shared_limit,
                                           mma=f.mma, error=f.error))
    # the tuner's screen: a forward block of 128 x 128 on 4 warps spills at D = 128
    m = mixerc.compile("attention", backend="triton")
    tuning.target_of = lambda device: "sm_90a"
    import torch
    problem = m._impl.tuning_problem({"H": 16, "G": 8, "D": 128}, 1, 4096, torch.bfloat16)
    spilling = dict(m._impl.config, **{"y.block_q": 128, "y.block_k": 128, "y.num_warps": 4})
    out["screen"] = {"default": problem.screen(dict(m._impl.config)),
                     "spilling": problem.screen(spilling)}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def report():
    return run_without_interpreter(SCRIPT, timeout=900)


def test_every_kernel_fits_sm90a_and_sm80(report):
    fits = report["fits"]
    # mixers x targets x (fwd, dq, dkv, decode, the runtime's split combine), D = 128
    assert len(fits) == 2 * 2 * 5
    for f in fits:
        where = f"{f['mixer']} D={f['D']} {f['target']} {f['kernel']}"
        assert not f["error"], where + ": " + f["error"]
        assert f["spill"] == 0 and f["shared"] <= f["limit"], where
        if f["kernel"] == "_mx_combine":  # elementwise over the splits: no dots
            continue
        assert f["shared"] > 0, where
        if f["kernel"].endswith("_decode_kernel"):  # 16-row tiles: warp-level HMMA
            assert f["mma"] + f["hmma"] > 0, where
        else:
            assert f["mma"] > 0, where  # the dots run on tensor cores (HGMMA on sm_90a)
        assert f["regs"] <= 255, where


def test_chunked_kernels_fit_sm90a_and_sm80(report):
    """The chunked scalar-decay kernels (states and output, as the forward
    and as the backward's dq, dk and dv runs launch them, the backward's
    log-decay gradient; linear attention without a decay and its normalizer
    fused, RetNet and SSD with one, SSD with grouped q and k and its key
    scale fused) at their default config: no spills, shared memory within
    the limit, the dots on tensor cores."""
    fits = report["chunked"]
    # mixers x targets x (states, output: the forward's and three runs', decode
    # step), and the backward's decay gradient kernel of the three with a decay
    assert len(fits) == 4 * 2 * (2 * 4 + 1) + 3 * 2
    runs = {(f["mixer"], f["target"], f["kernel"]): set() for f in fits}
    for f in fits:
        runs[f["mixer"], f["target"], f["kernel"]].add(f["run"])
    for (_, _, kernel), seen in runs.items():
        assert seen == ({"", "dq", "dk", "dv"} if kernel.endswith(("_states", "_fwd"))
                        else {""}), (kernel, seen)
    # linear attention's normalizer, SSD's key scale and skip term computed in
    # the kernels, and the maps before them (feature maps, decays, scales: MAP)
    assert {f["kernel"] for f in fits} == {
        "chunked_kernel_maps_ones_states", "chunked_kernel_maps_ones_fwd",
        "chunked_kernel_has_decay_maps_states", "chunked_kernel_has_decay_maps_fwd",
        "chunked_kernel_has_decay_key_scale_maps_skip_states",
        "chunked_kernel_has_decay_key_scale_maps_skip_fwd",
        "chunked_kernel_has_decay_key_scale_maps_ones_states",
        "chunked_kernel_has_decay_key_scale_maps_ones_fwd",
        # the decode step: one kernel per mixer, its maps, scale, normalizer and skip fused
        "chunked_kernel_maps_ones_decode_kernel", "chunked_kernel_has_decay_maps_decode_kernel",
        "chunked_kernel_has_decay_key_scale_maps_skip_decode_kernel",
        "chunked_kernel_has_decay_key_scale_maps_ones_decode_kernel", "_mx_decay_grad"}
    for f in fits:
        where = f"{f['mixer']} {f['target']} {f['kernel']} [{f['run']}]"
        assert not f["error"], where + ": " + f["error"]
        assert f["spill"] == 0 and f["shared"] <= f["limit"], where
        assert f["regs"] <= 255, where
        if f["kernel"].endswith("_decode_kernel"):  # memory-bound vector math: no dots
            continue
        assert f["shared"] > 0, where
        assert f["mma"] > 0, where
        assert f["regs"] <= 255, where


def test_the_tuner_screen_drops_spilling_configs(report):
    assert report["screen"]["default"] is None
    why = report["screen"]["spilling"]
    assert why is not None and "spills" in why and "sm_90a" in why
