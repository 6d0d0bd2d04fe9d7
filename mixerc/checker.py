"""Check stage: AST -> typed IR (`ir.Program`).

Resolves names, infers each value's kind and dims, places `Contract` nodes,
desugars conveniences (tril/triu/diag/conv/chained comparisons) into core IR
nodes, and reports every mistake as a MixerError at file:line:col.

Broadcasting rule: an elementwise op lines up axes by dim name; a group dim G
declared `G divides H` lines up with H (head h reads group h // (H/G)). One
side's dims must contain the other's: broadcasting never invents an outer
product by accident.
"""

from __future__ import annotations

import difflib
import math

from . import ir
from . import syntax as ast
from .errors import Loc, MixerError, MixerNameError, MixerSyntaxError, MixerTypeError
from .ir import KERNEL, MATRIX, STATIC, TOKEN, Type
from .syntax import MAX_INT

MATH_FUNCS = ("exp", "log", "sqrt", "softplus", "sigmoid", "silu", "elu", "relu", "tanh",
              "abs", "logsigmoid")
STRUCT_FUNCS = ("decay", "toeplitz", "conv", "softmax", "shift", "rev", "tril", "triu",
                "row", "col", "diag", "sum")
INIT_FUNCS = ("uniform", "normal")  # only in a param's initial value
BUILTINS = frozenset(MATH_FUNCS + STRUCT_FUNCS + INIT_FUNCS)
RESERVED = frozenset({"t", "s", "T"})
# keyword arguments of the Python API: a mixer's own names cannot take them
API_NAMES = frozenset({"self", "initial_state", "return_state", "cu_seqlens", "config", "dtype",
                       "device", "seed"})
# Later passes recurse over the IR; through `let`s a value can nest deeper than
# any one expression, so the IR has its own bound (README, The language).
MAX_IR_DEPTH = 120
_CMP = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
_OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "^"}
_KIND_WORD = {TOKEN: "a token tensor", STATIC: "a static tensor", KERNEL: "a lag kernel",
              MATRIX: "a sequence matrix"}


def check(program: ast.Program) -> ir.Program:
    return _Checker(program).run()


