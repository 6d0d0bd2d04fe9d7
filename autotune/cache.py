"""The autotune cache: local directory first, then Redis (read-through), both
written on store (write-through). Every value read is parsed and checked
(entry.py); a bad one is ignored with a warning, and a bad local file is simply
replaced by the next good write.

Bundles (`mixerc cache export/import`) ship tuned entries with a model:
{"schema": "mixerc.autotune.bundle/1", "entries": [<entry>, ...]}.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MixerCacheError
from ..safe_io import read_regular_file
from ..safe_io import atomic_write
from .backends import LocalDir, RedisRemote, remote_from_env, warn
from .entry import MAX_BYTES, BadEntry, Entry, entry_from_json, parse_entry
from .space import canonical_json

BUNDLE_SCHEMA = "mixerc.autotune.bundle/1"
MAX_BUNDLE_BYTES = 256 << 20


class Cache:
    def __init__(self, local: LocalDir | None = None, remote: RedisRemote | None = None):
        self.local = local if local is not None else LocalDir()
        self.remote = remote

    @classmethod
    def from_env(cls) -> "Cache":
        """MIXERC_CACHE_DIR (or the platform cache dir) + MIXERC_REMOTE_CACHE."""
        return cls(LocalDir(), remote_from_env())

    def __repr__(self) -> str:
        return f"Cache({self.local!r}, {self.remote!r})"

    # ------------------------------------------------------------ read
    def _parse(self, raw, key: str, where: str) -> Entry | None:
        if raw is None:
            return None
        try:
            return parse_entry(raw, expect_key=key)
        except BadEntry as e:
            warn(f"ignoring a bad autotune cache entry {key[:12]} in {where}: {e}")
            return None

    def load(self, key: str) -> Entry | None:
        entry = self._parse(self.local.get(key), key, str(self.local.root))
        if entry is not None or self.remote is None:
            return entry
        raw = self.remote.get(key)
        entry = self._parse(raw, key, "Redis")
        if entry is not None:  # materialize the hit so the next process needs no network
            with self.local.lock(key):
                self.local.put(key, raw)
        return entry

    # ------------------------------------------------------------ write
    def store(self, entry: Entry) -> Entry:
        """Write `entry` locally and to Redis. Timings already on disk for configs
        this run did not measure are kept (another process may have measured
        them); this run's timings and best win."""
        key = entry.key
        with self.local.lock(key):
            old = self._parse(self.local.get(key), key, str(self.local.root))
            if old is not None:
                mine = {canonical_json(t.config) for t in entry.timings}
                for t in old.timings:
                    if canonical_json(t.config) not in mine and _in_space(entry, t.config):
                        entry.timings.append(t)
            data = entry.dumps()
            if len(data) > MAX_BYTES:
                warn(f"autotune entry {key[:12]} is too large to cache ({len(data)} bytes)")
                return entry
            self.local.put(key, data)
        if self.remote is not None:
            self.remote.put(key, data)
        return entry

    # ------------------------------------------------------------ listing, bundles
    def entries(self, remote: bool = False) -> list:
        """(key, Entry or the reason it is bad) for every local (or Redis) key."""
        out = []
        source = self.remote if remote else self.local
        if source is None:
            return out
        for key in source.keys():
            try:
                out.append((key, parse_entry(source.get(key), expect_key=key)))
            except BadEntry as e:
                out.append((key, f"bad entry: {e}"))
        return out

    def find(self, prefix: str) -> Entry:
        """The one entry whose key starts with `prefix` (local, then Redis)."""
        prefix = prefix.strip().lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise MixerCacheError(f"{prefix!r} is not a cache key (hex digits)")
        keys = [k for k in self.local.keys() if k.startswith(prefix)]
        if not keys and self.remote is not None:
            keys = [k for k in self.remote.keys() if k.startswith(prefix)]
        if len(keys) != 1:
            raise MixerCacheError(f"{len(keys)} cache entries match {prefix!r}",
                                  hint="see `mixerc cache ls`")
        entry = self.load(keys[0])
        if entry is None:
            raise MixerCacheError(f"cache entry {keys[0][:12]} is not valid (see the warning)")
        return entry

    def export(self, path: str | Path) -> int:
        good = [e for _, e in self.entries() if isinstance(e, Entry)]
        bundle = {"schema": BUNDLE_SCHEMA, "entries": [e.to_json() for e in good]}
        data = json.dumps(bundle, sort_keys=True, indent=1, allow_nan=False).encode()
        try:  # a FIFO or device at `path` is replaced by the rename, never blocked on
            atomic_write(path, data)
        except OSError as e:
            raise MixerCacheError(f"cannot write {path}: {e.strerror or e}") from None
        return len(good)

    def import_bundle(self, path: str | Path) -> tuple:
        """(imported, [reasons for rejected entries]). Every entry is checked like a
        cache read; a file that is not a bundle at all is a MixerCacheError."""
        try:
            raw = read_regular_file(path, MAX_BUNDLE_BYTES)  # never blocks on a FIFO
            if raw is None:
                raise FileNotFoundError(f"no such file: {path}")
            obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise MixerCacheError(f"cannot read bundle {path}: {str(e)[:120]}") from None
        if not isinstance(obj, dict) or obj.get("schema") != BUNDLE_SCHEMA \
                or not isinstance(obj.get("entries"), list) or set(obj) != {"schema", "entries"}:
            raise MixerCacheError(f"{path} is not a mixerc autotune bundle "
                                  f"(want schema {BUNDLE_SCHEMA!r})")
        imported, rejected = 0, []
        for i, item in enumerate(obj["entries"]):
            try:
                entry = entry_from_json(item)
                if len(entry.dumps()) > MAX_BYTES:
                    raise BadEntry("too large")
            except BadEntry as e:
                rejected.append(f"entry {i}: {e}")
                continue
            self.store(entry)
            imported += 1
        return imported, rejected

    def clear(self, remote: bool = False) -> int:
        n = 0
        for key in self.local.keys():
            self.local.delete(key)
            n += 1
        if remote and self.remote is not None:
            for key in self.remote.keys():
                self.remote.delete(key)
                n += 1
        return n


def _in_space(entry: Entry, config: dict) -> bool:
    try:
        entry.space.validate(config)
        return True
    except Exception:
        return False


def _no_constant(name):
    raise ValueError(f"{name} is not allowed")
