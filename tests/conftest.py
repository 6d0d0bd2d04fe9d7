import os
import sys

# Without a GPU the Triton backend's kernels run in Triton's CPU interpreter,
# which triton.jit picks when a kernel is defined: set before any is.
try:
    import torch as _torch
    _gpu = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _gpu = False
if not _gpu:
    os.environ["TRITON_INTERPRET"] = "1"

import mixerc
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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def to_device(args: dict, dtype) -> dict:
    """Every tensor of `args` on the test device in `dtype`."""
    return {n: x.to(device=DEVICE, dtype=dtype) for n, x in args.items()}


def flat_outputs(y):
    """One tensor of a mixer's outputs (several outs come as a tuple)."""
    return torch.cat([o.flatten() for o in y]) if isinstance(y, tuple) else y


def assert_gradients_equal_dense(m, d, base: dict, wrt=None, tol: float = 1e-4):
    """The gradients of sum(w * outputs) (w random) with respect to `wrt` (every
    name of `base` by default): mixer `m` on float32 copies on the test device
    against the dense mixer `d` in float64. Where dense is zero (or unused),
    m's must be too."""
    wrt = list(base) if wrt is None else list(wrt)
    ref = {n: x.clone().requires_grad_(n in wrt) for n, x in base.items()}
    got = {n: x.clone().float().to(DEVICE).requires_grad_(n in wrt) for n, x in base.items()}
    out = flat_outputs(d(**ref))
    weight = torch.randn(out.shape, dtype=torch.float64)
    want = torch.autograd.grad((out * weight).sum(), [ref[n] for n in wrt], allow_unused=True)
    have = torch.autograd.grad((flat_outputs(m(**got)) * weight.float().to(DEVICE)).sum(),
                               [got[n] for n in wrt], allow_unused=True)
    for n, g, r in zip(wrt, have, want):
        if r is None or float(r.abs().max()) == 0:
            assert g is None or float(g.abs().max()) == 0, n
            continue
        assert g is not None and rel_err(g.cpu(), r) < tol, n


def assert_one_launch_per_step(m, x: dict, want, launches: list, kernel: str, start: int,
                               state, key: str, sizes=(1, 1, 1, 5, 16, 1, 1)):
    """From `state` (after x's first `start` tokens), steps of `sizes` tokens
    (1: m.step; more: a block with initial_state) each exactly one launch of
    `kernel` (`launches`: the launches fixture's record), each equal to
    `want` (dense on all of x), the state float32, contiguous and one buffer
    throughout (updated in place). Returns the last state and the next token."""
    tokens = set(m.program.inputs)
    buffers, t = set(), start
    for size in sizes:
        del launches[:]
        part = {n: (v[:, t:t + size] if n in tokens else v) for n, v in x.items()}
        if size == 1:
            got, state = m.step(state, **{n: (v[:, 0] if n in tokens else v)
                                          for n, v in part.items()})
            ref = want[:, t]
        else:
            got, state = m(**part, initial_state=state, return_state=True)
            ref = want[:, t:t + size]
        assert launches == [kernel], (t, launches)
        assert not got.isnan().any() and rel_err(got.cpu(), ref) < 1e-4, t
        s = state.tensors[key]
        assert s.dtype == torch.float32 and s.is_contiguous()
        buffers.add(s.data_ptr())
        t += size
    assert len(buffers) == 1  # the first step's buffer, updated in place since
    return state, t


def assert_steps_in_place(m, x: dict, want, key: str, at: int = 18):
    """The decode steps' in-place protocol (runtime/triton/recurrent.py
    step_state) on x (float32, on the device) with `want` the dense output:
    a prefill of `at` tokens, then steps at `at` and `at + 1` write one buffer
    (the prefill's state is never written); continuing the older state is
    refused; a clone taken before continues correctly, and so does the
    prefill's state."""
    import mixerc
    tokens = set(m.program.inputs)
    step = lambda t: {n: (v[:, t] if n in tokens else v) for n, v in x.items()}  # noqa: E731
    with torch.no_grad():
        _, prefill = m(**{n: (v[:, :at] if n in tokens else v) for n, v in x.items()},
                       return_state=True)
        first = prefill.tensors[key]
        before = first.clone()
        _, s1 = m.step(prefill, **step(at))
        kept = s1.clone()
        _, s2 = m.step(s1, **step(at + 1))
        assert s2.tensors[key].data_ptr() == s1.tensors[key].data_ptr() != first.data_ptr()
        assert torch.equal(first, before)
        with pytest.raises(mixerc.MixerValueError, match="already continued"):
            m.step(s1, **step(at + 1))
        y, _ = m.step(kept, **step(at + 1))
        assert rel_err(y.cpu(), want[:, at + 1]) < 1e-4
        y, _ = m.step(prefill, **step(at))  # the prefill's state is still intact
        assert rel_err(y.cpu(), want[:, at]) < 1e-4


