"""Render a ModulePlan into the source of a Python module (torch backend).

The module's `forward` is straight-line code: token-level values from the
Emitter, and for each planned matrix the calls its strategy emits. Strategy
functions are rendered from their jinja2 templates once per set of flags.
"""

from __future__ import annotations

import ast
import functools
import re
from importlib import resources

import jinja2

from mixerc import __version__, ir, planner
from mixerc.codegen import strategies
from mixerc.codegen.emit import Emitter, axes_of
from mixerc.codegen.names import Namer, comment, comment_lines
from mixerc.jit import template_version

RUNTIME_FILES = ("bind.py", "state.py", "scalars.py", "chunks.py", "tokens.py", "attention.py",
                 "conv.py", "autograd.py", "call.py")
# names every generated module defines at top level or as locals of forward /
# init_params: no user name may take them
MODULE_NAMES = ("math", "sys", "torch", "F", "NAME", "IR_HASH", "TEMPLATE_VERSION", "SIGNATURE",
                "DEFAULT_CONFIG", "CONFIG_SPACE", "CAUSAL", "CAUSAL_REASON", "STATE_KEYS",
                "SOURCE", "config_allowed", "forward", "init_params", "mixer", "step", "module",
                "Mixer")
LOCAL_NAMES = ("sizes", "cfg", "state", "new_state", "batch", "time", "DTYPE", "DEVICE",
               "generator", "device", "out", "T")


