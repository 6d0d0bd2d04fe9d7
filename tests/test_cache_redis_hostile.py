"""The Redis layer against a hostile server: a fake Redis written here (a
socket server thread on 127.0.0.1 speaking enough RESP for redis-py) that
trickles its replies or announces gigabyte-sized ones. Every remote operation
must end within its total deadline and never read more than its byte cap;
Redis is then switched off with one warning and the job goes on locally."""

import socket
import threading
import time
import tracemalloc
import warnings

import pytest
from test_autotune_toy import SleepProblem, isolated_cache  # noqa: F401
from test_safe_io import quick

from mixerc.autotune import backends, lookup, tune
from mixerc.autotune.backends import REDIS_PREFIX, CacheWarning, RedisRemote
from mixerc.autotune.cache import Cache

pytest.importorskip("redis")

GIB = 1 << 30
FAKE_KEY = (REDIS_PREFIX + "ab" * 32).encode()


class FakeRedis:
    """Answers every command +OK, except HELLO and those in `handlers` (command
    name -> fn(args, send) that writes the reply). Records the commands seen."""

    def __init__(self, handlers: dict, unix_path=None):
        # redis-py 8 opens with HELLO 3 and wants a RESP3 map back
        self.handlers = {"HELLO": lambda a, send: send(b"%1\r\n$5\r\nproto\r\n:3\r\n"),
                         **handlers}
        self.commands: list = []
        self.sent = 0
        self.stopped = threading.Event()
        if unix_path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        else:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(str(unix_path))
            self.listener.listen()
            self.url = f"unix://{unix_path}"
        self.conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        f = conn.makefile("rb")

        def send(data: bytes):
            if self.stopped.is_set():
                raise OSError("stopped")
            conn.sendall(data)
            self.sent += len(data)
        try:
            while True:
                line = f.readline()
                if not line.startswith(b"*"):
                    return
                args = []
                for _ in range(int(line[1:])):
                    n = int(f.readline()[1:])
                    args.append(f.read(n + 2)[:-2])
                name = args[0].upper().decode()
                self.commands.append(name)
                self.handlers.get(name, lambda a, s: s(b"+OK\r\n"))(args, send)
        except OSError:
            return  # the client gave up (the point of these tests) or we stopped
        finally:
            conn.close()

    def stop(self):
        self.stopped.set()
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def trickle(args, send):
    """A reply that never ends: one byte every half second."""
    send(b"$100\r\n")
    while True:
        send(b"x")
        time.sleep(0.5)


