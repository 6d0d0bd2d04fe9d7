"""How the torch backend computes each strategy of the kernel plan: one module
per strategy, each rendering its jinja2 template family
(codegen/torch/templates/<strategy>*.py.jinja).

A term module defines
    emit(term_plan, matrix_plan, writer, key, values) -> code for y [B, T, Hm, V]
    space(term_plan) -> {param: (choices, default)}   (autotune config space)
    constraints(term_plan, key) -> [python expressions over cfg and T] (optional)
"""

from . import banded, chunked, diagonal, flash, global_, toeplitz

BY_STRATEGY = {"flash": flash, "chunked": chunked, "banded": banded, "global": global_,
               "toeplitz": toeplitz, "diagonal": diagonal}
