"""Decode state of a compiled mixer: plain tensors in a dict, plus how many
tokens it has seen. torch.save-able; `.to(device)` moves it."""

from dataclasses import dataclass, field


@dataclass
class MixerState:
    tensors: dict = field(default_factory=dict)  # strategy/buffer key -> tensor
    length: int = 0                              # tokens consumed so far

    def to(self, *args, **kwargs) -> "MixerState":
        return MixerState({k: (v.to(*args, **kwargs) if hasattr(v, "to") else v)
                           for k, v in self.tensors.items()}, self.length)

    def select(self, index) -> "MixerState":
        """The state of some sequences of the batch (index along batch)."""
        return MixerState({k: v[index] for k, v in self.tensors.items()}, self.length)