def huge_bulk(args, send, limit=64 << 20):
    """Announces a 1 GiB value and streams it (stopping at 64 MiB, so that the
    test also ends quickly on code that reads replies whole)."""
    send(b"$%d\r\n" % GIB)
    chunk = b"\0" * (64 << 10)
    for _ in range(limit // len(chunk)):
        send(chunk)


def huge_scan(args, send, limit=64 << 20):
    """A SCAN reply announcing 100 million valid-looking keys."""
    send(b"*2\r\n$1\r\n0\r\n*100000000\r\n")
    item = b"$%d\r\n%s\r\n" % (len(FAKE_KEY), FAKE_KEY)
    chunk = item * 1000
    for _ in range(limit // len(chunk)):
        send(chunk)


def endless_cursor(args, send):
    """SCAN that never says it is done (cursor never 0), one quick reply each."""
    send(b"*2\r\n$1\r\n7\r\n*1\r\n$%d\r\n%s\r\n" % (len(FAKE_KEY), FAKE_KEY))


@pytest.fixture
def fake(monkeypatch):
    servers = []

    def start(unix_path=None, **handlers):
        s = FakeRedis(handlers, unix_path)
        servers.append(s)
        monkeypatch.setenv("MIXERC_REMOTE_CACHE", s.url)
        return s
    yield start
    for s in servers:
        s.stop()


def _cache_warnings(record) -> list:
    return [str(w.message) for w in record if issubclass(w.category, CacheWarning)]


def _lookup_then_tune(server):
    """lookup (Redis answers badly) then tune: returns (seconds of the lookup,
    the tune result, the warnings) and checks Redis was not asked again."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = quick(lookup, SleepProblem(fastest=128), limit=6)
        asked = len(server.commands)
        result = tune(SleepProblem(fastest=128))
    assert r.get("error") is None and r["value"] is None, r
    assert len(server.commands) == asked   # switched off: the tuning ran locally
    return r["seconds"], result, _cache_warnings(record)


def test_fake_server_speaks_enough_resp_for_redis_py(fake):
    """Guard for the tests below: an honest fake is used and answers."""
    s = fake(GETRANGE=lambda a, send: send(b"$0\r\n\r\n"))
    assert RedisRemote(s.url).get("ab" * 32) is None
    assert "GETRANGE" in s.commands and not backends._down_urls


def test_a_trickling_reply_ends_at_the_deadline_and_the_job_goes_on(fake):
    s = fake(GETRANGE=trickle)
    seconds, result, msgs = _lookup_then_tune(s)
    assert seconds < backends.REDIS_TIMEOUT_S + 1.5, seconds
    assert result.benchmarks_run == 4 and result.best == {"M.chunk": 128}
    assert len(msgs) == 1 and "unavailable" in msgs[0] and "Timeout" in msgs[0], msgs
    assert lookup(SleepProblem(fastest=128)) == {"M.chunk": 128}   # from the local cache


def test_a_trickling_handshake_ends_at_the_deadline(fake):
    s = fake(CLIENT=trickle)
    seconds, result, msgs = _lookup_then_tune(s)
    assert seconds < backends.REDIS_TIMEOUT_S + 1.5, seconds
    assert result.benchmarks_run == 4 and len(msgs) == 1, msgs


def test_a_gigabyte_reply_is_refused_without_reading_it(fake):
    s = fake(GETRANGE=huge_bulk)
    tracemalloc.start()
    try:
        seconds, result, msgs = _lookup_then_tune(s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"
    assert seconds < 3, seconds
    assert result.benchmarks_run == 4
    assert len(msgs) == 1 and "reply over" in msgs[0], msgs


def test_a_huge_scan_reply_is_refused(fake):
    s = fake(SCAN=huge_scan)
    tracemalloc.start()
    try:
        with pytest.warns(CacheWarning, match="reply over"):
            r = quick(lambda: Cache.from_env().remote.keys(limit=10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r["value"] == [] and peak < 32 << 20, (r, peak >> 20)
    assert s.commands.count("SCAN") == 1


def test_a_scan_that_never_ends_stops_at_the_listing_deadline(fake, monkeypatch):
    monkeypatch.setattr(backends, "REDIS_LIST_TIMEOUT_S", 1.0, raising=False)
    s = fake(SCAN=endless_cursor)
    with pytest.warns(CacheWarning, match="unavailable"):
        r = quick(Cache.from_env().remote.keys, limit=6)  # the default limit
    assert r["value"] == [] and r["seconds"] < 3, r
    assert s.commands.count("SCAN") > 10   # it did list, until the deadline


def test_a_listing_keeps_at_most_limit_keys(fake):
    def many(args, send):  # honest-looking: 1000 new keys per reply, forever
        n = int(args[1])
        keys = [(REDIS_PREFIX + f"{n * 1000 + i:064x}").encode() for i in range(1000)]
        body = b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys)
        cursor = b"%d" % (n + 1)
        send(b"*2\r\n$%d\r\n%s\r\n*1000\r\n" % (len(cursor), cursor) + body)
    fake(SCAN=many)
    keys = Cache.from_env().remote.keys(limit=2500)
    assert len(keys) == 2500 and keys == sorted(set(keys))


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="unix sockets")
def test_a_trickling_reply_over_a_unix_socket_ends_at_the_deadline(fake, tmp_path):
    s = fake(unix_path=tmp_path / "redis.sock", GETRANGE=trickle)
    seconds, result, msgs = _lookup_then_tune(s)
    assert seconds < backends.REDIS_TIMEOUT_S + 1.5 and len(msgs) == 1, (seconds, msgs)
    assert "GETRANGE" in s.commands


def test_a_tls_server_that_never_answers_costs_one_deadline(monkeypatch):
    """rediss:// keeps its TLS connection class, bounded like the others."""
    silent = socket.create_server(("127.0.0.1", 0))   # accepts (backlog), never answers
    try:
        url = f"rediss://127.0.0.1:{silent.getsockname()[1]}/0"
        remote = RedisRemote(url)
        assert remote._connect().connection_pool.connection_class.__name__ \
            == "BoundedSSLConnection"
        with pytest.warns(CacheWarning, match="unavailable"):
            r = quick(remote.get, "ab" * 32, limit=6)
        assert r["value"] is None and r["seconds"] < backends.REDIS_TIMEOUT_S + 1.5, r
    finally:
        silent.close()
