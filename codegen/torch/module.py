"""Render a kernel plan into the source of a Python module (torch backend).

The module's `forward` is straight-line code: token-level values from the
Emitter, and for each planned matrix the calls its terms' strategies emit
(codegen/torch/terms/). Strategy functions are rendered from their jinja2
templates (codegen/torch/templates/) once per set of flags.
"""

from __future__ import annotations

import re
from importlib import resources

import jinja2

from mixerc import __version__, ir
from mixerc.codegen.names import Namer, comment, comment_lines, literal
from mixerc.codegen.torch import runtime_index, terms
from mixerc.codegen.torch.emit import Emitter, axes_of
from mixerc.plan import MatrixPlan, ModulePlan, TermPlan, value_dims
from mixerc.runtime.bind import signature_of

# names every generated module defines at top level or as locals of forward /
# init_params: no user name may take them
MODULE_NAMES = ("math", "sys", "torch", "F", "NAME", "IR_HASH", "SIGNATURE", "DEFAULT_CONFIG",
                "CONFIG_SPACE", "CAUSAL", "CAUSAL_REASON", "STATE_KEYS", "SOURCE",
                "config_allowed", "forward", "init_params", "mixer", "step", "module",
                "dense_apply")
LOCAL_NAMES = ("sizes", "cfg", "state", "new_state", "want_state", "batch", "time", "DTYPE",
               "DEVICE", "generator", "device", "out", "T")
# what a standalone module needs from the call layer besides what forward calls
API = ("Mixer", "Signature")


def new_namer() -> Namer:
    return Namer(MODULE_NAMES + LOCAL_NAMES + tuple(runtime_index.reserved()))


def _env(*packages: str) -> jinja2.Environment:
    """The templates of `packages` (searched in order) and the torch backend's."""
    roots = [str(resources.files(p).joinpath("templates"))
             for p in packages + ("mixerc.codegen.torch",)]
    return jinja2.Environment(loader=jinja2.FileSystemLoader(roots),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)


