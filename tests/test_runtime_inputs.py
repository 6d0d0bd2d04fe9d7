"""Edge cases of run-time input on both backends: no tokens, an empty batch,
empty packed sequences, states fed to the wrong mixer, the meta device."""

import subprocess
import sys
import textwrap

import mixerc
import pytest
import torch
from click.testing import CliRunner
from conftest import CAUSAL, STDLIB, rel_err
from mixerc.cli import main
from mixerc.runtime.state import MixerState
from reference import make_inputs

BACKENDS = ["dense", "torch"]


def tokens(m, args, a, b):
    return {k: (v[:, a:b] if k in m.program.inputs else v) for k, v in args.items()}


def token_at(m, args, t):
    return {k: (v[:, t] if k in m.program.inputs else v) for k, v in args.items()}


def out_dims(m, args):
    """Each output's dim sizes, from a call on a few tokens."""
    y = m(**tokens(m, args, 0, 2))
    return [tuple(o.shape[2:]) for o in (y if isinstance(y, tuple) else (y,))]


def outputs(y):
    return y if isinstance(y, tuple) else (y,)


# ---------------------------------------------------------------- no tokens, no batch

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", STDLIB)
def test_no_tokens_give_empty_outputs(name, backend, compiled):
    m = compiled(name, backend)
    args = make_inputs(name, B=2, T=6, seed=1)
    dims = out_dims(m, args)
    empty = tokens(m, args, 0, 0)
    for y, d in zip(outputs(m(**empty)), dims):
        assert y.shape == (2, 0) + d and y.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CAUSAL)
def test_no_tokens_keep_the_state_and_decoding_goes_on(name, backend, compiled):
    m = compiled(name, backend)
    args = make_inputs(name, B=2, T=6, seed=2)
    empty = tokens(m, args, 0, 0)
    full = m(**args)
    # from the start: an empty call returns the start state, which continues like None
    y, start = m(**empty, return_state=True)
    assert y.shape[:2] == (2, 0) and start.length == 0
    y, st = m(**tokens(m, args, 0, 4), initial_state=start, return_state=True)
    assert rel_err(y, full[:, :4]) < 1e-12
    # mid-sequence: the state passes through unchanged
    y, same = m(**empty, initial_state=st, return_state=True)
    assert y.shape[:2] == (2, 0) and same.length == st.length == 4
    y4, st = m.step(same, **token_at(m, args, 4))
    assert rel_err(y4, full[:, 4]) < 1e-10
    y5, _ = m(**tokens(m, args, 5, 6), initial_state=st, return_state=True)
    assert rel_err(y5, full[:, 5:6]) < 1e-10
    # a first step from an empty start state
    y0, _ = m.step(start, **token_at(m, args, 0))
    assert rel_err(y0, full[:, 0]) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", STDLIB)
def test_an_empty_batch_gives_empty_outputs_and_states(name, backend, compiled):
    m = compiled(name, backend)
    args = make_inputs(name, B=2, T=6, seed=3)
    dims = out_dims(m, args)
    for T in (5, 0):
        none = {k: (v[:0, :T] if k in m.program.inputs else v) for k, v in args.items()}
        for y, d in zip(outputs(m(**none)), dims):
            assert y.shape == (0, T) + d
        if name in CAUSAL:
            y, st = m(**none, return_state=True)
            assert st.length == T
            y, st = m(**none, initial_state=st, return_state=True)
            assert st.length == 2 * T
            yt, st = m.step(st, **{k: v[:0, 0] if k in m.program.inputs else v
                                   for k, v in args.items()})
            assert yt.shape == (0,) + dims[0] and st.length == 2 * T + 1


# ---------------------------------------------------------------- packed sequences

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["retnet", "attention", "gated_conv", "mamba", "hydra"])
@pytest.mark.parametrize("offsets", [[0, 0, 10], [0, 4, 4, 10], [0, 10, 10], [0, 0]])
def test_empty_packed_sequences_match_running_each_alone(name, backend, offsets, compiled):
    m = compiled(name, backend)
    total = offsets[-1]
    args = make_inputs(name, B=1, T=total, seed=4)
    cu = torch.tensor(offsets, dtype=torch.int32)
    spans = list(zip(offsets, offsets[1:]))
    y = m(**args, cu_seqlens=cu)
    alone = [m(**tokens(m, args, a, b)) for a, b in spans]
    assert y.shape == torch.cat(alone, 1).shape
    if total:
        assert rel_err(y, torch.cat(alone, 1)) < 1e-12
    if name not in CAUSAL:
        return
    _, states = m(**args, cu_seqlens=cu, return_state=True)
    assert [s.length for s in states] == [b - a for a, b in spans]
    # again, continuing each sequence from its state: an empty one keeps it
    y2, states2 = m(**args, cu_seqlens=cu, initial_state=states, return_state=True)
    for (a, b), st, st2 in zip(spans, states, states2):
        assert st2.length == 2 * (b - a)
        want, _ = m(**tokens(m, args, a, b), initial_state=st, return_state=True)
        assert rel_err(y2[:, a:b], want) < 1e-12 if b > a else y2[:, a:b].numel() == 0


# ---------------------------------------------------------------- whose state