def assert_prefill_then_decode(m, x: dict, want, first: int, second: int, tol: float = 1e-4):
    """m on tokens [0, first), then [first, second) from that state (a nonzero
    initial state through its kernels), then token by token to the end
    (decode steps): each equal to `want`, the dense output on all of x."""
    tokens = set(m.program.inputs)

    def part(a, b):
        return {n: (v[:, a:b] if n in tokens else v) for n, v in x.items()}
    y1, state = m(**part(0, first), return_state=True)
    y2, state = m(**part(first, second), initial_state=state, return_state=True)
    assert rel_err(torch.cat([y1, y2], 1).cpu(), want[:, :second]) < tol
    for i in range(second, want.shape[1]):
        yt, state = m.step(state, **{n: (v[:, i] if n in tokens else v) for n, v in x.items()})
        assert rel_err(yt.cpu(), want[:, i]) < tol, i


@pytest.fixture
def stdlib():
    return STDLIB


@pytest.fixture(scope="session", autouse=True)
def _temporary_cache(tmp_path_factory):
    """Every test runs against a temporary cache (MIXERC_CACHE_DIR), never the
    user's platform cache dir; subprocesses inherit it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXERC_CACHE_DIR", str(tmp_path_factory.mktemp("session_cache")))
        yield


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A module's own JIT/autotune cache (MIXERC_CACHE_DIR): no tuned config
    from another test or an earlier run leaks in, so the default configs run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXERC_CACHE_DIR", str(tmp_path_factory.mktemp("mixerc_cache")))
        yield


def compile_cache(sources: dict | None = None):
    """get(name, backend="torch"): mixerc.compile once per (name, backend); a
    name in `sources` compiles that source text instead of the stdlib file."""
    cache = {}

    def get(name, backend="torch"):
        if (name, backend) not in cache:
            cache[name, backend] = mixerc.compile((sources or {}).get(name, name),
                                                  backend=backend)
        return cache[name, backend]
    return get


@pytest.fixture(scope="module")
def compiled():
    return compile_cache()


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty filled with NaN (floating dtypes): an output element, a
    cache slot or a split's partial result a kernel should have written but
    did not shows up as NaN in the result."""
    empty = torch.empty

    def nan_empty(*shape, **kw):
        x = empty(*shape, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x
    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def launches(monkeypatch):
    """The name of every Triton kernel launched (fn[grid](...)), in order."""
    from triton.runtime.jit import KernelInterface
    out = []
    real = KernelInterface.__getitem__

    def counted(self, grid):
        launch = real(self, grid)
        return lambda *a, **k: out.append(self.fn.__name__) or launch(*a, **k)
    monkeypatch.setattr(KernelInterface, "__getitem__", counted)
    return out


@pytest.fixture
def bf16_dots(monkeypatch):
    """Triton's interpreter computes bf16 on raw bits; upcast dot operands (a
    GPU's tensor cores take bf16 as it is). Test-only."""
    if not os.environ.get("TRITON_INTERPRET"):
        return
    from mixerc.runtime.triton.interpreter import bf16_dots_patch
    monkeypatch.setattr(*bf16_dots_patch())


def compiled_mixers(**pin):
    """get(src, backend="triton"): each mixer compiled once (a module-scoped
    fixture returns one getter), the Triton ones with the config knobs `pin`
    (e.g. small blocks: several tiles on short inputs)."""
    cache = {}

    def get(src, backend="triton"):
        if (src, backend) not in cache:
            m = mixerc.compile(src, backend=backend)
            if backend == "triton" and pin:
                m._impl.pin_config(**pin)
            cache[src, backend] = m
        return cache[src, backend]
    return get


def run_without_interpreter(script: str, timeout: int):
    """Run `script` in a fresh Python without TRITON_INTERPRET (so its kernels
    compile for a GPU target, no GPU needed) and return the JSON it prints last."""
    import json
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def torch_ops_of(fn) -> list:
    """(op name, [(shape, dtype) of each tensor argument], dtype keyword) of
    every aten op fn() dispatches, in order (a backward's too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.ops.append((func.overloadpacket.__name__,
                             [(tuple(a.shape), a.dtype) for a in args if torch.is_tensor(a)],
                             kwargs.get("dtype")))
            return func(*args, **kwargs)
    with Log() as log:
        fn()
    return log.ops