@functools.lru_cache(maxsize=1)
def runtime_names() -> tuple:
    """({defined name: runtime module}, {every top-level name}) of the runtime
    files a generated module may import from or inline. Imported names (torch,
    F, ...) are only in the second: they are reserved, never imported from us."""
    root = resources.files("mixerc.runtime")
    defined, everything = {}, set()
    for f in RUNTIME_FILES:
        for node in ast.walk(ast.parse(root.joinpath(f).read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                everything.update((a.asname or a.name).split(".")[0] for a in node.names)
        for node in ast.parse(root.joinpath(f).read_text()).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            elif isinstance(node, ast.Try):  # `except ImportError: class X` fallbacks
                names = [n.name for n in ast.walk(node) if isinstance(n, ast.ClassDef)]
            for n in names:
                defined.setdefault(n, "mixerc.runtime." + f[:-3])
    return defined, everything | set(defined)


def new_namer() -> Namer:
    return Namer(MODULE_NAMES + LOCAL_NAMES + tuple(runtime_names()[1]) + ("dense_apply",))


def _env() -> jinja2.Environment:
    root = resources.files("mixerc.codegen").joinpath("templates")
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)


def key_of(name: str) -> str:
    """A matrix name as a config/state key: conv(w_shift) -> conv_w_shift."""
    key = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "m"
    return key if not key[0].isdigit() else "m_" + key


class Writer(Emitter):
    """Emitter plus what strategies need: canonical layouts, config keys, state
    keys and rendered template functions."""

    def __init__(self, plan: planner.ModulePlan):
        super().__init__(plan.program, new_namer())
        self.plan = plan
        self.env = _env()
        self.functions: list = []      # rendered template functions, in order
        self.function_names: dict = {} # (template, flags) -> function name
        self.state_keys: set = set()
        self.config: dict = {}         # "M.chunk" -> default
        self.spaces: dict = {}         # "M.chunk" -> choices
        self.apply_out: dict = {}      # id(apply) -> variable
        self.needs_dense = False
        self.constraints: list = []    # python expressions over cfg and T

    # ------------------------------------------------------------ helpers
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

    def state_key(self, hint: str) -> str:
        """A state dict key no other matrix of this module uses."""
        key, n = hint, 2
        while key in self.state_keys:
            key, n = f"{hint}_{n}", n + 1
        self.state_keys.add(key)
        return key

    def canon(self, node: ir.Node, heads: tuple, tail: tuple) -> str:
        """node as [batch, time, prod(heads)(, prod(tail))] (a reshaped view or copy)."""
        shape = f"batch, time, {self.size_expr(heads)}" + (f", {self.size_expr(tail)}"
                                                          if tail else "")
        if self.is_number(node):  # constants and dim sizes are Python floats
            return f"torch.full(({shape}), {self.value(node)}, dtype=DTYPE, device=DEVICE)"
        dst = ("b", "t") + tuple(heads) + tuple(tail)
        expr = self.convert(self.value(node), axes_of(node), dst, expand=True)
        if len(heads) == 1 and len(tail) <= 1:
            return expr  # converted to [batch, time, H(, F)] already: no reshape needed
        return f"{expr}.reshape({shape})"

    def coefficients(self, poly) -> str:
        """Python list of the polynomial's coefficients, evaluated at run time."""
        import sympy
        subs = {sympy.Symbol(name): sympy.Symbol(self.value(n))
                for name, n in poly.symbols.items()}
        out = []
        for c in poly.coeffs:
            text = sympy.pycode(c.xreplace(subs), fully_qualified_modules=True)
            out.append(f"float({text})")
        return "[" + ", ".join(out) + "]"

    def config_key(self, key: str, param: str, tp) -> str:
        full = f"{key}.{param}"
        choices, default = strategies.BY_NAME[tp.strategy].space(tp)[param]
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

    def emit_matrix(self, mp: planner.MatrixPlan):
        key = self.state_key(key_of(mp.name))
        if not mp.terms:
            return self.emit_dense(mp, key)
        values, widths = self.values(mp)
        total = None
        for i, tp in enumerate(mp.terms):
            tkey = key if len(mp.terms) == 1 else f"{key}.term{i}"
            v = values
            for w in tp.parts.wrappers:  # outermost first: rev flips the input
                if w[0] == "rev":
                    v = f"{v}.flip(1)"
            if v != values:
                v = self.assign(v)
            strategy = strategies.BY_NAME[tp.strategy]
            self.line("# " + comment(f"{mp.name}, term {i + 1}/{len(mp.terms)}: {tp.strategy}"
                                     if len(mp.terms) > 1 else
                                     f"{mp.name}: {mp.info.cls}, {tp.strategy}"))
            y = strategy.emit(tp, mp, self, tkey, v)
            if not y.isidentifier():  # an expression: bind it before reshaping
                y = self.assign(y, hint="y")
            if hasattr(strategy, "constraints"):
                self.constraints.extend(strategy.constraints(tp, tkey))
            for w in reversed(tp.parts.wrappers):  # innermost first on the output
                if w[0] == "shift":
                    y2 = self.fresh("y")
                    self.line(f"{y2}, new_state[{tkey + '.shift'!r}] = shift_tokens({y}, {w[1]}, "
                              f"state.get({tkey + '.shift'!r}))")
                    y = y2
                elif w[0] == "rev":
                    y = self.assign(f"{y}.flip(1)", hint="y")
            total = y if total is None else self.assign(f"{total} + {y}", hint="y")
        self.split_outputs(mp, total, widths)

    def values(self, mp) -> tuple:
        """Every vector this matrix is applied to, as one [batch, time, Hm, V] tensor."""
        parts, widths = [], []
        for a in mp.applies:
            vdims = self.value_dims(a, mp.heads)
            expr = self.canon(a.u, mp.heads, vdims) if vdims else \
                self.canon(a.u, mp.heads, ()) + "[..., None]"
            parts.append(expr)
            widths.append(vdims)
        expr = parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)"
        return self.assign(expr, hint="u"), widths

    def value_dims(self, apply, heads) -> tuple:
        gm = self.group_map(apply.u.type.dims, heads)
        return tuple(gm.get(d, d) for d in apply.u.type.dims if gm.get(d, d) not in heads)

    def split_outputs(self, mp, y, widths):
        off = 0
        head_sizes = ", ".join(self.dim(d) for d in mp.heads)
        for a, vdims in zip(mp.applies, widths):
            width = self.size_expr(vdims)
            sl = y if len(mp.applies) == 1 else f"{y}[..., {off}:{off} + {width}]" \
                if off else f"{y}[..., :{width}]"
            shape = ", ".join(x for x in ("batch, time", head_sizes,
                                          ", ".join(self.dim(d) for d in vdims)) if x)
            src = ("b", "t") + tuple(mp.heads) + tuple(vdims)
            expr = self.convert(f"{sl}.reshape({shape})", src, ("b", "t") + a.type.dims)
            self.apply_out[id(a)] = super().assign(a, expr)
            off = f"{off} + {width}" if off else width

    def emit_dense(self, mp, key):
        """No strategy fits: evaluate through the dense interpreter (keeps the
        whole input history as its decode state)."""
        self.needs_dense = True
        idx = [n for n in self.program.nodes() if isinstance(n, ir.Apply)]
        for a in mp.applies:
            i = next(j for j, n in enumerate(idx) if n is a)
            y = self.fresh("y")
            inputs = ", ".join(f"{n!r}: {self.args[n]}" for n in self.program.inputs)
            others = ", ".join(f"{n!r}: {self.args[n]}" for n in
                               list(self.program.params) + list(self.program.kernels))
            self.line("# " + comment(f"{mp.name}: {mp.info.cls}, dense fallback "
                                     f"({mp.why_dense})"))
            self.line(f"{y}, new_state[{key + '.history'!r}] = dense_apply(SOURCE, {i}, "
                      f"{{{inputs}}}, {{{others}}}, sizes, state.get({key + '.history'!r}))")
            self.apply_out[id(a)] = y

    # ------------------------------------------------------------ module
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

    def imports(self, code: str) -> list:
        """`from mixerc.runtime.X import a, b` lines for the runtime names `code` uses."""
        used: dict = {}
        for name, module in runtime_names()[0].items():
            if module.endswith((".bind", ".call", ".state")) and name != "Signature":
                continue  # the call layer runs the module; it does not import it
            if re.search(rf"(?<![\w.]){re.escape(name)}\b", code):
                used.setdefault(module, []).append(name)
        lines = [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(used.items())]
        if self.needs_dense:
            lines.append("from mixerc.runtime.fallback import dense_apply")
        return lines

    def render(self, standalone: bool = False) -> str:
        p = self.program
        outputs = [self.value(n) for n in p.outs.values()]
        body = list(self.lines)
        runtime_source = ""
        if standalone:
            if self.needs_dense:
                from mixerc.errors import MixerUnsupportedError
                dense = [m.name for m in self.plan.matrices if not m.terms]
                raise MixerUnsupportedError(
                    f"{p.name}: no strategy covers {', '.join(dense)} (the dense fallback needs "
                    "mixerc at run time), so it cannot be written as a standalone module")
            runtime_source = inline_runtime()
        from mixerc.api import signature
        plan = [f"{mp.name}: {mp.info.cls} -> {', '.join(mp.strategies)}"
                for mp in self.plan.matrices]
        source_comment = ([f"Source ({p.file}):", ""] + p.source.strip("\n").split("\n")
                          + ["", "Matrices and algorithms:"] + [f"    {x}" for x in plan])
        init_body = self.init_params()
        functions = list(self.functions)
        code = "\n".join(body + functions + [" ".join(self.constraints)])
        return self.env.get_template("torch/module.py.jinja").render(
            version=__version__, name=p.name, source_comment=comment_lines("\n".join(
                source_comment)), source_literal=repr(p.source),
            standalone=standalone, runtime_source=runtime_source,
            imports=self.imports(code + "\nSignature"),
            needs_dense=self.needs_dense, ir_hash=p.hash(), template_version=template_version(),
            signature=repr(signature(p)), default_config=repr(self.config),
            config_space=repr(self.spaces), constraints=self.constraints,
            state_keys=repr(sorted(set(re.findall(r"new_state\['([^']*)'\]", "\n".join(body))))),
            causal=repr(self.plan.analysis.causal),
            causal_reason=repr(self.plan.analysis.reason or ""), init_body=init_body,
            functions=functions, args=[self.args[n] for n in
                                       list(p.inputs) + list(p.params) + list(p.kernels)],
            first_input=self.args[next(iter(p.inputs))],
            dims=[(self.dim_names[d], d) for d in self.used_dims],
            body=body, outputs=outputs)


def inline_runtime() -> str:
    """The runtime files as one block of source (for standalone modules): the
    `from __future__` lines and the cross-imports marked `inline: drop` go."""
    root = resources.files("mixerc.runtime")
    parts = []
    for f in RUNTIME_FILES:
        lines = [ln for ln in root.joinpath(f).read_text().splitlines()
                 if not ln.startswith("from __future__") and not ln.endswith("# inline: drop")]
        parts.append(f"# ---- runtime/{f}\n" + "\n".join(lines).strip() + "\n")
    return "\n\n".join(parts)


def generate(plan: planner.ModulePlan, standalone: bool = False) -> tuple[str, dict, dict]:
    """(module source, default config, config choices)."""
    w = Writer(plan)
    src = w.render(standalone=standalone)
    return src, dict(w.config), dict(w.spaces)
