"""Where cache values live: a local directory and, optionally, Redis.

Both store raw bytes by key; parsing and checking is entry.py's job. The local
directory is always there (one `<key>.json` per key, written atomically, read
and written under a file lock so processes sharing the directory, even over a
network filesystem, never see half a file). Redis is best effort: each remote
operation has a total deadline and a cap on the bytes it reads
(bounded_redis.py), and any connection problem, timeout or oversized reply
turns it off for the rest of the process with a single warning; the job goes
on with the local directory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import CacheWarning
from ..safe_io import RefusedFile, atomic_write, read_regular_file
from .bounded_redis import Budget, bounded_class
from .entry import MAX_BYTES
from .identity import KEY_RE

REDIS_PREFIX = "mixerc:autotune:1:"
# Total time for one remote operation (connect and handshake included), not
# per socket read: a server that trickles its reply cannot stall a job longer.
REDIS_TIMEOUT_S = 1.0
REDIS_LIST_TIMEOUT_S = 10.0      # a whole listing (`mixerc cache ls/clear --remote`)
# Bytes one operation may receive: an entry is at most MAX_BYTES (GETRANGE caps
# what an honest server sends), plus room for the handshake and framing. A
# larger reply is refused before it is read.
REDIS_REPLY_BYTES = MAX_BYTES + (64 << 10)
REDIS_SCAN_REPLY_BYTES = 1 << 20  # per SCAN reply (~1000 keys of ~90 bytes)


def warn(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


def default_dir() -> Path:
    root = os.environ.get("MIXERC_CACHE_DIR")
    if not root:
        import platformdirs
        root = platformdirs.user_cache_dir("mixerc")
    return Path(root).expanduser() / "autotune"


class LocalDir:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_dir()

    def __repr__(self) -> str:
        return f"LocalDir({str(self.root)!r})"

    def path(self, key: str) -> Path:
        assert KEY_RE.match(key), key  # keys are hex digests: never a path
        return self.root / f"{key}.json"

    def lock(self, key: str, what: str = "entry", timeout: float = 30.0) -> "Lock":
        return Lock(self.root / ".locks" / f"{key}.{what}.lock", timeout)

    def get(self, key: str) -> bytes | None:
        # a FIFO or device planted at the path would block or never end: refused
        try:
            return read_regular_file(self.path(key), MAX_BYTES)
        except RefusedFile as e:
            warn(f"ignoring a bad autotune cache entry {key[:12]} in {self.root}: {e}")
            return None
        except OSError as e:
            warn(f"cannot read autotune cache file {self.path(key)}: {e}")
            return None

    def put(self, key: str, data: bytes) -> bool:
        """Write-to-temp then os.replace: readers see the old file or the new one;
        the file is readable by whoever shares the directory."""
        try:
            atomic_write(self.path(key), data, fsync=True)
            return True
        except OSError as e:
            warn(f"cannot write autotune cache under {self.root}: {e}")
            return False

    def keys(self) -> list:
        if not self.root.is_dir():
            return []
        return sorted(p.name[:-5] for p in self.root.iterdir()
                      if p.name.endswith(".json") and KEY_RE.match(p.name[:-5]))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


class Lock:
    """A FileLock that degrades to no lock (with a warning) where the directory
    cannot hold lock files (read-only or broken): a cache never stops a job.
    Timeout still propagates, so callers can choose to go on without it."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout
        self._lock, self.held = None, False

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.path), timeout=self.timeout)
            self._lock.acquire()
            self.held = True
        except Timeout:
            raise
        except OSError as e:
            warn(f"cannot lock {self.path} ({e}); going on without the lock")

    def release(self) -> None:
        if self.held:
            self.held = False
            self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


_remote_warned = False
_down_urls: set = set()  # a Redis that failed once stays off for this process: no 1 s stalls per call


