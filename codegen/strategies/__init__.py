"""Strategies: one module per algorithm family, each with a jinja2 template
under codegen/templates/torch/.

A strategy module defines
    NAME, VERSION
    match(parts, matrix_plan, program) -> planner.TermPlan | None
    emit(term_plan, matrix_plan, writer, key, values) -> code for y [B, T, Hm, V]
    space(term_plan) -> {param: (choices, default)}   (autotune config space)
    constraints(term_plan) -> [fn(cfg_for_this_matrix, shape) -> bool]  (optional)
Order matters: the first strategy that claims a term gets it.
"""

from . import chunked, diagonal, flash, toeplitz

ORDER = [diagonal, flash, toeplitz, chunked]
BY_NAME = {m.NAME: m for m in ORDER}
