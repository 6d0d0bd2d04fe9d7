"""Small IR rewrites the matchers need: substituting nodes, lifting tokens
through time reversal, and checking which node kinds an expression uses.
All iterative (programs may be deep)."""

from __future__ import annotations

from dataclasses import replace

from .. import ir
from ..ir import MATRIX, STATIC


def substitute(root: ir.Node, mapping: dict) -> ir.Node:
    """root with every node whose id is in `mapping` replaced by its value;
    the nodes above a replacement are rebuilt, the rest shared."""
    new: dict = {}
    for n in ir.topo_order([root]):
        if id(n) in mapping:
            new[id(n)] = mapping[id(n)]
            continue
        kids = n.children()
        if not kids or all(new[id(c)] is c for c in kids):
            new[id(n)] = n
            continue
        new[id(n)] = _with_children(n, [new[id(c)] for c in kids])
    return new[id(root)]


def _with_children(n: ir.Node, kids: list) -> ir.Node:
    if isinstance(n, (ir.Map, ir.Random)):
        return replace(n, args=tuple(kids))
    fields = {ir.Sum: ("x",), ir.Contract: ("x",), ir.Taps: ("w",), ir.LowRank: ("u", "w"),
              ir.Decay: ("a",), ir.Toeplitz: ("h",), ir.Shift: ("x",), ir.Rev: ("x",),
              ir.Transpose: ("m",), ir.Row: ("u",), ir.Col: ("u",), ir.Apply: ("m", "u"),
              ir.Softmax: ("scores", "mask")}[type(n)]
    return replace(n, **dict(zip(fields, kids)))


def reversed_token(node: ir.Node) -> ir.Node:
    """rev(node) for a token value; statics and constants are their own reversal."""
    if node.type.kind == STATIC:
        return node
    if isinstance(node, ir.Rev):
        return node.x
    return ir.Rev(node.type, x=node, loc=node.loc)


def matrix_part(root: ir.Node) -> list:
    """The matrix-valued nodes of an expression, without descending into the
    token values under Row, Col and LowRank (they are leaves of the matrix)."""
    out, seen, stack = [], set(), [root]
    while stack:
        n = stack.pop()
        if id(n) in seen or n.type.kind != MATRIX:
            continue
        seen.add(id(n))
        out.append(n)
        if not isinstance(n, (ir.Row, ir.Col, ir.LowRank)):
            stack.extend(n.children())
    return out


def uses_only(root: ir.Node, allowed: tuple, stop=()) -> bool:
    """Every matrix-valued node under root is one of `allowed` (token, static
    and kernel values below a Row/Col or a `stop` node are not inspected)."""
    stack, seen = [root], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.type.kind == MATRIX and not isinstance(n, allowed):
            return False
        if n.type.kind == MATRIX and not isinstance(n, stop):
            stack.extend(n.children())
    return True