class Writer(Emitter):
    """Emitter plus what term strategies need: canonical layouts, config keys,
    state keys and rendered template functions. `terms` maps a strategy to the
    module that emits it (a backend built on this writer overrides some)."""

    backend = "torch"
    terms = terms.BY_STRATEGY
    header: tuple = ()  # extra import lines of the module
    # the forward's flag: whether its caller keeps the state after the last token
    # (runtime/call.py run: return_state, a decode step); a term whose final state
    # costs extra work may skip it without (new_state then holds None)
    want_state = "want_state"

    def __init__(self, plan: ModulePlan):
        super().__init__(plan.program, new_namer())
        self.plan = plan
        self.env = self.environment()
        self.functions: list = []       # rendered template functions, in order
        self.function_names: dict = {}  # (template, flags) -> function name
        self.config: dict = {}          # "M.chunk" -> default
        self.spaces: dict = {}          # "M.chunk" -> choices
        self.apply_out: dict = {}       # id(apply) -> variable
        self.needs_dense = False
        self.constraints: list = []     # python expressions over cfg and T

    # ------------------------------------------------------------ helpers
    def environment(self) -> jinja2.Environment:
        return _env()

    def assign(self, expr_or_node, expr: str | None = None, hint: str = "v") -> str:
        if isinstance(expr_or_node, ir.Node):
            return super().assign(expr_or_node, expr, hint)
        if expr_or_node.isidentifier():  # already a variable: no `v2 = v1` lines
            return expr_or_node
        name = self.fresh(hint)
        self.line(f"{name} = {expr_or_node}")
        return name

    def size_expr(self, dims) -> str:
        return " * ".join(self.dim(d) for d in dims) or "1"

    def canon(self, node: ir.Node, heads: tuple, tail: tuple, hint: str = "v") -> str:
        """node as [batch, time, prod(heads)(, prod(tail))], in a variable."""
        def shape():
            return f"batch, time, {self.size_expr(heads)}" + (f", {self.size_expr(tail)}"
                                                              if tail else "")
        if self.is_number(node):  # constants and dim sizes are Python numbers
            expr = f"torch.full(({shape()}), {self.value(node)}, dtype=DTYPE, device=DEVICE)"
            return self.assign(expr, hint=hint)
        dst = ("b", "t") + tuple(heads) + tuple(tail)
        expr = self.convert(self.value(node, hint), axes_of(node), dst, expand=True)
        if not (len(heads) == 1 and len(tail) <= 1):
            expr = f"{expr}.reshape({shape()})"
        return self.assign(expr, hint=hint)

    def per_head(self, node: ir.Node, heads: tuple, hint: str = "v") -> str:
        """A static value with head dims as a [prod(heads)] tensor (or a number)."""
        if self.is_number(node):
            return self.value(node)
        expr = self.convert(self.value(node), axes_of(node), tuple(heads), expand=True)
        return self.assign(f"{expr}.reshape({self.size_expr(heads)})", hint=hint)

    def coefficients(self, poly) -> str:
        """Python list of the polynomial's coefficients, evaluated at run time
        with the dense interpreter's float64 semantics (`number`): a
        coefficient 1 / c with c == 0 is inf there, never a ZeroDivisionError."""
        values = {name: self.value(n) for name, n in poly.symbols.items()}
        out = [_number_code(c, values) if c.is_Number else
               f"float({_number_code(c, values)})" for c in poly.coeffs]
        return self.assign("[" + ", ".join(out) + "]", hint="coeffs")

    def config_key(self, key: str, param: str, tp: TermPlan) -> str:
        full = f"{key}.{param}"
        choices, default = self.terms[tp.strategy].space(tp)[param]
        self.config.setdefault(full, default)
        self.spaces.setdefault(full, list(choices))
        return f"cfg[{full!r}]"

    def function(self, template: str, base: str, **flags) -> str:
        """The name of `template` rendered with `flags` (rendered once per module)."""
        key = (template, tuple(sorted((k, repr(v)) for k, v in flags.items())))
        if key not in self.function_names:
            variant = "_".join(k for k, v in sorted(flags.items()) if v is True)
            name = self.namer.claim(f"{base}_{variant}" if variant else base)
            self.function_names[key] = name
            self.functions.append(self.env.get_template(template).render(name=name, **flags))
        return self.function_names[key]

    # ------------------------------------------------------------ matrices
    def e_Apply(self, node: ir.Apply) -> str:
        if id(node) not in self.apply_out:
            self.emit_matrix(self.plan.for_apply(node))
        return self.apply_out[id(node)]

    def emit_matrix(self, mp: MatrixPlan):
        widths = [value_dims(a, mp.heads, self.groups) for a in mp.applies]
        values = _Lazy(lambda: self.values(mp, widths))  # built when a term reads it
        total = None
        for tp in mp.terms:
            key = mp.key if len(mp.terms) == 1 else f"{mp.key}.term{tp.index}"
            where = f"{mp.name}, term {tp.index + 1}/{len(mp.terms)}" if len(mp.terms) > 1 \
                else mp.name
            self.line("# " + comment(f"{where}: {mp.info.cls}, {tp.strategy}"))
            y = self.emit_term(tp, mp, key, values, widths)
            total = y if total is None else self.assign(f"{total} + {y}", hint="y")
        self.split_outputs(mp, total, widths)

    def emit_term(self, tp: TermPlan, mp: MatrixPlan, key: str, values: str, widths) -> str:
        if tp.strategy == "dense":
            return self.emit_dense(tp, mp, key, widths)
        v = values
        if not self.own_values(tp) or "in_scale" in tp.operands or tp.wrappers:
            v = str(v)  # emitted here, before any branch of the term's code
        if "in_scale" in tp.operands:  # col(h) * M: scale the values
            v = self.assign(f"{v} * {self.canon(tp.operands['in_scale'].node, mp.heads, ())}"
                            "[..., None]", hint="u")
        for w in tp.wrappers:  # outermost first: rev flips the input
            if w[0] == "rev":
                v = self.assign(f"{v}.flip(1)", hint="u")
        y = self.terms[tp.strategy].emit(tp, mp, self, key, v)
        if not y.isidentifier():  # an expression: bind it before reshaping
            y = self.assign(y, hint="y")
        self.constraints.extend(getattr(self.terms[tp.strategy], "constraints",
                                        lambda tp, key: [])(tp, key))
        shifts = 0
        for w in reversed(tp.wrappers):  # innermost first on the output
            if w[0] == "shift":  # each shift keeps its own last rows in the decode state
                shifts += 1
                read, write = self.state(key + (".shift" if shifts == 1 else f".shift{shifts}"))
                y2 = self.fresh("y")
                self.line(f"{y2}, {write} = shift_tokens({y}, {w[1]}, {read})")
                y = y2
            elif w[0] == "rev":
                y = self.assign(f"{y}.flip(1)", hint="y")
        if "out_scale" in tp.operands:  # row(g) * M or c * M: scale the output
            g = self.canon(tp.operands["out_scale"].node, mp.heads, ())
            y = self.assign(f"{y} * {g}[..., None]", hint="y")
        return y

    def own_values(self, tp: TermPlan) -> bool:
        """Whether the term's emitter builds its own values when nothing
        (gates, wrappers) changes them first."""
        return tp.strategy == "flash"

    def values(self, mp: MatrixPlan, widths) -> str:
        """Every vector this matrix is applied to, as one [batch, time, Hm, V] tensor."""
        parts = []
        for a, vdims in zip(mp.applies, widths):
            x = self.canon(a.u, mp.heads, vdims, hint="x")
            parts.append(x if vdims else f"{x}[..., None]")
        expr = parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)"
        return self.assign(expr, hint="values")

    def split_outputs(self, mp, y, widths):
        """Each application's slice of y [batch, time, Hm, V], in its own layout."""
        off = 0
        single = len(mp.applies) == 1
        for a, vdims in zip(mp.applies, widths):
            width = _Lazy(lambda vdims=vdims: self.size_expr(vdims))  # only if sliced
            src = ("b", "t") + tuple(mp.heads) + tuple(vdims)
            if len(mp.heads) == 1 and len(vdims) <= 1:  # no reshape: slice or index
                # (one vector's [..., 1] squeezed, not indexed: its backward is
                # a view, where an index's writes a zeroed copy of dy)
                shaped = y if single and vdims else f"{y}.squeeze(-1)" if single else \
                    f"{y}[..., {off}]" if not vdims else \
                    f"{y}[..., {off}:{off} + {width}]" if off else f"{y}[..., :{width}]"
            else:
                sl = y if single else f"{y}[..., {off}:{off} + {width}]" if off else \
                    f"{y}[..., :{width}]"
                head_sizes = ", ".join(self.dim(d) for d in mp.heads)
                shape = ", ".join(x for x in ("batch, time", head_sizes,
                                              ", ".join(self.dim(d) for d in vdims)) if x)
                shaped = f"{sl}.reshape({shape})"
            expr = self.convert(shaped, src, ("b", "t") + a.type.dims)
            self.apply_out[id(a)] = super().assign(a, expr)
            off = f"{off} + {width}" if off else str(width) if not single else 0

    def emit_dense(self, tp: TermPlan, mp: MatrixPlan, key: str, widths) -> str:
        """No strategy fits the term: the dense interpreter evaluates it (its
        decode state is the whole input history)."""
        self.needs_dense = True
        applies = [n for n in self.program.nodes() if isinstance(n, ir.Apply)]
        inputs = ", ".join(f"{n!r}: {self.args[n]}" for n in self.program.inputs)
        others = ", ".join(f"{n!r}: {self.args[n]}" for n in
                           list(self.program.params) + list(self.program.kernels))
        self.line("# " + comment(f"dense interpreter: {tp.why}"))
        read, write = self.state(key + ".history")
        parts = []
        for a, vdims in zip(mp.applies, widths):
            i = next(j for j, n in enumerate(applies) if n is a)
            y = self.fresh("y")
            self.line(f"{y}, {write} = dense_apply(SOURCE, {i}, {tp.index}, {{{inputs}}}, "
                      f"{{{others}}}, sizes, {read})")
            dst = ("b", "t") + tuple(mp.heads) + tuple(vdims)
            expr = self.convert(y, ("b", "t") + a.type.dims, dst, expand=True)
            shape = f"batch, time, {self.size_expr(mp.heads)}, {self.size_expr(vdims)}"
            parts.append(f"{expr}.reshape({shape})")
        expr = parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)"
        return self.assign(expr, hint="y")

    # ------------------------------------------------------------ module
    def input_casts(self) -> list:
        """The inputs the forward converts to DTYPE before its body."""
        return [self.args[n] for n in self.program.inputs]

    def body_lines(self) -> list:
        """The forward's body as rendered (after the casts of input_casts)."""
        return list(self.lines)

    def raw_inputs(self) -> list:
        """(name, input) pairs bound to inputs as given, before the cast."""
        return []

    def init_params(self) -> list:
        """Body of `init_params(sizes, generator, device)`: the source's initial
        values; without one, decay log-rates start at log(uniform(0.9, 0.999))
        (a stable decay) and everything else at normal(0, 0.1)."""
        from mixerc.inputs import decay_leaves

        p = self.program
        em = Emitter(p, new_namer(), dtype="torch.float64")
        negative = decay_leaves(p)
        kw = "generator=generator, dtype=torch.float64, device=device"
        for name, dims in p.params.items():
            shape = "(" + "".join(f"{em.dim(d)}, " for d in dims) + ")"
            node = p.param_inits.get(name)
            if node is None and name in negative:
                expr = f"torch.log(torch.rand({shape}, {kw}) * 0.099 + 0.9)"
            elif node is None:
                expr = f"torch.randn({shape}, {kw}) * 0.1"
            elif em.is_number(node):
                expr = f"torch.full({shape}, float({em.value(node)}), dtype=torch.float64, " \
                       f"device=device)"
            else:
                v = em.convert(em.value(node), axes_of(node), dims, expand=True)
                expr = f"{v}.expand({shape}).clone()"
            em.line(f"out[{name!r}] = {expr}")
        head = [f"{em.dim_names[d]} = sizes[{d!r}]" for d in em.used_dims] + ["out = {}"]
        return head + em.lines + ["return out"]

    def used_runtime(self, code: str) -> list:
        """The runtime names `code` (module-level Python) reads."""
        import ast
        names = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
        return [n for n in runtime_index.defined() if n in names]

    def imports(self, names) -> list:
        """`from mixerc.runtime.X import a, b` lines for runtime names."""
        by_module: dict = {}
        for n in names:
            by_module.setdefault(runtime_index.defined()[n].module, []).append(n)
        lines = [f"from {m} import {', '.join(sorted(ns))}" for m, ns in sorted(by_module.items())]
        if self.needs_dense:
            lines.append("from mixerc.runtime.torch.fallback import dense_apply")
        return lines

    def render(self, standalone: bool = False) -> str:
        p = self.program
        outputs = [self.value(n) for n in p.outs.values()]
        body = self.body_lines()
        init_body = self.init_params()
        functions = list(self.functions)
        code = "\n".join(["def forward():", "    pass"] + ["    " + ln for ln in body]
                         + functions + ["def init_params():", "    pass"]
                         + ["    " + ln for ln in init_body]
                         + [f"x = {c}" for c in self.constraints])
        used = self.used_runtime(code)
        if standalone and self.needs_dense:
            from mixerc.errors import MixerUnsupportedError
            dense = [m.name for m in self.plan.matrices if m.dense_terms]
            raise MixerUnsupportedError(
                f"{p.name}: no fast strategy covers {', '.join(dense)} (the dense interpreter "
                "needs mixerc at run time), so it cannot be written as a standalone module")
        runtime = runtime_index.inline(used + list(API)) if standalone else ""
        plan = [f"{mp.name}: {mp.info.cls} -> {', '.join(mp.strategies)}"
                for mp in self.plan.matrices]
        source_comment = ([f"Source ({p.file}):", ""] + p.source.strip("\n").split("\n")
                          + ["", "Matrices and algorithms:"] + [f"    {x}" for x in plan])
        casts = self.input_casts()
        return self.env.get_template("module.py.jinja").render(
            version=__version__, backend=self.backend, header=list(self.header),
            name=p.name, source_comment=comment_lines("\n".join(
                source_comment)), source_literal=repr(p.source), standalone=standalone,
            runtime_source=runtime,
            imports=[] if standalone else self.imports(sorted(set(used + ["Signature"]))),
            needs_dense=self.needs_dense, ir_hash=p.hash(),
            signature=repr(signature_of(p)), default_config=repr(self.config),
            config_space=repr(self.spaces), constraints=self.constraints,
            state_keys=repr(sorted(set(self.state_keys))),
            causal=repr(self.plan.analysis.causal),
            causal_reason=repr(self.plan.analysis.reason or ""), init_body=init_body,
            functions=functions, args=[self.args[n] for n in
                                       list(p.inputs) + list(p.params) + list(p.kernels)],
            first_input=self.args[next(iter(p.inputs))],
            dims=[(self.dim_names[d], d) for d in self.used_dims],
            body=body, outputs=outputs, raws=self.raw_inputs(), args_inputs=casts,
            uses_dtype=bool(casts) or re.search(r"\bDTYPE\b", code) is not None or (
                self.backend == "torch" and re.search(r"\bMM_DTYPE\b", code) is not None),
            uses_device=re.search(r"\bDEVICE\b", code) is not None,
            uses_mm=re.search(r"\bMM_DTYPE\b", code) is not None, uses_math=re.search(r"(?<![\w.])math\.", code + runtime) is not None,
            uses_F=re.search(r"(?<![\w.])F\.", code + runtime) is not None)


