"""Parse stage: `.mx` text -> AST with source positions.

The grammar lives in grammar/mixer.lark; this module only turns lark's parse
tree into small frozen dataclasses and lark's exceptions into
`MixerSyntaxError`s that point at the offending character.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources

import lark

from .errors import Loc, MixerSyntaxError

# Documented limits (README "The language"): passes over expressions recurse,
# so nesting is bounded where Python's stack is known to hold; a mixer file is
# a few hundred lines, far below the size cap.
MAX_DEPTH = 100            # operations nested in one expression
MAX_INT = 2 ** 31 - 1      # dim sizes, shifts and diagonal offsets
MAX_SOURCE_CHARS = 1 << 20

KEYWORDS = frozenset({"mixer", "dims", "divides", "input", "param", "kernel", "const",
                      "let", "out", "and", "or", "not"})


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Node:
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Num(Node):
    value: float = 0.0
    text: str = ""


@dataclass(frozen=True)
class Name(Node):
    id: str = ""


@dataclass(frozen=True)
class Call(Node):
    func: str = ""
    args: tuple = ()
    kwargs: tuple = ()  # of (name, expr, loc)


@dataclass(frozen=True)
class Binary(Node):
    op: str = ""  # add sub mul div pow matmul and or
    a: Node = None
    b: Node = None


@dataclass(frozen=True)
class Unary(Node):
    op: str = ""  # neg not
    x: Node = None


@dataclass(frozen=True)
class Compare(Node):
    ops: tuple = ()       # e.g. ("<=", "<")
    operands: tuple = ()  # one more than ops


@dataclass(frozen=True)
class Transpose(Node):
    x: Node = None


@dataclass(frozen=True)
class ShapeDim(Node):
    name: str | None = None
    literal: int | None = None

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.literal)


@dataclass(frozen=True)
class DimDecl(Node):
    name: str = ""
    size: int | None = None
    divides: str | None = None
    divides_loc: Loc | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Decl(Node):
    kind: str = ""  # input | param | kernel
    name: str = ""
    shape: tuple = ()
    init: Node | None = None  # param only: `param w : [H] = normal(0, 0.02)`


@dataclass(frozen=True)
class Const(Node):
    name: str = ""
    expr: Node = None


@dataclass(frozen=True)
class Let(Node):
    name: str = ""
    expr: Node = None


@dataclass(frozen=True)
class Out(Node):
    name: str = ""
    shape: tuple | None = None
    expr: Node = None


@dataclass(frozen=True)
class Program(Node):
    name: str = ""
    dims: tuple = ()
    decls: tuple = ()
    stmts: tuple = ()  # Const | Let | Out in source order
    source: str = field(default="", compare=False, repr=False)
    file: str = field(default="<string>", compare=False, repr=False)


# ------------------------------------------------------------------------ parser


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    text = resources.files("mixerc.grammar").joinpath("mixer.lark").read_text()
    # No `cache=True`: lark would unpickle its tables from the shared temp dir,
    # where any local user can plant a file. Building them takes ~50 ms.
    return lark.Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=True)


_TOKEN_WORDS = {
    "NAME": "a name", "INT": "an integer", "NUMBER": "a number", "COMP_OP": "a comparison",
    "TRANSPOSE": "^T", "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "CIRCUMFLEX": "'^'",
    "AT": "'@'", "$END": "end of file",
}


def _describe_expected(names) -> str:
    words = []
    for n in sorted(set(names)):
        if n in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[n])
        elif n.isupper() and n.lower() in KEYWORDS:
            words.append(f"'{n.lower()}'")
        else:
            words.append(n.lower())
    words = sorted(set(words))
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def parse(source: str, file: str = "<string>") -> Program:
    """Parse mixer source text. Raises MixerSyntaxError on malformed input."""
    if not isinstance(source, str):
        raise MixerSyntaxError(f"mixer source must be text, got {type(source).__name__}")
    if len(source) > MAX_SOURCE_CHARS:
        raise MixerSyntaxError(f"the source has {len(source)} characters; mixerc reads at most "
                               f"{MAX_SOURCE_CHARS}", Loc(file, 1, 1, 1, 2))
    try:
        tree = _parser().parse(source)
    except lark.exceptions.UnexpectedCharacters as e:
        loc = Loc(file, e.line, e.column, e.line, e.column + 1)
        ch = source[e.pos_in_stream] if 0 <= e.pos_in_stream < len(source) else "?"
        raise MixerSyntaxError(f"unexpected character {ch!r}", loc, source=source,
                               hint=_expect_hint(e.allowed)) from None
    except lark.exceptions.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            line, col = _end_pos(source)
            raise MixerSyntaxError("unexpected end of file", Loc(file, line, col, line, col + 1),
                                   source=source, hint=_expect_hint(e.expected)) from None
        loc = Loc(file, tok.line, tok.column, tok.end_line or tok.line,
                  tok.end_column or tok.column + 1)
        raise MixerSyntaxError(f"unexpected {tok.value!r}", loc, source=source,
                               hint=_expect_hint(e.expected)) from None
    except lark.exceptions.UnexpectedEOF as e:
        line, col = _end_pos(source)
        raise MixerSyntaxError("unexpected end of file", Loc(file, line, col, line, col + 1),
                               source=source, hint=_expect_hint(e.expected)) from None
    except lark.exceptions.LarkError as e:  # anything else lark may raise on odd input
        line, col = _end_pos(source)
        raise MixerSyntaxError(f"cannot parse: {e}", Loc(file, 1, 1, 1, 2), source=source) from None
    _check_depth(tree, file, source)
    return _Builder(file, source).program(tree.children[0])


def _check_depth(tree, file: str, source: str) -> None:
    """Refuse expressions nested deeper than MAX_DEPTH, before anything recurses
    over them. The parse tree is walked with an explicit stack."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH + 3:  # start, mixer and the statement are 3 levels
            meta = node.meta
            loc = Loc(file, getattr(meta, "line", 1), getattr(meta, "column", 1),
                      getattr(meta, "end_line", 1), getattr(meta, "end_column", 2))
            raise MixerSyntaxError(
                f"expression nested more than {MAX_DEPTH} operations deep", loc, source=source,
                hint="mixerc's limit on nesting (README, The language); a long sum or "
                "product of many terms nests one level per term")
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, lark.Tree))


