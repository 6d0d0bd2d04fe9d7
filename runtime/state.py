"""Decode state of a compiled mixer: plain tensors in a dict, how many tokens
it has seen, and whose it is: the mixer (name, IR hash), the backend and the
dim sizes it ran at. A state is only ever continued by the mixer, backend and
sizes that made it (two mixers may well hold the same keys and shapes: RetNet
and GLA, Mamba and SSD). torch.save-able; `.to(device)` moves it."""

from dataclasses import dataclass, field, replace

import torch

from mixerc.runtime.bind import MixerValueError  # inline: drop


@dataclass
class MixerState:
    tensors: dict = field(default_factory=dict)  # strategy/buffer key -> tensor
    length: int = 0                              # tokens consumed so far
    owner: tuple = ()   # (mixer name, IR hash, backend) of the mixer that made it
    sizes: tuple = ()   # ((dim, size), ...) it ran at

    def to(self, *args, **kwargs) -> "MixerState":
        return replace(self, tensors=map_tensors(self.tensors, lambda v: v.to(*args, **kwargs)))

    def clone(self) -> "MixerState":
        """A copy that stays valid after this state is continued: a decode step
        may update its caches in place (the Triton backend's KV cache)."""
        return replace(self, tensors=map_tensors(self.tensors, lambda v: v.clone()))

    def select(self, index) -> "MixerState":
        """The state of some sequences of the batch (index along batch)."""
        return replace(self, tensors=map_tensors(self.tensors, lambda v: v[index]))


def map_tensors(value, fn):
    """fn on every tensor of a (nested) dict of tensors; other values kept."""
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return fn(value) if isinstance(value, torch.Tensor) else value


def _tensors(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, torch.Tensor):
        yield value


def check_state(state, owner: tuple, sizes: dict, batch: int, what: str = "initial_state"):
    """None or a MixerState that `owner` made at these sizes and batch; anything
    else is a MixerValueError that says whose state it is."""
    if state is None:
        return None
    name, ir_hash, backend = owner
    # a standalone module defines its own MixerState class: judge by shape, then owner
    if not isinstance(state, MixerState) and not (
            type(state).__name__ == "MixerState" and
            all(hasattr(state, a) for a in ("tensors", "length", "owner", "sizes"))):
        raise MixerValueError(f"{what} must be the MixerState a previous call of {name} "
                              f"({backend} backend) returned, got {type(state).__name__}")
    theirs = tuple(state.owner) if isinstance(state.owner, (tuple, list)) else ()
    if len(theirs) != 3:
        raise MixerValueError(f"{what} does not say which mixer made it, so it cannot continue "
                              f"{name}: pass a MixerState that {name} returned")
    if theirs[1] != ir_hash:
        whose = f"another version of mixer {name}" if theirs[0] == name else \
            f"mixer {theirs[0]}"
        raise MixerValueError(f"{what} does not belong to {name}: it comes from {whose} "
                              "(another IR hash); a decode state only continues the mixer "
                              "that returned it")
    if theirs[2] != backend:
        raise MixerValueError(f"{what} does not belong to {name} ({backend} backend): it "
                              f"comes from its {theirs[2]} backend, whose state differs")
    made = dict(state.sizes)
    changed = [f"{d} = {made[d]} (now {sizes[d]})" for d in made
               if d in sizes and made[d] != sizes[d]]
    if changed:
        raise MixerValueError(f"{what} of {name} was made at other dim sizes: "
                              f"{', '.join(changed)}")
    for t in _tensors(state.tensors):
        if t.dim() == 0 or t.shape[0] != batch:
            raise MixerValueError(f"{what} is for batch {t.shape[0] if t.dim() else '?'}, the "
                                  f"inputs have batch {batch}")
    return state
