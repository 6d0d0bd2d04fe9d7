"""JIT cache of generated modules: one .py file per (IR hash, backend, mixerc
version, template version) under the cache directory, imported with
importlib. A second compile of the same mixer in a new process only hashes,
finds the file and imports it (Python keeps its bytecode beside it)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

import platformdirs

from . import __version__


@functools.lru_cache(maxsize=1)
def template_version() -> str:
    """Changes whenever anything that shapes generated code changes (templates,
    strategies, emitters, runtime helpers): part of the JIT and autotune cache
    keys. Reads bytes only, so a cache hit never imports the code generator."""
    h = hashlib.sha256(__version__.encode())
    folders = [_folder(p) for p in ("mixerc.codegen", "mixerc.codegen.strategies",
                                     "mixerc.runtime")]
    folders.append(folders[0] / "templates" / "torch")
    files = [f for folder in folders for f in sorted(folder.iterdir(), key=lambda p: p.name)
             if f.name.endswith((".py", ".jinja"))]
    here = Path(__file__).parent  # the stages whose output the code generator reads
    files += [here / "analysis.py", here / "planner.py", here / "ir.py"]
    for f in files:
        h.update(f"{f.parent.name}/{f.name}".encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _folder(package: str) -> Path:
    """A package's directory without importing the package itself."""
    return Path(importlib.util.find_spec(package).submodule_search_locations[0])


def cache_root() -> Path:
    root = os.environ.get("MIXERC_CACHE_DIR") or platformdirs.user_cache_dir("mixerc")
    return Path(root)


def module_key(ir_hash: str, backend: str, template_version: str) -> str:
    text = f"{ir_hash}|{backend}|{__version__}|{template_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def module_path(key: str) -> Path:
    return cache_root() / "modules" / f"mixer_{key}.py"


def load(key: str, make_source) -> object:
    """The module for key, generating and writing it on a miss. A broken
    cached file (truncated, edited) is regenerated, never trusted blindly."""
    path = module_path(key)
    name = f"mixerc_generated_{key}"
    if name in sys.modules:
        return sys.modules[name]
    if path.exists():
        try:
            return _import(name, path)
        except Exception:  # a damaged file: rebuild it below
            sys.modules.pop(name, None)
    if make_source is None:
        raise ImportError(f"no usable module at {path}")
    source = make_source()
    _atomic_write(path, source)
    return _import(name, path)


def _source_index(source: str) -> Path:
    text = f"{source}|{__version__}|{template_version()}"
    return cache_root() / "sources" / hashlib.sha256(text.encode()).hexdigest()[:24]


def lookup_source(source: str):
    """The module generated earlier for exactly this source text, or None. The
    index only maps source text to a module key; the module file itself is
    keyed by IR hash."""
    try:
        key = _source_index(source).read_text().strip()
    except OSError:
        return None
    if not re.fullmatch(r"[0-9a-f]{24}", key) or not module_path(key).exists():
        return None
    try:
        return load(key, None)
    except Exception:
        return None


def remember_source(source: str, key: str):
    try:
        _atomic_write(_source_index(source), key)
    except OSError:  # a read-only cache only costs speed
        pass


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "forward"):
        raise ImportError(f"{path} is not a generated mixer module")
    sys.modules[name] = module
    return module


def _atomic_write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