def _number_code(expr, values: dict) -> str:
    """Code for a sympy expression of numbers and symbols (`values`: symbol
    name -> code of a number) as `number` calls, so that it follows float64
    (inf, nan) as the dense interpreter does, not Python's exceptions. Sums
    and products are folded left to right."""
    import sympy
    if expr.is_Symbol:
        return values[expr.name]
    if expr.is_Number:
        return literal(float(expr))
    if isinstance(expr, (sympy.Add, sympy.Mul, sympy.Pow)):
        op = {sympy.Add: "add", sympy.Mul: "mul", sympy.Pow: "pow"}[type(expr)]
        args = [_number_code(a, values) for a in expr.args]
        code = args[0]
        for a in args[1:]:
            code = f"number({op!r}, {code}, {a})"
        return code
    raise TypeError(f"internal: no float64 code for {expr!r}")  # only +, *, ^ reach here


class _Lazy:
    """A value emitted the first time its code is asked for (str())."""

    def __init__(self, make):
        self.make, self.code = make, None

    def __str__(self) -> str:
        if self.code is None:
            self.code = self.make()
        return self.code

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


def generate(plan: ModulePlan, standalone: bool = False) -> tuple[str, dict, dict]:
    """(module source, default config, config choices)."""
    w = Writer(plan)
    src = w.render(standalone=standalone)
    return src, dict(w.config), dict(w.spaces)
