"""How the Triton backend computes the strategies it has kernels for; every
other strategy is the torch backend's (codegen/torch/terms)."""

from mixerc.codegen.torch import terms as torch_terms
from mixerc.codegen.torch.terms import chunked as torch_chunked

from . import flash, per_channel


class _Chunked:
    """Strategy `chunked`: the per-channel decay's Triton kernel where
    per_channel.handles(tp), else the torch backend's chunked code."""

    @staticmethod
    def _of(tp):
        return per_channel if per_channel.handles(tp) else torch_chunked

    def emit(self, tp, mp, w, key, values):
        return self._of(tp).emit(tp, mp, w, key, values)

    def space(self, tp):
        return self._of(tp).space(tp)

    def constraints(self, tp, key):
        return self._of(tp).constraints(tp, key)


BY_STRATEGY = {**torch_terms.BY_STRATEGY, "flash": flash, "chunked": _Chunked()}
KERNELS = frozenset({"flash"})  # strategies with Triton kernels for every term


def has_kernel(tp) -> bool:
    """Whether a term runs Triton kernels (some of the time)."""
    return tp.strategy in KERNELS or per_channel.handles(tp)
