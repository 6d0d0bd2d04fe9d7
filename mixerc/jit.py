"""JIT cache of generated modules: one .py file per (IR hash, backend, mixerc
version, template version) under the cache directory, imported with
importlib. A second compile of the same mixer in a new process only hashes,
finds the file and imports it (Python keeps its bytecode beside it)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import platformdirs

from . import __version__


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
    source = make_source()
    _atomic_write(path, source)
    return _import(name, path)


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
