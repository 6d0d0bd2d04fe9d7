"""The architecture stays visible: data flows one way, so no module of the
package imports (at any level, lazily or not) a module that imports it back."""

import ast
from importlib import resources

import mixerc

PACKAGES = ["mixerc", "mixerc.plan", "mixerc.codegen", "mixerc.codegen.torch",
            "mixerc.codegen.torch.terms", "mixerc.runtime", "mixerc.runtime.torch",
            "mixerc.autotune"]


def modules() -> dict:
    """module name -> its source text, for every module of the package."""
    out = {}
    for pkg in PACKAGES:
        for f in resources.files(pkg).iterdir():
            if f.name.endswith(".py"):
                name = pkg if f.name == "__init__.py" else f"{pkg}.{f.name[:-3]}"
                out[name] = f.read_text()
    return out


def imports(name: str, text: str, known: set) -> set:
    """The package modules `name` imports anywhere in its body."""
    is_pkg = name in PACKAGES
    here = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(text)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # a name inside a module: the module
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if not t or t == name or name.startswith(t + "."):
                continue  # not ours, itself, or an ancestor package (initialized first)
            found.add(t)
    return found


def graph() -> dict:
    mods = modules()
    known = set(mods)
    return {m: imports(m, text, known) for m, text in mods.items()}


def find_cycle(g: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_walker_sees_imports():
    """Guard the test itself: it finds real edges and would report a cycle."""
    g = graph()
    assert "mixerc.plan" in g["mixerc.codegen.torch.module"]
    assert "mixerc.ir" in g["mixerc.checker"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert mixerc.__version__
