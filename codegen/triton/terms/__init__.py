"""How the Triton backend computes the strategies it has kernels for; every
other strategy is the torch backend's (codegen/torch/terms)."""

from mixerc.codegen.torch import terms as torch_terms

from . import flash

BY_STRATEGY = {**torch_terms.BY_STRATEGY, "flash": flash}
KERNELS = frozenset({"flash"})  # strategies with Triton kernels