class _Checker:
    def __init__(self, program: ast.Program):
        self.p = program
        self.dims: dict[str, ir.Dim] = {}
        self.dim_locs: dict[str, Loc] = {}
        self.inputs: dict[str, tuple] = {}
        self.params: dict[str, tuple] = {}
        self.kernels: dict[str, tuple] = {}
        self.lets: dict[str, ir.Node] = {}
        self.outs: dict[str, ir.Node] = {}
        self.env: dict[str, ir.Node] = {}      # value names visible to expressions
        self.defined: dict[str, Loc] = {}      # every name -> where it was defined
        self.index = {w: ir.Index(Type(MATRIX), which=w) for w in "ts"}
        self.contracted: dict = {}             # id(node) -> its Contract node
        self.init_of: str | None = None        # the param whose initial value is checked
        self.depths: dict = {}                 # id(node) -> nesting depth of the IR

    # ------------------------------------------------------------ diagnostics
    def fail(self, cls, message, loc, hint=None):
        raise cls(message, loc, hint=hint, source=self.p.source)

    def define(self, name: str, loc: Loc, what: str):
        if name in RESERVED:
            self.fail(MixerNameError, f"'{name}' is reserved ({_reserved_why(name)})", loc)
        if name in BUILTINS:
            self.fail(MixerNameError, f"'{name}' is a builtin function and cannot be redefined",
                      loc)
        if name in API_NAMES:
            self.fail(MixerNameError, f"'{name}' is reserved: it is a keyword argument of "
                      "mixerc's Python API (m(..., initial_state=S), m.module(dtype=...))", loc)
        if name in self.defined:
            first = self.defined[name]
            self.fail(MixerNameError, f"duplicate definition of {what} '{name}'", loc,
                      hint=f"'{name}' is already defined at {first}")
        self.defined[name] = loc

    def unknown(self, name: str, loc: Loc, pool, what="name"):
        close = difflib.get_close_matches(name, list(pool), n=1)
        hint = f"did you mean '{close[0]}'?" if close else None
        if not close and pool:
            hint = "known: " + ", ".join(sorted(pool)[:12])
        self.fail(MixerNameError, f"unknown {what} '{name}'", loc, hint=hint)

    # ------------------------------------------------------------ declarations
    def run(self) -> ir.Program:
        p = self.p
        for d in p.dims:
            self.define(d.name, d.loc, "dim")
            if d.size is not None and d.size <= 0:
                self.fail(MixerTypeError, f"dim {d.name} must be positive", d.loc)
            self.dims[d.name] = ir.Dim(d.name, d.size, d.divides)
            self.dim_locs[d.name] = d.loc
        for d in p.dims:
            if d.divides is None:
                continue
            if d.divides not in self.dims:
                self.unknown(d.divides, d.divides_loc, self.dims, "dim")
            if d.divides == d.name:
                self.fail(MixerTypeError, f"dim {d.name} cannot divide itself", d.divides_loc)
            if self.dims[d.divides].divides is not None:
                self.fail(MixerTypeError,
                          f"{d.name} divides {d.divides}, which is itself a group dim",
                          d.divides_loc, hint="a group dim must divide a plain dim")
            a, b = self.dims[d.name].size, self.dims[d.divides].size
            if a is not None and b is not None and b % a:
                self.fail(MixerTypeError, f"group dim {d.name} = {a} does not divide "
                          f"{d.divides} = {b}", d.loc)
        for decl in p.decls:
            self.define(decl.name, decl.loc, decl.kind)
            dims = self.shape(decl.shape, decl.name)
            table = {"input": self.inputs, "param": self.params, "kernel": self.kernels}
            table[decl.kind][decl.name] = dims
            kind = {"input": TOKEN, "param": STATIC, "kernel": KERNEL}[decl.kind]
            cls = {"input": ir.Input, "param": ir.Param, "kernel": ir.KernelRef}[decl.kind]
            self.env[decl.name] = cls(Type(kind, dims), name=decl.name, loc=decl.loc)
        for st in p.stmts:
            if isinstance(st, ast.Const):
                self.define(st.name, st.loc, "const")
                node = self.expr(st.expr)
                if node.type.kind != STATIC:
                    self.fail(MixerTypeError, f"const {st.name} must not depend on time, but "
                              f"it is {_KIND_WORD[node.type.kind]}", st.expr.loc,
                              hint="use `let` for values that vary with time")
                self.env[st.name] = self.lets[st.name] = node
            elif isinstance(st, ast.Let):
                self.define(st.name, st.loc, "let")
                self.env[st.name] = self.lets[st.name] = self.expr(st.expr)
            elif isinstance(st, ast.Out):
                self.define(st.name, st.loc, "out")
                self.outs[st.name] = self.out(st)
            self.check_depth(self.env.get(st.name) or self.outs[st.name], st)
        inits = {d.name: self.param_init(d) for d in p.decls if d.kind == "param" and d.init}
        if not self.inputs:
            loc = Loc(p.loc.file, p.loc.line, p.loc.col, p.loc.line, p.loc.col + 5)
            self.fail(MixerTypeError, f"mixer {p.name} has no `input`: the sequence length comes "
                      "from the token inputs", loc, hint="add a line such as `input x : [H]`")
        if not self.outs:
            loc = Loc(p.loc.file, p.loc.line, p.loc.col, p.loc.line, p.loc.col + 5)
            self.fail(MixerTypeError, f"mixer {p.name} has no `out`", loc,
                      hint="add a line such as `out y = M @ x`")
        return ir.Program(p.name, dict(self.dims), self.inputs, self.params, self.kernels,
                          self.lets, self.outs, source=p.source, file=p.file, param_inits=inits)

    def check_depth(self, node: ir.Node, st) -> None:
        """Refuse a value nested deeper than MAX_IR_DEPTH (counting through lets)."""
        depths = self.depths
        stack = [node]
        while stack:  # children first, with an explicit stack
            n = stack[-1]
            if id(n) in depths:
                stack.pop()
                continue
            todo = [c for c in n.children() if id(c) not in depths]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            depths[id(n)] = 1 + max((depths[id(c)] for c in n.children()), default=0)
        if depths[id(node)] > MAX_IR_DEPTH:
            self.fail(MixerTypeError, f"{st.name} nests {depths[id(node)]} operations deep "
                      f"(counting through the lets it uses); mixerc's limit is {MAX_IR_DEPTH}",
                      st.loc, hint="README, The language: limits")

    def param_init(self, decl) -> ir.Node:
        """`param w : [H] = expr`: a static value from constants, dims and
        uniform()/normal() (which draw one value per element of the param)."""
        self.init_of = decl.name
        saved = self.env
        self.env = {k: v for k, v in saved.items() if k in self.lets and
                    v.type.kind == STATIC}  # consts only: inputs and params do not exist yet
        try:
            node = self.expr(decl.init)
        finally:
            self.env, self.init_of = saved, None
        dims = self.params[decl.name]
        if node.type.kind != STATIC:
            self.fail(MixerTypeError, f"the initial value of param {decl.name} must be static, "
                      f"but it is {_KIND_WORD[node.type.kind]}", decl.init.loc)
        if not set(node.type.dims) <= set(dims):
            self.fail(MixerTypeError, f"the initial value of param {decl.name} has dims "
                      f"[{', '.join(node.type.dims)}] beyond its shape [{', '.join(dims)}]",
                      decl.init.loc)
        return node

    def shape(self, shape, owner) -> tuple:
        out = []
        for d in shape:
            if d.literal is not None:
                if d.literal <= 0:
                    self.fail(MixerTypeError, "a literal dim must be positive", d.loc)
                name = str(d.literal)
                self.dims.setdefault(name, ir.Dim(name, d.literal))
            else:
                name = d.name
                if name not in self.dims:
                    self.unknown(name, d.loc, [k for k in self.dims if not k.isdigit()], "dim")
            if name in out:
                self.fail(MixerTypeError, f"dim {name} appears twice in the shape of {owner}",
                          d.loc)
            out.append(name)
        return tuple(out)

    def out(self, st: ast.Out) -> ir.Node:
        node = self.expr(st.expr)
        kind = node.type.kind
        if kind == MATRIX:
            self.fail(MixerTypeError, f"out {st.name} is a sequence matrix, but outputs are "
                      "token tensors", st.expr.loc, hint="apply the matrix with `M @ x`")
        if kind != TOKEN:
            self.fail(MixerTypeError, f"out {st.name} is {_KIND_WORD[kind]}, but outputs are "
                      "token tensors (they vary with time)", st.expr.loc)
        if node.type.boolean:
            node = ir.Map(Type(TOKEN, node.type.dims), op="mul",
                          args=(node, self.const(1.0, st.loc)), loc=st.loc)
        if st.shape is not None:
            want = self.shape(st.shape, st.name)
            if set(want) != set(node.type.dims):
                self.fail(MixerTypeError, f"out {st.name} is declared [{', '.join(want)}] but "
                          f"its value has dims [{', '.join(node.type.dims)}]", st.loc)
            if want != node.type.dims:
                node = _relabel(node, Type(TOKEN, want))
        return node

    # ------------------------------------------------------------ expressions
    def const(self, value: float, loc) -> ir.Node:
        return ir.Const(Type(STATIC), value=float(value), loc=loc)

    def expr(self, e: ast.Node) -> ir.Node:
        if isinstance(e, ast.Num):
            return self.const(e.value, e.loc)
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.Unary):
            x = self.expr(e.x)
            if e.op == "not":
                self.need_bool(x, e.x.loc, "not")
                return ir.Map(x.type, op="not", args=(x,), loc=e.loc)
            if x.type.boolean:
                x = self.as_number(x)
            return ir.Map(Type(x.type.kind, x.type.dims, x.type.contracted), op="neg",
                          args=(x,), loc=e.loc)
        if isinstance(e, ast.Binary):
            if e.op == "matmul":
                return self.matmul(e)
            a, b = self.expr(e.a), self.expr(e.b)
            self.matmul_precedence(e, a, b)
            return self.binary(e.op, a, b, e.loc, e.a.loc, e.b.loc)
        if isinstance(e, ast.Compare):
            nodes = [self.expr(x) for x in e.operands]
            result = None
            for i, op in enumerate(e.ops):
                cmp = self.binary(_CMP[op], nodes[i], nodes[i + 1], e.loc,
                                  e.operands[i].loc, e.operands[i + 1].loc)
                result = cmp if result is None else self.binary("and", result, cmp, e.loc,
                                                                e.loc, e.loc)
            return result
        if isinstance(e, ast.Transpose):
            x = self.expr(e.x)
            if x.type.kind == MATRIX:
                return ir.Transpose(x.type, m=x, loc=e.loc)
            self.fail(MixerTypeError, f"^T of {_KIND_WORD[x.type.kind]}: a token tensor is "
                      "transposed only on the right of `u @ w^T`", e.loc,
                      hint="write the low-rank matrix as `u @ w^T`")
        if isinstance(e, ast.Call):
            return self.call(e)
        self.fail(MixerSyntaxError, f"internal: unknown expression {type(e).__name__}", e.loc)

    def name(self, e: ast.Name) -> ir.Node:
        n = e.id
        if n in ("t", "s"):
            return self.index[n]
        if n == "T":
            self.fail(MixerNameError, "'T' is reserved for transposition (`^T`)", e.loc)
        if n in self.env:
            return self.env[n]
        if self.init_of is not None and (n in self.inputs or n in self.params or
                                         n in self.kernels or n in self.lets):
            self.fail(MixerTypeError, f"the initial value of param {self.init_of} cannot use "
                      f"'{n}'", e.loc, hint="it may use numbers, dims, consts and "
                      "uniform(lo, hi) / normal(mean, std)")
        if n in self.dims:
            if self.dims[n].size is not None:  # `dims W = 8`: W is the number 8, so a mask
                return self.const(self.dims[n].size, e.loc)  # 0 <= t - s < W is a band
            return ir.DimSize(Type(STATIC), dim=n, loc=e.loc)
        if n in BUILTINS:
            self.fail(MixerTypeError, f"'{n}' is a function; call it as {n}(...)", e.loc)
        later = n in {s.name for s in self.p.stmts}
        if later:
            self.fail(MixerNameError, f"'{n}' is used before it is defined", e.loc)
        pool = set(self.env) | {k for k in self.dims if not k.isdigit()} | {"t", "s"}
        self.unknown(n, e.loc, pool)

    def need_bool(self, x, loc, what):
        if not x.type.boolean:
            self.fail(MixerTypeError, f"`{what}` needs a predicate (a comparison such as "
                      "s <= t)", loc)

    def as_number(self, x):
        """Booleans used in arithmetic count as 0/1."""
        return ir.Map(Type(x.type.kind, x.type.dims), op="mul",
                      args=(x, self.const(1.0, x.loc)), loc=x.loc)

    def contract(self, x: ir.Node) -> ir.Node:
        """x summed over its contracted dims (one shared Contract node per x)."""
        if not x.type.contracted:
            return x
        if id(x) not in self.contracted:
            self.contracted[id(x)] = ir.Contract(Type(x.type.kind, x.type.dims), x=x, loc=x.loc)
        return self.contracted[id(x)]

    def matmul_precedence(self, e: ast.Binary, a: ir.Node, b: ir.Node):
        """`A * B @ v` parses as `A * (B @ v)`: when a matrix meets the token
        result of an `@` elementwise, say that `@` binds tighter."""
        if (a.type.kind, b.type.kind) != (MATRIX, TOKEN) or \
                not (isinstance(e.b, ast.Binary) and e.b.op == "matmul"):
            return
        op = _OP_SYMBOL.get(e.op, e.op)
        self.fail(MixerTypeError, "cannot combine a sequence matrix with a token tensor "
                  f"elementwise: `@` binds tighter than `{op}`", e.loc,
                  hint=f"`A {op} B @ v` reads as `A {op} (B @ v)`; to apply the combined "
                  f"matrix write `(A {op} B) @ v`")

    # --- kinds and dims of elementwise ops
    def result_kind(self, a: Type, b: Type, loc) -> str:
        kinds = {a.kind, b.kind}
        if len(kinds) == 1:
            return a.kind
        if STATIC in kinds:
            return (kinds - {STATIC}).pop()
        x, y = sorted(kinds)
        hint = None
        if kinds == {TOKEN, MATRIX}:
            hint = ("apply the matrix with `M @ x`, or lift the tensor with row(x), col(x) or "
                    "diag(x)")
        self.fail(MixerTypeError, f"cannot combine {_KIND_WORD[x]} with {_KIND_WORD[y]} "
                  "elementwise", loc, hint=hint)

    def align(self, a: Type, b: Type, loc, a_loc=None, b_loc=None) -> tuple:
        """Result dims of an elementwise op (a's order first), or a MixerTypeError."""
        ad, bd = self.map_groups(a.axes, b.axes), self.map_groups(b.axes, a.axes)
        # A dim one side is still summing over is internal to it, unless the other
        # side carries it (then that factor joins the sum).
        a_free, a_sum = set(ad[:len(a.dims)]), set(ad[len(a.dims):])
        b_free, b_sum = set(bd[:len(b.dims)]), set(bd[len(b.dims):])
        fa, fb = a_free | (a_sum & b_free), b_free | (b_sum & a_free)
        if not (fa <= fb or fb <= fa):
            self.fail(MixerTypeError, f"dims do not match: [{', '.join(a.axes)}] vs "
                      f"[{', '.join(b.axes)}]", loc,
                      hint="elementwise ops broadcast a value over dims it lacks, so one "
                      "side's dims must contain the other's")
        return ad, bd

    def map_groups(self, mine: tuple, other: tuple) -> tuple:
        out = []
        for d in mine:
            h = self.dims[d].divides if d in self.dims else None
            if h and h in other and d not in other and h not in mine:
                out.append(h)
            else:
                out.append(d)
        return tuple(out)

    def binary(self, op, a, b, loc, a_loc=None, b_loc=None) -> ir.Node:
        if op in ("and", "or"):
            self.need_bool(a, a_loc or loc, op)
            self.need_bool(b, b_loc or loc, op)
        kind = self.result_kind(a.type, b.type, loc)
        # Where may contracted dims stay pending? mul: a factor that carries the
        # contracted dim goes inside the sum; a factor without it is constant
        # in the sum. div by a value without the dim also commutes. Anything
        # else sums first.
        if op == "mul":
            if set(a.type.contracted) & set(b.type.contracted):
                a, b = self.contract(a), self.contract(b)
        elif op == "div" and not (set(b.type.axes) & set(a.type.contracted)) \
                and not b.type.contracted:
            pass
        elif op in ("add", "sub") and a.type.contracted == b.type.contracted \
                and set(a.type.dims) == set(b.type.dims):
            pass  # sum_k a_k + sum_k b_k == sum_k (a_k + b_k)
        else:
            a, b = self.contract(a), self.contract(b)
        if op in ARITH_BOOL_TO_NUM and a.type.boolean and op != "mul":
            a = self.as_number(a)
        if op in ARITH_BOOL_TO_NUM and b.type.boolean and op != "mul":
            b = self.as_number(b)
        ad, bd = self.align(a.type, b.type, loc, a_loc, b_loc)
        pending = tuple(dict.fromkeys(a.type.contracted + b.type.contracted))
        dims = tuple(d for d in dict.fromkeys(ad + bd) if d not in pending)
        boolean = op in ir.COMPARE_OPS or op in ir.LOGIC_OPS or (
            op == "mul" and a.type.boolean and b.type.boolean)
        return ir.Map(Type(kind, dims, pending, boolean), op=op, args=(a, b), loc=loc)

    def matmul(self, e: ast.Binary) -> ir.Node:
        if isinstance(e.b, ast.Transpose):
            u = self.expr(e.a)
            w = self.expr(e.b.x)
            if u.type.kind == TOKEN and w.type.kind == TOKEN:
                return self.lowrank(u, w, e)
            if u.type.kind == MATRIX and w.type.kind == MATRIX:
                self.unsupported_matprod(e.loc)
            if w.type.kind != TOKEN or u.type.kind != TOKEN:
                bad, where = (u, e.a.loc) if u.type.kind != TOKEN else (w, e.b.x.loc)
                self.fail(MixerTypeError, f"`u @ w^T` builds a low-rank matrix from two token "
                          f"tensors, but this side is {_KIND_WORD[bad.type.kind]}", where)
        m = self.expr(e.a)
        u = self.expr(e.b)
        if m.type.kind == MATRIX and u.type.kind == MATRIX:
            self.unsupported_matprod(e.loc)
        if m.type.kind != MATRIX:
            hint = ("for a low-rank matrix write `u @ w^T`" if m.type.kind == TOKEN else None)
            self.fail(MixerTypeError, f"the left side of @ must be a sequence matrix, but it is "
                      f"{_KIND_WORD[m.type.kind]}", e.a.loc, hint=hint)
        if u.type.kind not in (TOKEN, STATIC):
            self.fail(MixerTypeError, f"the right side of @ must be a token tensor, but it is "
                      f"{_KIND_WORD[u.type.kind]}", e.b.loc)
        m = self.contract(m)
        if u.type.boolean:
            u = self.as_number(u)
        md, ud = self.align(m.type, u.type, e.loc, e.a.loc, e.b.loc)
        dims = tuple(dict.fromkeys(ud + md))
        return ir.Apply(Type(TOKEN, dims), m=m, u=u, loc=e.loc)

    def unsupported_matprod(self, loc):
        self.fail(MixerTypeError, "the product of two sequence matrices is not supported",
                  loc, hint="use `*` for the elementwise (Hadamard) product, or apply one "
                  "matrix after the other: A @ (B @ x)")

    def lowrank(self, u, w, e) -> ir.Node:
        if not u.type.dims or not w.type.dims:
            self.fail(MixerTypeError, "`u @ w^T` contracts the last dim of u and w, but one "
                      "of them has no dims", e.loc)
        du, dw = u.type.dims[-1], w.type.dims[-1]
        if du != dw:
            self.fail(MixerTypeError, f"cannot contract: the left side's last dim is {du} but "
                      f"the right side's is {dw}", e.loc,
                      hint="`u @ w^T` sums over the last dim, which must be the same dim "
                      "on both sides")
        ut, wt = Type(TOKEN, u.type.dims[:-1]), Type(TOKEN, w.type.dims[:-1])
        ad, bd = self.align(ut, wt, e.loc)
        if du in ad or du in bd:
            self.fail(MixerTypeError, f"dim {du} is both contracted and kept", e.loc)
        dims = tuple(dict.fromkeys(ad + bd))
        if u.type.boolean:
            u = self.as_number(u)
        if w.type.boolean:
            w = self.as_number(w)
        return ir.LowRank(Type(MATRIX, dims, (du,)), u=u, w=w, dim=du, loc=e.loc)

    # --- builtin calls
    def call(self, e: ast.Call) -> ir.Node:
        f = e.func
        if f not in BUILTINS:
            if f in self.env or f in self.dims:
                self.fail(MixerTypeError, f"'{f}' is a value, not a function", e.loc)
            self.unknown(f, e.loc, BUILTINS, "function")
        allowed = {"softmax": {"mask"}, "shift": {"k"}, "tril": {"k"}, "triu": {"k"}}.get(f, set())
        for kname, _, kloc in e.kwargs:
            if kname not in allowed:
                hint = f"{f}() takes " + (", ".join(f"{k}=" for k in sorted(allowed))
                                          if allowed else "no keyword arguments")
                self.fail(MixerTypeError, f"unexpected keyword argument '{kname}'", kloc,
                          hint=hint)
        kwargs = {k: (v, kloc) for k, v, kloc in e.kwargs}
        nargs = {"conv": 2, "sum": 2, "uniform": 2, "normal": 2}.get(f, 1)
        extra = 2 if f in ("softmax", "shift", "tril", "triu") else nargs
        if not nargs <= len(e.args) <= extra:
            self.fail(MixerTypeError, f"{f}() takes {nargs} argument{'s' * (nargs > 1)}, "
                      f"got {len(e.args)}", e.loc)
        if f in INIT_FUNCS:
            return self.call_random(e)
        if f in MATH_FUNCS:
            x = self.expr(e.args[0])
            if x.type.boolean:
                x = self.as_number(x)
            x = self.contract(x)
            return ir.Map(x.type, op=f, args=(x,), loc=e.loc)
        return getattr(self, "call_" + f)(e, kwargs)

    def arg_kind(self, e, i, kinds, what):
        x = self.expr(e.args[i])
        if x.type.kind not in kinds:
            want = " or ".join(_KIND_WORD[k] for k in kinds)
            self.fail(MixerTypeError, f"{e.func}() {what} must be {want}, but it is "
                      f"{_KIND_WORD[x.type.kind]}", e.args[i].loc)
        if x.type.boolean:
            x = self.as_number(x)
        return x

    def int_arg(self, e, kwargs, name, pos, default):
        node = e.args[pos] if len(e.args) > pos else kwargs.get(name, (None,))[0]
        if node is None:
            return default
        sign = 1
        if isinstance(node, ast.Unary) and node.op == "neg":
            sign, node = -1, node.x
        if not isinstance(node, ast.Num) or not math.isfinite(node.value) \
                or node.value != int(node.value):
            self.fail(MixerTypeError, f"{e.func}() {name} must be an integer literal", node.loc)
        if abs(node.value) > MAX_INT:
            self.fail(MixerTypeError, f"{e.func}() {name} must be between -{MAX_INT} and "
                      f"{MAX_INT}", node.loc)
        return sign * int(node.value)

    def call_random(self, e):
        if self.init_of is None:
            self.fail(MixerTypeError, f"{e.func}() only appears in a param's initial value "
                      f"(`param w : [H] = {e.func}(...)`)", e.loc)
        if len(e.args) != 2:
            self.fail(MixerTypeError, f"{e.func}() takes 2 arguments", e.loc)
        args = tuple(self.arg_kind(e, i, (STATIC,), "argument") for i in range(2))
        for a, x in zip(args, e.args):
            if a.type.dims:
                self.fail(MixerTypeError, f"{e.func}() arguments must be scalars", x.loc)
        return ir.Random(Type(STATIC, self.params[self.init_of]), dist=e.func, args=args,
                         loc=e.loc)

    def call_decay(self, e, kw):
        a = self.arg_kind(e, 0, (TOKEN, STATIC), "argument (the log-decay per step)")
        return ir.Decay(Type(MATRIX, a.type.dims), a=a, loc=e.loc)

    def call_toeplitz(self, e, kw):
        h = self.arg_kind(e, 0, (KERNEL,), "argument")
        return ir.Toeplitz(Type(MATRIX, h.type.dims), h=h, loc=e.loc)

    def call_conv(self, e, kw):
        u = self.arg_kind(e, 0, (TOKEN,), "input")
        w = self.arg_kind(e, 1, (STATIC,), "weight ([..., taps])")
        if not w.type.dims:
            self.fail(MixerTypeError, "conv() weight needs a last dim of taps", e.args[1].loc)
        taps = ir.Taps(Type(KERNEL, w.type.dims[:-1]), w=w, tap_dim=w.type.dims[-1],
                       loc=e.args[1].loc)
        m = ir.Toeplitz(Type(MATRIX, taps.type.dims), h=taps, loc=e.loc)
        md, ud = self.align(m.type, u.type, e.loc)
        return ir.Apply(Type(TOKEN, tuple(dict.fromkeys(ud + md))), m=m, u=u, loc=e.loc)

    def call_softmax(self, e, kw):
        scores = self.contract(self.arg_kind(e, 0, (MATRIX,), "scores"))
        mask_ast = e.args[1] if len(e.args) > 1 else kw.get("mask", (None,))[0]
        mask = None
        if mask_ast is not None:
            mask = self.expr(mask_ast)
            if mask.type.kind != MATRIX or not mask.type.boolean:
                self.fail(MixerTypeError, "softmax() mask must be a predicate over t and s, "
                          "such as s <= t", mask_ast.loc)
            if not set(mask.type.dims) <= set(self.map_groups(mask.type.dims, scores.type.dims)) \
                    or not set(self.map_groups(mask.type.dims, scores.type.dims)) <= \
                    set(scores.type.dims):
                self.fail(MixerTypeError, f"the mask has dims [{', '.join(mask.type.dims)}] that "
                          f"the scores [{', '.join(scores.type.dims)}] lack", mask_ast.loc)
        return ir.Softmax(Type(MATRIX, scores.type.dims), scores=scores, mask=mask, loc=e.loc)

    def call_shift(self, e, kw):
        x = self.arg_kind(e, 0, (TOKEN, MATRIX), "argument")
        k = self.int_arg(e, kw, "k", 1, 1)
        return ir.Shift(x.type, x=x, k=k, loc=e.loc)

    def call_rev(self, e, kw):
        x = self.arg_kind(e, 0, (TOKEN, MATRIX), "argument")
        return ir.Rev(x.type, x=x, loc=e.loc)

    def triangle(self, e, kw, lower: bool):
        m = self.arg_kind(e, 0, (MATRIX,), "argument")
        k = self.int_arg(e, kw, "k", 1, 0)
        t, s = self.index["t"], self.index["s"]
        bound = t if k == 0 else ir.Map(Type(MATRIX), op="add", args=(t, self.const(k, e.loc)))
        pred = ir.Map(Type(MATRIX, boolean=True), op="le" if lower else "ge", args=(s, bound))
        return self.binary("mul", m, pred, e.loc)

    def call_tril(self, e, kw):
        return self.triangle(e, kw, True)

    def call_triu(self, e, kw):
        return self.triangle(e, kw, False)

    def call_row(self, e, kw):
        u = self.arg_kind(e, 0, (TOKEN,), "argument")
        return ir.Row(Type(MATRIX, u.type.dims), u=u, loc=e.loc)

    def call_col(self, e, kw):
        u = self.arg_kind(e, 0, (TOKEN,), "argument")
        return ir.Col(Type(MATRIX, u.type.dims), u=u, loc=e.loc)

    def call_diag(self, e, kw):
        row = self.call_row(e, kw)
        eye = ir.Map(Type(MATRIX, boolean=True), op="eq", args=(self.index["t"], self.index["s"]))
        return self.binary("mul", row, eye, e.loc)

    def call_sum(self, e, kw):
        x = self.expr(e.args[0])
        d = e.args[1]
        if not isinstance(d, ast.Name) or d.id not in self.dims:
            self.fail(MixerTypeError, "sum() second argument must be a dim name", d.loc)
        if d.id in x.type.contracted:
            self.fail(MixerTypeError, f"dim {d.id} is already summed by `@`", d.loc)
        if d.id not in x.type.dims:
            self.fail(MixerTypeError, f"cannot sum over {d.id}: the value has dims "
                      f"[{', '.join(x.type.dims)}]", d.loc)
        if x.type.boolean:
            x = self.as_number(x)
        dims = tuple(k for k in x.type.dims if k != d.id)
        return ir.Sum(Type(x.type.kind, dims, x.type.contracted), x=x, dim=d.id, loc=e.loc)


ARITH_BOOL_TO_NUM = ir.ARITH_OPS


def _relabel(node: ir.Node, t: Type) -> ir.Node:
    """The same value with its dims listed in another order (for `out y : [...]`)."""
    return ir.Map(t, op="mul", args=(node, ir.Const(Type(STATIC), value=1.0)), loc=node.loc)


def _reserved_why(name: str) -> str:
    return {"t": "the row index of a sequence matrix", "s": "the column index of a sequence "
            "matrix", "T": "transposition, as in w^T"}[name]


def check_source(source: str, file: str = "<string>") -> ir.Program:
    """parse + check."""
    return check(ast.parse(source, file))


__all__ = ["check", "check_source", "MixerError"]