def _warn_remote_once(message: str) -> None:
    # one warning per process: a dead Redis must not flood a training log
    global _remote_warned
    if not _remote_warned:
        _remote_warned = True
        warn(message)


class RedisRemote:
    """MIXERC_REMOTE_CACHE=redis://[user:password@]host:port/db (rediss:// for TLS)."""

    def __init__(self, url: str):
        self.url = url
        self._client = None
        self._budget = Budget()

    @property
    def down(self) -> bool:
        return self.url in _down_urls

    def __repr__(self) -> str:
        return f"RedisRemote({_redact(self.url)!r})"

    def _connect(self):
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.connection import Connection, parse_url
            from redis.retry import Retry

            # the URL's own connection class (TCP, TLS, unix socket), bounded
            base = parse_url(self.url).get("connection_class", Connection)
            # no retries: one slow or dead server costs at most a timeout, once
            self._client = redis.Redis.from_url(
                self.url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0), health_check_interval=0,
                connection_class=bounded_class(base), budget=self._budget)
        return self._client

    def _call(self, what: str, fn, seconds: float = REDIS_TIMEOUT_S,
              max_bytes: int = REDIS_REPLY_BYTES):
        """fn(client) within `seconds` and `max_bytes` received in all, or None
        with Redis switched off on any failure to talk to it."""
        if self.down:
            return None
        try:
            client = self._connect()  # imports and setup: no network, outside the deadline
            with self._budget.operation(seconds, max_bytes):
                return fn(client)
        except ImportError:
            _down_urls.add(self.url)
            _warn_remote_once("MIXERC_REMOTE_CACHE is set but the `redis` package is missing "
                              "(pip install 'mixerc[redis]'); using the local cache only")
        except Exception as e:
            import redis
            if isinstance(e, redis.exceptions.ResponseError):  # the server answered: a data problem
                warn(f"autotune cache: Redis refused {what}: {str(e)[:100]}")
                return None
            _down_urls.add(self.url)
            _warn_remote_once(f"autotune cache: Redis at {_redact(self.url)} is unavailable "
                              f"({type(e).__name__}: {str(e)[:100]}); using the local cache only")
        return None

    def get(self, key: str) -> bytes | None:
        # GETRANGE caps what an oversized value can make us read; b"" means no key
        raw = self._call("a read", lambda c: c.getrange(REDIS_PREFIX + key, 0, MAX_BYTES))
        return raw or None

    def put(self, key: str, data: bytes) -> bool:
        return bool(self._call("a write", lambda c: c.set(REDIS_PREFIX + key, data)))

    def keys(self, limit: int = 100_000) -> list:
        """At most `limit` keys, in REDIS_LIST_TIMEOUT_S, each SCAN reply capped."""
        def scan(c):
            out, cursor = set(), 0
            while True:
                self._budget.refill(REDIS_SCAN_REPLY_BYTES)
                cursor, batch = c.scan(cursor, match=REDIS_PREFIX + "*", count=1000)
                for k in batch:
                    k = k.decode("ascii", "replace")[len(REDIS_PREFIX):] \
                        if isinstance(k, bytes) else ""
                    if KEY_RE.match(k):
                        out.add(k)
                if cursor == 0 or len(out) >= limit:
                    return sorted(out)[:limit]
        return self._call("a listing", scan, seconds=REDIS_LIST_TIMEOUT_S) or []

    def delete(self, key: str) -> None:
        self._call("a delete", lambda c: c.delete(REDIS_PREFIX + key))


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def remote_from_env() -> RedisRemote | None:
    url = os.environ.get("MIXERC_REMOTE_CACHE", "").strip()
    if not url:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        _warn_remote_once(f"MIXERC_REMOTE_CACHE={_redact(url)!r} is not a redis:// URL; "
                          "using the local cache only")
        return None
    return RedisRemote(url)


__all__ = ["CacheWarning", "LocalDir", "RedisRemote", "remote_from_env", "default_dir", "Timeout"]
