"""JIT cache of generated modules: one .py file per rendered module under the
cache directory, named by the sha256 of its text.

The cache directory may be shared by a team or a cluster, so nothing in it is
trusted. Every compile renders the module's source from the IR and the
templates; the file `modules/mixer_<hash>.py` is used only when its bytes are
exactly that source, and the module always runs from the rendered text (never
from a file importlib would read, nor from a .pyc). A missing, different or
unreadable file is a miss: the file is rewritten (atomically, readable by the
team), and where the directory cannot be written the module runs from memory
with one warning. The files are there for people (`mixerc compile`,
tracebacks, reading what runs), not for speed.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import sys
import types
import warnings
from pathlib import Path

import platformdirs

from .errors import CacheWarning
from .safe_io import atomic_write, read_regular_file

MAX_MODULE_BYTES = 16 << 20  # a generated module is tens of KiB


def cache_root() -> Path:
    root = os.environ.get("MIXERC_CACHE_DIR") or platformdirs.user_cache_dir("mixerc")
    return Path(root).expanduser()


def module_key(source: str) -> str:
    """The name of a rendered module: a hash of its whole text."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]


def module_path(key: str) -> Path:
    return cache_root() / "modules" / f"mixer_{key}.py"


_warned: set = set()  # cache roots already warned about (one warning each per process)


def _warn_once(root: Path, message: str) -> None:
    if str(root) not in _warned:
        _warned.add(str(root))
        warnings.warn(message, CacheWarning, stacklevel=4)


def load(source: str) -> types.ModuleType:
    """The module whose text is `source`, executed once per process; its file
    in the cache directory is checked against `source` and rewritten if it
    differs."""
    key = module_key(source)
    name = f"mixerc_generated_{key}"
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__mixerc_source__", None) == source:
        return mod
    path = module_path(key)
    try:
        on_disk = read_regular_file(path, MAX_MODULE_BYTES)
    except OSError:  # a FIFO, device, directory or unreadable file: a miss
        on_disk = b""
    data = source.encode("utf-8")
    if on_disk != data:
        if on_disk is not None:
            warnings.warn(f"{path} is not the module mixerc generates for this mixer (edited "
                          "or replaced); ignoring it and writing the generated one",
                          CacheWarning, stacklevel=3)
        try:
            atomic_write(path, data)
        except OSError as e:
            _warn_once(cache_root(), f"cannot write generated modules under {path.parent} "
                       f"({e.strerror or e}); compiling them in memory")
            path = None
    filename = str(path) if path is not None else f"<mixerc generated {key}>"
    mod = types.ModuleType(name)
    mod.__file__ = filename
    mod.__mixerc_source__ = source
    # tracebacks quote the text that ran, whatever happens to the file later
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec", dont_inherit=True), mod.__dict__)
    sys.modules[name] = mod
    return mod
