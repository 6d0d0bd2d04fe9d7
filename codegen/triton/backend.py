"""The Triton backend: the torch backend's runner over a module whose
softmax terms are Triton kernels (codegen/triton/module.py); every other
term runs on the torch backend until its kernels exist (explain says which,
per term). Kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1
(Triton's CPU interpreter: how the tests run them without a GPU)."""

from __future__ import annotations

import os

from mixerc import plan as planner
from mixerc.codegen.torch.backend import DTYPES as TORCH_DTYPES, TorchRunner
from mixerc.errors import MixerUnsupportedError

from . import prologue
from .terms import has_kernels, per_channel, poly, quasiseparable, scan

DTYPES = {**TORCH_DTYPES,
          "flash": "q, k, v in the inputs' dtype into tensor-core dots (float32 accumulation); "
                   "scores, softmax statistics and the output in float32"}


def available() -> str | None:
    """None when Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'mixerc[triton]')"
    return None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonRunner(TorchRunner):
    name = "triton"
    _torch = None  # the torch backend's runner, for other devices under backend="auto"

    def generate(self, standalone: bool = False):
        from .module import generate
        src, config, spaces, self._kernel_dims = generate(self.plan, standalone=standalone)
        return src, config, spaces

    def kernel_shapes(self, sizes: dict) -> dict:
        """host function -> (config key, D, DV) of its kernels at `sizes`."""
        from math import prod
        out = {}
        for fn, (key, qdims, vdims) in self._kernel_dims.items():
            D = 16 if qdims is None else prod(sizes[d] if not d.isdigit() else int(d)
                                               for d in qdims)
            DV = sum(prod(sizes[d] if not d.isdigit() else int(d) for d in v) for v in vdims)
            out[fn] = (key, D, DV)
        return out

    def tuning_problem(self, sizes, batch, time, dtype=None, device="cpu", kernel_len=None):
        import torch

        from .tuning import TritonTuningProblem
        return TritonTuningProblem(self, sizes, batch, time, dtype or torch.float32, device,
                                   kernel_len)

    def stack_states(self, states: list):
        return stack_states(self, states)

    def explain(self) -> str:
        return planner.describe(self.plan, "triton", DTYPES,
                                runs_on=lambda tp: runs_on(tp, self.plan))

    def forward(self, bound, initial_state=None, return_state=False, config=None):
        if bound.device.type not in ("cuda", "meta") and not interpreted() and \
                any(has_kernels(tp) for m in self.plan.matrices for tp in m.terms):
            if getattr(self.mixer, "auto", False):  # backend="auto": the torch backend here
                if self._torch is None:
                    self._torch = TorchRunner(self.mixer)
                return self._torch.forward(bound, initial_state, return_state, config)
            raise MixerUnsupportedError(
                f"{self.mixer.program.name}: the triton backend runs its kernels on CUDA "
                f"tensors (these are on {bound.device}); use backend='torch' on this device, "
                "or set TRITON_INTERPRET=1 before importing triton to run them in Triton's "
                "interpreter (slow: for tests)")
        return super().forward(bound, initial_state, return_state, config)


def _state_kinds(plan) -> dict:
    """State key -> how sequences of different lengths batch it: "cache" (a
    KV buffer whose slots the decode kernel reads up to each sequence's own
    length), "pos" (those lengths), "fixed" (the same shape whatever the
    length), or the reason it cannot."""
    kinds = {}
    for mp in plan.matrices:
        for tp in mp.terms:
            key = mp.key if len(mp.terms) == 1 else f"{mp.key}.term{tp.index}"
            if tp.strategy == "flash":
                kinds[key] = "flash"
            elif has_kernels(tp):
                kinds[key] = "fixed"
            else:
                where = "the dense interpreter" if tp.strategy == "dense" else "the torch backend"
                kinds[key] = f"its term {key} runs on {where}, whose decode state " \
                             "assumes one length for the whole batch"
    return kinds


def stack_states(runner, states: list):
    """One state for a batch of sequences of different lengths (each state
    from a prefill or steps of this mixer, any batch): KV caches padded to
    the largest capacity, each sequence keeping its own length, fixed-size
    states concatenated. The decode kernels read every sequence's own
    length; a block of several tokens over such a batch is refused."""
    import torch

    from mixerc.runtime.call import owner_of
    from mixerc.runtime.state import MixerState, check_state
    from mixerc.errors import MixerValueError
    if not states or any(not isinstance(x, MixerState) for x in states):
        raise MixerValueError("stack_states takes a non-empty list of MixerStates")
    owner = owner_of(runner.module)
    sizes = dict(states[0].sizes)
    for x in states:
        # the batch from its first tensor: a term on the dense interpreter or the
        # torch backend keeps a dict of tensors (its history) under one key
        first = next(iter(x.tensors.values()), None)
        while isinstance(first, dict):
            first = next(iter(first.values()), None)
        check_state(x, owner, sizes, 0 if first is None else first.shape[0], "a stacked state")
        if dict(x.sizes) != sizes:
            raise MixerValueError("states made at different dim sizes cannot be stacked")
        if set(x.tensors) != set(states[0].tensors):
            raise MixerValueError("states with different keys cannot be stacked (one is the "
                                  "start state {})")
    kinds = _state_kinds(runner.plan)
    out = {}
    for name in states[0].tensors:
        term, _, part = name.rpartition(".") if name.rpartition(".")[0] in kinds else \
            (name, "", "")
        kind = kinds.get(term, "fixed")  # a wrapper's (shift) rows: fixed-size
        parts = [x.tensors[name] for x in states]
        if kind == "flash" and part != "pos":  # a KV buffer: slots padded at the end
            cap = max(t.shape[1] for t in parts)
            parts = [torch.cat([t, t.new_zeros(t.shape[0], cap - t.shape[1], *t.shape[2:])], 1)
                     if t.shape[1] < cap else t for t in parts]
        elif kind not in ("flash", "fixed"):
            raise MixerUnsupportedError(f"{runner.mixer.program.name}: cannot stack decode "
                                        f"states of different lengths: {kind}")
        out[name] = torch.cat(parts, 0)
    return MixerState(out, max(x.length for x in states), owner, states[0].sizes)


def runs_on(tp, plan=None) -> str:
    mp = None if plan is None else next((m for m in plan.matrices
                                         if any(t is tp for t in m.terms)), None)
    if mp is not None and quasiseparable.fused(tp, mp):
        return ("Triton kernels shared with the matrix's other pass (and its diagonal): "
                "both passes and the diagonal: one states and one output launch (the "
                "reversed pass read in real time by index, y written once); with a "
                "gradient the separate chunked passes recompute it and take their adjoint "
                "backward; the torch backend's chunks for float64")
    if per_channel.handles(tp):
        algorithm = "" if plan is None else "; algorithm: " + _scan_or_chunks(tp, plan)
        pro = None if mp is None else scan.maps(tp, mp, plan.program.groups)
        if pro is not None:
            algorithm += ("; the scan computes on load (never written to HBM; its backward "
                          "recomputes them by torch): " + pro.describe() +
                          " (the chunks compute them in torch first)")
        dm = None if mp is None else per_channel.decay_map(tp, mp)
        if dm is not None:
            algorithm += ("; the chunks' cumsum kernel computes on load, and so does the "
                          "scan (never written to HBM; the backward recomputes it by "
                          "torch): " + dm.describe() + " (and a decode step's recurrence "
                          "kernel)")
        skip = mp is not None and scan.fuses_skip(mp, plan.program.groups)
        if skip:
            algorithm += ("; the skip term: the scan adds it in its epilogue, the chunks "
                          "in torch after their kernels")
        if mp is not None and scan.decay_factors(tp.operands["log_decay"].node, mp.heads,
                                                 tp.flags["dim"]) is not None:
            fused = " and ".join(w for w, on in (("the maps", pro), ("the skip", skip)) if on)
            algorithm += ("; a decode step: with the scan one launch of its forward kernel "
                          "without checkpoints" + (f" ({fused} on load)" if fused else "") +
                          ", with the chunks the recurrence kernel")
        elif mp is not None:
            algorithm += ("; a decode step: the recurrence kernel (the log-decay does not "
                          "factor)")
        return ("Triton kernels (forward: a scan of the state in registers, or chunks and "
                "sub-chunks in log space with the state passed in registers; backward: the "
                "scan in reverse from its checkpoints, or the chunks' adjoint state back over "
                "the chunks, then dq, dk and the log-decay's gradient per chunk; a decode "
                "step without gradients updates the state in "
                "place); the torch backend for float64" + algorithm)
    if poly.handles(tp):
        return ("the quadratic form by Triton kernels (per query block the key blocks up to "
                "the diagonal, f(q k^T) and the normalizer's row sums in registers; backward "
                "dQ and dK/dV) where the cost model's Min picks it (quadratic FLOPs <= feature "
                "map FLOPs; knob form: cost | quadratic | features), else the torch "
                "backend's chunked feature map; decode steps: the torch backend's "
                "feature-state recurrence")
    if has_kernels(tp) and tp.strategy == "chunked":
        pro = None if mp is None else prologue.of(tp, mp.heads)
        maps = "" if pro is None or not pro.any else (
            "; computed by the kernels as they load (never written to HBM; the backward "
            "recomputes them): " + pro.describe())
        return ("two Triton kernels (the chunk states in order, then every chunk's output in "
                "parallel; backward: three more runs on the adjoint problems; prefill through "
                "them; a decode step (up to 16 tokens, no gradient) one recurrence kernel that "
                "updates the state in place); q, k, v in the inputs' dtype into tensor-core "
                "dots, decays, states and output in float32" + maps)
    if has_kernels(tp):
        return ("Triton kernels (forward; backward dQ and dK/dV; a split-K decode step that "
                "appends to the KV cache in place)")
    if tp.strategy == "dense":
        return "the dense interpreter"
    return "the torch backend (no Triton kernels for this strategy yet)"


def _scan_or_chunks(tp, plan) -> str:
    """The cost model's choice between the scan and the chunked kernels
    (terms/scan.py), in words; the config's `algorithm` knob overrides it."""
    from mixerc import cost
    mp = next(m for m in plan.matrices if any(t is tp for t in m.terms))
    p = plan.program
    taken = set(p.dims) | set(p.inputs) | set(p.params) | set(p.lets) | set(p.outs)
    return ("the cost model's (elementwise FLOPs per head and token): "
            f"{cost.gpu_per_channel_rule(tp, mp, p.groups, taken)}; the config's `algorithm` "
            "knob overrides it; the scan runs with gradients too (its backward a reverse "
            "scan)")


class _Triton:
    name = "triton"

    def compile(self, mixer) -> TritonRunner:
        why = available()
        if why:
            raise MixerUnsupportedError(f"backend 'triton': {why}")
        return TritonRunner(mixer)


BACKEND = _Triton()
