"""Calling a generated module: argument checks, dtype policy, decode state,
variable-length batches, and the nn.Module wrapper.

Shared by mixerc's torch backend and by standalone modules (`mixerc compile`
inlines this file; the lines marked `inline: drop` are then already defined).
"""

import torch

from mixerc.runtime.bind import MixerValueError, bind, check_cu_seqlens  # inline: drop
from mixerc.runtime.state import MixerState, check_state, map_tensors  # inline: drop

try:
    from mixerc.errors import MixerDecodeError
except ImportError:  # standalone module
    class MixerDecodeError(ValueError):
        pass

HALF = (torch.float16, torch.bfloat16)


def owner_of(mod) -> tuple:
    """Who a state of this generated module belongs to (see MixerState.owner)."""
    return (mod.NAME, mod.IR_HASH, "torch")


def state_tensors(mod, state, bound) -> dict:
    """The tensors of a MixerState this module returned earlier at these sizes
    and batch ({} for the start), or a MixerValueError."""
    what = "initial_state" if bound.time is not None else "state"  # a call / a step
    if check_state(state, owner_of(mod), bound.sizes, bound.batch, what) is None:
        return {}
    if state.tensors and set(state.tensors) != set(mod.STATE_KEYS):  # {}: the start state
        raise MixerValueError(f"{what} does not belong to {mod.NAME}: it holds "
                              f"{sorted(state.tensors)}, expected {sorted(mod.STATE_KEYS)}")
    return dict(state.tensors)


def run(mod, bound, initial_state=None, return_state=False, config=None):
    """Outputs (in the inputs' dtype) and the state after the last token.
    Token inputs go in in their (common) dtype: the generated forward decides
    where half precision is used; params and kernels compute in float32 for
    half inputs. No tokens (T = 0): empty outputs, the state passes through;
    an empty batch: the shapes of a batch of one, emptied."""
    cdtype = torch.float32 if bound.dtype in HALF else bound.dtype
    sig = mod.SIGNATURE
    args = [bound.inputs[n].to(bound.dtype) for n, _ in sig.inputs]
    args += [bound.params[n].to(cdtype) for n, _ in sig.params]
    args += [bound.kernels[n].to(cdtype) for n, _ in sig.kernels]
    state = state_tensors(mod, initial_state, bound)
    cfg = mod.DEFAULT_CONFIG if config is None else config
    time = args[0].shape[1]
    if time == 0:
        outs = [args[0].new_zeros((bound.batch, 0) + tuple(bound.sizes[d] for d in dims))
                for _, dims in sig.outs]
        new = state
    elif bound.batch == 0:
        outs, new = _run_empty_batch(mod, bound, cfg, state, args, return_state)
    else:  # the module computes the final state only when it is kept
        outs, new = mod.forward(bound.sizes, cfg, state, *args, want_state=return_state)
    length = (0 if initial_state is None else initial_state.length) + time
    outs = [o.to(bound.dtype) for o in outs]
    if not return_state:
        return outs, None
    return outs, MixerState(new, length, owner_of(mod), tuple(sorted(bound.sizes.items())))


def _run_empty_batch(mod, bound, cfg, state, args, want_state):
    """Generated code may reshape with -1, which an empty batch makes ambiguous:
    run a batch of one (zeros) and keep none of it."""
    n = len(mod.SIGNATURE.inputs)
    one = [x.new_zeros((1,) + x.shape[1:]) for x in args[:n]] + args[n:]
    start = {k: map_tensors(v, lambda t: t.new_zeros((1,) + t.shape[1:]))
             for k, v in state.items()}
    outs, new = mod.forward(bound.sizes, cfg, start, *one, want_state=want_state)
    return [o[:0] for o in outs], {k: map_tensors(v, lambda t: t[:0]) for k, v in new.items()}


def run_varlen(forward, sig, tensors, cu_seqlens, initial_state, return_state):
    """Sequences packed along time (batch 1) with FlashAttention-style offsets:
    each runs on its own, with its own state (a list, one per sequence)."""
    first = tensors[sig.inputs[0][0]] if sig.inputs else None
    total = first.shape[1] if isinstance(first, torch.Tensor) and first.dim() > 1 else 0
    offs = check_cu_seqlens(cu_seqlens, total)
    n = len(offs) - 1
    if initial_state is not None and (not isinstance(initial_state, (list, tuple))
                                      or len(initial_state) != n):
        raise MixerValueError(f"with cu_seqlens, initial_state must be a list of {n} states "
                              "(one per sequence)")
    token_names = {name for name, _ in sig.inputs}
    pieces, states = [], []
    for i, (a, b) in enumerate(zip(offs, offs[1:])):
        part = {k: (v[:, a:b] if k in token_names else v) for k, v in tensors.items()}
        outs, st = forward(bind(sig, part), None if initial_state is None else initial_state[i],
                           return_state)
        pieces.append(outs)
        states.append(st)
    outs = [torch.cat([p[k] for p in pieces], 1) for k in range(len(pieces[0]))]
    return outs, states


