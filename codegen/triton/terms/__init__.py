"""How the Triton backend computes the strategies it has kernels for; every
other strategy (and every case of a strategy its kernels do not cover) is
the torch backend's (codegen/torch/terms)."""

from mixerc.codegen.torch import terms as torch_terms

from . import chunked, flash, per_channel, poly

BY_STRATEGY = {**torch_terms.BY_STRATEGY, "flash": flash, "chunked": chunked}
KERNELS = frozenset({"flash", "chunked"})  # strategies with Triton kernels for some terms


def has_kernels(tp) -> bool:
    """Whether the term runs on Triton kernels (else on the torch backend; a
    per-channel decay's kernel runs when no gradient is needed, a
    polynomial's quadratic form where the cost model or its knob picks it)."""
    if tp.strategy == "flash":
        return True
    if tp.strategy == "chunked":
        return chunked.handles(tp) or per_channel.handles(tp) or poly.handles(tp)
    return False