PAIRS = [("retnet", "gla"), ("gla", "retnet"), ("mamba", "ssd"), ("ssd", "mamba")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("maker,user", PAIRS)
def test_a_state_of_another_mixer_is_refused_in_call_and_step(maker, user, backend, compiled):
    a, b = compiled(maker, backend), compiled(user, backend)
    _, st = a(**make_inputs(maker, B=2, T=5, seed=5), return_state=True)
    args = make_inputs(user, B=2, T=5, seed=6)
    with pytest.raises(mixerc.MixerValueError, match=f"does not belong to {user}.*{maker}"):
        b(**args, initial_state=st)
    with pytest.raises(mixerc.MixerValueError, match=f"state does not belong to {user}"):
        b.step(st, **token_at(b, args, 0))


@pytest.mark.parametrize("name", ["retnet", "mamba"])
def test_a_state_of_the_other_backend_is_refused(name, compiled):
    args = make_inputs(name, B=2, T=5, seed=7)
    for made, used in (("dense", "torch"), ("torch", "dense")):
        _, st = compiled(name, made)(**args, return_state=True)
        with pytest.raises(mixerc.MixerValueError, match=f"its {made} backend"):
            compiled(name, used)(**args, initial_state=st)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_made_at_other_dims_or_batch_is_refused(backend):
    src = open("examples/retnet.mx").read()
    m = mixerc.compile(src, backend=backend)
    args = make_inputs("retnet", B=2, T=5, seed=8)
    _, st = m(**args, return_state=True)
    wider = {k: (torch.cat([v, v], -1) if k in ("q", "k") else v) for k, v in args.items()}
    with pytest.raises(mixerc.MixerValueError, match="other dim sizes: K = 6 .now 12."):
        m(**wider, initial_state=st)
    with pytest.raises(mixerc.MixerValueError, match="batch 2"):
        m(**{k: (v[:1] if v.dim() > 1 else v) for k, v in args.items()}, initial_state=st)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_and_foreign_states_are_refused(backend, compiled):
    m = compiled("retnet", backend)
    args = make_inputs("retnet", B=2, T=5, seed=9)
    _, st = m(**args, return_state=True)
    for bad, message in ((MixerState(dict(st.tensors), st.length), "which mixer made it"),
                         ({"y": torch.zeros(2)}, "must be the MixerState"),
                         (MixerState({}, 0, st.owner[:2] + ("other",), st.sizes), "other")):
        with pytest.raises(mixerc.MixerValueError, match=message):
            m(**args, initial_state=bad)
    if backend == "dense":  # the dense backend checks what the history holds, too
        short = MixerState({k: v[:, :2] for k, v in st.tensors.items()}, st.length, st.owner,
                           st.sizes)
        with pytest.raises(mixerc.MixerValueError, match="has shape"):
            m(**args, initial_state=short)


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_survive_torch_save_and_keep_their_owner(backend, compiled, tmp_path):
    m = compiled("gla", backend)
    args = make_inputs("gla", B=2, T=8, seed=10)
    _, st = m(**tokens(m, args, 0, 5), return_state=True)
    torch.save(st, tmp_path / "state.pt")
    back = torch.load(tmp_path / "state.pt", weights_only=False)
    assert back.owner == st.owner and back.sizes == st.sizes
    y, _ = m(**tokens(m, args, 5, 8), initial_state=back, return_state=True)
    assert rel_err(y, m(**args)[:, 5:]) < 1e-10
    with pytest.raises(mixerc.MixerValueError, match="does not belong to retnet"):
        compiled("retnet", backend)(**make_inputs("retnet", B=2, T=3), initial_state=back)


STANDALONE = textwrap.dedent("""
    import sys
    sys.modules["mixerc"] = None          # standalone: no mixerc at run time
    sys.path.insert(0, sys.argv[1])
    import torch
    import mixer_retnet, mixer_gla
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    args = dict(q=r(2, 6, 2, 3), k=r(2, 6, 2, 3), v=r(2, 6, 2, 4))
    y0, st0 = mixer_retnet.mixer(**{k: v[:, :0] for k, v in args.items()},
                                 log_gamma=-torch.ones(2), return_state=True)
    assert y0.shape == (2, 0, 2, 4) and st0.length == 0
    _, st = mixer_retnet.mixer(**args, log_gamma=-torch.ones(2), return_state=True,
                               initial_state=st0)
    try:
        mixer_gla.mixer(**args, g=-torch.ones(2, 6, 2, 3), initial_state=st)
    except ValueError as e:
        assert "does not belong to gla" in str(e), e
    else:
        raise SystemExit("a retnet state was accepted by gla")
    print("ok")
""")


def test_standalone_modules_check_states_and_take_no_tokens(tmp_path):
    for name in ("retnet", "gla"):
        r = CliRunner().invoke(main, ["compile", name, "-o", str(tmp_path / f"mixer_{name}.py")])
        assert r.exit_code == 0, r.output
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# ---------------------------------------------------------------- meta device

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", STDLIB)
def test_meta_tensors_propagate_shapes(name, backend, compiled):
    m = compiled(name, backend)
    args = make_inputs(name, B=2, T=7, seed=11)
    ref = outputs(m(**args))
    meta = {k: v.to("meta") for k, v in args.items()}
    for y, want in zip(outputs(m(**meta)), ref):
        assert y.device.type == "meta" and y.shape == want.shape and y.dtype == want.dtype
    if name in CAUSAL:
        _, st = m(**meta, return_state=True)
        yt, st = m.step(st, **token_at(m, meta, 0))
        assert yt.device.type == "meta" and yt.shape == ref[0][:, 0].shape and st.length == 8


def test_materialize_refuses_meta_naming_the_tensor(compiled):
    m = compiled("retnet", "dense")
    args = {k: v.to("meta") for k, v in make_inputs("retnet", B=1, T=4).items()}
    with pytest.raises(mixerc.MixerValueError, match="q is on the meta device"):
        m.materialize(**args)