def single(outs):
    return outs[0] if len(outs) == 1 else tuple(outs)


class Mixer:
    """call / step / module over a generated module: what a standalone module
    exports (mixerc.CompiledMixer offers the same API, plus inspection)."""

    def __init__(self, mod):
        self.mod = mod
        self.name = mod.NAME
        self.backend_name = "torch"

    def _need_causal(self, what):
        if not self.mod.CAUSAL:
            raise MixerDecodeError(f"mixer {self.name} cannot {what}: it is not causal. "
                                   f"{self.mod.CAUSAL_REASON}")

    def __call__(self, /, *, initial_state=None, return_state=False, cu_seqlens=None, config=None,
                 **tensors):
        if initial_state is not None or return_state:
            self._need_causal("carry a decode state")
        sig = self.mod.SIGNATURE

        def forward(bound, state, keep):
            return run(self.mod, bound, state, keep, config)
        if cu_seqlens is not None:
            bind(sig, tensors, varlen=True, check_finite="params")
            outs, state = run_varlen(forward, sig, tensors, cu_seqlens, initial_state,
                                     return_state)
        else:
            outs, state = forward(bind(sig, tensors, check_finite="params"), initial_state,
                                  return_state)
        return (single(outs), state) if return_state else single(outs)

    def step(self, state, /, **tensors):
        """One decode step: inputs [batch, *dims] (no time axis); returns (y_t, state)."""
        self._need_causal("decode token by token")
        bound = bind(self.mod.SIGNATURE, tensors, step=True, check_finite="params")
        bound.inputs = {n: x.unsqueeze(1) for n, x in bound.inputs.items()}
        outs, new = run(self.mod, bound, state, True)
        return single([o[:, 0] for o in outs]), new

    def module(self, /, *, dtype=torch.float32, device=None, seed=None, **dims):
        return MixerModule(self, self.mod.init_params, sizes_for_module(self.mod.SIGNATURE, dims),
                           dtype=dtype, device=device, seed=seed)


def sizes_for_module(sig, dims: dict) -> dict:
    """Every dim the params need, from `dims` and the sizes the source fixes."""
    sizes = {n: s for n, s, _ in sig.dims if s is not None}
    known = {n for n, _, _ in sig.dims}
    unknown = sorted(set(dims) - known)
    if unknown:
        raise MixerValueError(f"unknown dim(s) {', '.join(unknown)} for {sig.name}")
    for k, v in dims.items():
        if sizes.get(k, v) != v:
            raise MixerValueError(f"dim {k} is fixed to {sizes[k]} by the source, got {v}")
        sizes[k] = int(v)
    need = sorted({d for _, dd in sig.params for d in dd} - set(sizes))
    if need:
        raise MixerValueError(f"module() needs the size of {', '.join(need)} "
                              f"(e.g. module({need[0]}=8, ...))")
    for n, _, h in sig.dims:
        if h and n in sizes and h in sizes and sizes[h] % sizes[n]:
            raise MixerValueError(f"{n} = {sizes[n]} does not divide {h} = {sizes[h]}")
    return sizes


class MixerModule(torch.nn.Module):
    """forward(**inputs, initial_state=None, return_state=False, cu_seqlens=None) and
    step(state, **inputs_t), owning the params as nn.Parameters named as in the
    source. Kernels stay call arguments (usually produced by another network)."""

    def __init__(self, mixer, init_params, sizes: dict, dtype=torch.float32, device=None,
                 seed=None):
        super().__init__()
        self.mixer = mixer
        self.sizes = dict(sizes)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        for name, value in init_params(self.sizes, generator).items():
            if not torch.isfinite(value).all():
                raise MixerValueError(f"the initial value of param {name} has NaN/Inf")
            param = torch.nn.Parameter(value.to(dtype=dtype, device=device))
            if hasattr(self, name):  # named like a Module attribute (forward, training, ...):
                self._parameters[name] = param  # reachable by name, not as an attribute
            else:
                self.register_parameter(name, param)

    def _params(self):
        return {n: p for n, p in self.named_parameters(recurse=False)}

    def forward(self, /, initial_state=None, return_state=False, cu_seqlens=None, **inputs):
        return self.mixer(initial_state=initial_state, return_state=return_state,
                          cu_seqlens=cu_seqlens, **inputs, **self._params())

    def step(self, state, /, **inputs):
        return self.mixer.step(state, **inputs, **self._params())

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.sizes.items() if not k.isdigit())
        return f"{self.mixer.name}, {dims}, backend={self.mixer.backend_name}"
