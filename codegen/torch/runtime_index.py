"""What the runtime offers generated torch modules, read from its source with
`ast`: which module defines each name (for explicit imports), every name the
runtime binds (reserved for the Namer), and each definition's own source and
the names it reads (so a standalone module inlines only what it calls)."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from importlib import resources

# the call layer (binding, states, call / step / module) and the torch helpers;
# fallback.py needs mixerc itself and is never inlined
CALL_LAYER = ("bind", "state", "call")
TORCH_HELPERS = ("scalars", "chunks", "tokens", "attention", "tiles", "conv", "autograd")
TRITON_HELPERS = ("flash", "cache", "recurrent", "chunked", "per_channel", "scan", "ops",
                  "poly", "quasiseparable")
FILES = [("mixerc.runtime", m) for m in CALL_LAYER] + \
        [("mixerc.runtime.torch", m) for m in TORCH_HELPERS] + \
        [("mixerc.runtime.triton", m) for m in TRITON_HELPERS]


# imported by every generated module's header when used, never inlined twice
HEADER_IMPORTS = {"math", "torch", "F", "sys", "triton", "tl"}


@dataclass
class Definition:
    name: str
    module: str          # mixerc.runtime.torch.chunks
    source: str          # its text, decorators and comments above it included
    reads: frozenset     # names it refers to
    order: int           # position in FILES order, for a stable inlined file


@functools.lru_cache(maxsize=1)
def index() -> tuple:
    """({name: Definition}, {import line: names it binds}, {every bound name})."""
    defs: dict = {}
    imports: dict = {}
    bound: set = set()
    order = 0
    for package, mod in FILES:
        text = resources.files(package).joinpath(mod + ".py").read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        for node in tree.body:
            order += 1
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [(a.asname or a.name).split(".")[0] for a in node.names]
                bound.update(names)
                line = ast.get_source_segment(text, node)
                if not _is_internal(node):
                    imports.setdefault(line, set()).update(names)
                continue
            for name, src in _definitions(node, text, lines):
                bound.add(name)
                reads = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
                defs.setdefault(name, Definition(name, f"{package}.{mod}", src, reads, order))
    return defs, imports, bound


def _is_internal(node) -> bool:
    """Imports of mixerc itself (the inlined text defines those names already,
    or, for errors, its own fallback classes) and `from __future__`."""
    return isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        ("mixerc", "__future__"))


def _definitions(node, text: str, lines: list):
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1  # keep the comment block that explains it
    src = "\n".join(lines[start:node.end_lineno])
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        yield node.name, src
    elif isinstance(node, ast.Assign):  # also `A, B = ...`
        for t in node.targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    yield n.id, src
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        yield node.target.id, src
    elif isinstance(node, ast.Try):  # `try: from mixerc.errors import X / except: class X`
        for n in ast.walk(node):
            if isinstance(n, ast.ClassDef):
                yield n.name, src
                break


def defined() -> dict:
    """name -> Definition of every top-level runtime definition."""
    return index()[0]


def reserved() -> set:
    """Every name the runtime binds at top level (definitions and imports)."""
    return index()[2]


def closure(names) -> list:
    """The definitions `names` need, transitively, in file order."""
    defs = defined()
    todo = [n for n in names if n in defs]
    seen: set = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(r for r in defs[n].reads if r in defs and r not in seen)
    unique = {defs[n].source: defs[n] for n in seen}  # one block may define several names
    return sorted(unique.values(), key=lambda d: d.order)


def inline(names) -> str:
    """Source text defining `names` and what they need: the imports they use,
    then the definitions, each under a comment naming its runtime module."""
    blocks = closure(names)
    used = set().union(*(d.reads for d in blocks)) if blocks else set()
    merged: dict = {}  # "from X import a, b" lines merged per module: no name twice
    for line, binds in index()[1].items():
        if not binds & used or binds <= HEADER_IMPORTS:
            continue
        node = ast.parse(line).body[0]
        if isinstance(node, ast.ImportFrom):
            merged.setdefault(f"from {node.module} import", set()).update(
                a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
        else:
            merged.setdefault(line, set())
    lines = sorted(k if not v else f"{k} {', '.join(sorted(v))}" for k, v in merged.items())
    out = ["\n".join(lines)] if lines else []
    module = None
    for d in blocks:
        if d.module != module:
            out.append(f"# ---- {d.module}")
            module = d.module
        out.append(d.source)
    return "\n\n\n".join(out) + "\n"
