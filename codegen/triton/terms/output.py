"""Whether a term's kernels write a mixer output as is, so they may store y
in the inputs' dtype: asked by the chunked, scan and per-channel terms (a
module of its own: they import each other's kernels the other way)."""


def writes_output(mp, w, skip: bool, divides: bool, all_terms: bool = False) -> bool:
    """Whether the term's y is a mixer output as is (or its value columns,
    the division fused): the matrix's single term, nothing around it
    (wrappers, scales), its skip term and division in the kernel, and the
    node that ends it one of the program's outputs read by no other node.
    The kernel then stores y in the inputs' dtype (no float32 y converted
    after; runtime/call.py's conversion is a no-op). skip: whether the
    term's kernels add the skip term; divides: whether they divide by the
    normalizer (the per-channel kernels never do). all_terms: the kernels
    compute every term of the matrix, wrappers included (a quasiseparable
    pair, its shifts and reversal, and its diagonal), not only its single one."""
    if len(mp.terms) != 1 and not all_terms:
        return False
    for tp in mp.terms:
        if (tp.wrappers and not all_terms) or any(n in tp.operands
                                                  for n in ("in_scale", "out_scale")):
            return False
    if mp.skip is not None and not skip:
        return False
    if mp.divide is not None:
        if not divides or len(mp.applies) != 2:
            return False
        end = mp.divide
    elif len(mp.applies) != 1 or mp.normalizer:
        return False
    else:
        end = mp.skip[0] if mp.skip is not None else mp.applies[0]
    if not any(o is end for o in w.program.outs.values()):
        return False
    # nothing else reads it, nor the applications inside it (another reader
    # would see a rounded y)
    inside = [end] + list(mp.applies)
    return not any(c is x for n in w.program.nodes() if not any(n is x for x in inside)
                   for c in n.children() for x in inside)