def _expect_hint(expected) -> str | None:
    if not expected:
        return None
    return f"expected {_describe_expected(expected)}"


def _end_pos(source: str) -> tuple[int, int]:
    lines = source.split("\n")
    return len(lines), len(lines[-1]) + 1


class _Builder:
    """lark Tree -> AST. Written as plain recursion (not a lark Transformer) so
    that our own errors are not wrapped in lark's VisitError."""

    def __init__(self, file: str, source: str):
        self.file = file
        self.source = source

    def loc(self, item) -> Loc:
        meta = getattr(item, "meta", item)
        line = getattr(meta, "line", None)
        if line is None:
            return Loc(self.file, 1, 1, 1, 2)
        return Loc(self.file, line, meta.column, meta.end_line, meta.end_column)

    def int_token(self, tok) -> int:
        text = str(tok).lstrip("0") or "0"
        if len(text) > len(str(MAX_INT)) or int(text) > MAX_INT:
            raise MixerSyntaxError(f"{str(tok)[:20]}{'...' * (len(str(tok)) > 20)} is too "
                                   f"large for a size (at most {MAX_INT})", self.loc(tok),
                                   source=self.source)
        return int(text)

    def name_token(self, tok) -> tuple[str, Loc]:
        name = str(tok)
        loc = self.loc(tok)
        if name in KEYWORDS:
            raise MixerSyntaxError(f"'{name}' is a keyword and cannot be used as a name", loc,
                                   source=self.source)
        return name, loc

    # --- statements
    def program(self, tree) -> Program:
        name, _ = self.name_token(tree.children[0])
        dims, decls, stmts = [], [], []
        for st in tree.children[1:]:
            kind = st.data
            if kind == "dims_stmt":
                dims.extend(self.dim_decl(d) for d in st.children)
            elif kind in ("input_stmt", "param_stmt", "kernel_stmt"):
                n, _ = self.name_token(st.children[0])
                shape = self.shape(st.children[1])
                init = st.children[2] if len(st.children) > 2 else None
                decls.append(Decl(self.loc(st), kind.split("_")[0], n, shape,
                                  None if init is None else self.expr(init)))
            elif kind == "const_stmt":
                n, _ = self.name_token(st.children[0])
                stmts.append(Const(self.loc(st), n, self.expr(st.children[1])))
            elif kind == "let_stmt":
                n, _ = self.name_token(st.children[0])
                stmts.append(Let(self.loc(st), n, self.expr(st.children[1])))
            elif kind == "out_stmt":
                n, _ = self.name_token(st.children[0])
                shape = None if st.children[1] is None else self.shape(st.children[1])
                stmts.append(Out(self.loc(st), n, shape, self.expr(st.children[2])))
            else:  # pragma: no cover - grammar and builder out of sync
                raise MixerSyntaxError(f"internal: unknown statement {kind}", self.loc(st),
                                       source=self.source)
        return Program(self.loc(tree), name, tuple(dims), tuple(decls), tuple(stmts),
                       source=self.source, file=self.file)

    def dim_decl(self, tree) -> DimDecl:
        name, loc = self.name_token(tree.children[0])
        size_tok, div_tok = tree.children[1], tree.children[2]
        size = None if size_tok is None else self.int_token(size_tok)
        divides, dloc = None, None
        if div_tok is not None:
            divides, dloc = self.name_token(div_tok)
        return DimDecl(self.loc(tree), name, size, divides, dloc)

    def shape(self, tree) -> tuple:
        out = []
        for d in tree.children:
            if d is None:  # `[]`: a scalar per token
                continue
            tok = d.children[0]
            if d.data == "dim_name":
                n, loc = self.name_token(tok)
                out.append(ShapeDim(loc, name=n))
            else:
                out.append(ShapeDim(self.loc(tok), literal=self.int_token(tok)))
        return tuple(out)

    # --- expressions
    def expr(self, t) -> Node:
        if isinstance(t, lark.Token):  # a bare terminal reached through ?rules
            if t.type == "NAME":
                n, loc = self.name_token(t)
                return Name(loc, n)
            return Num(self.loc(t), float(t), str(t))
        kind = t.data
        loc = self.loc(t)
        c = t.children
        if kind == "number":
            return Num(loc, float(c[0]), str(c[0]))
        if kind == "name":
            n, nloc = self.name_token(c[0])
            return Name(nloc, n)
        if kind in ("add", "sub", "mul", "div", "pow", "matmul"):
            return Binary(loc, kind, self.expr(c[0]), self.expr(c[1]))
        if kind == "and_op":
            return Binary(loc, "and", self.expr(c[0]), self.expr(c[1]))
        if kind == "or_op":
            return Binary(loc, "or", self.expr(c[0]), self.expr(c[1]))
        if kind == "neg":
            return Unary(loc, "neg", self.expr(c[0]))
        if kind == "not_op":
            return Unary(loc, "not", self.expr(c[0]))
        if kind == "transpose":
            return Transpose(loc, self.expr(c[0]))
        if kind == "compare":
            operands = tuple(self.expr(x) for x in c[0::2])
            ops = tuple(str(x) for x in c[1::2])
            return Compare(loc, ops, operands)
        if kind == "call":
            func, _ = self.name_token(c[0])
            args, kwargs = [], []
            for a in c[1:]:
                if a is None:
                    continue
                if isinstance(a, lark.Tree) and a.data == "kwarg":
                    kname, kloc = self.name_token(a.children[0])
                    kwargs.append((kname, self.expr(a.children[1]), kloc))
                else:
                    if kwargs:
                        raise MixerSyntaxError("positional argument after a keyword argument",
                                               self.loc(a), source=self.source)
                    args.append(self.expr(a))
            return Call(loc, func, tuple(args), tuple(kwargs))
        raise MixerSyntaxError(f"internal: unknown expression {kind}", loc, source=self.source)
