"""redis-py connections whose every operation has a total deadline and a byte cap.

redis-py's `socket_timeout` bounds each socket read, not a command: a server
that trickles its reply (a byte every half second) keeps a command going
forever, and a reply is read whole whatever size it announces. Here a
`Budget` is armed around each remote operation (`with budget.operation(s, n)`:
a connect with its handshake, a command, a SCAN loop) and the connection's
socket is wrapped so that

  - every recv/send gets as its timeout the time left before the deadline
    (at most what redis-py asked for), so the operation as a whole ends in
    `s` seconds with redis-py's own TimeoutError;
  - receiving more than `n` bytes in the operation raises `ReplyTooLarge`
    (an OSError: redis-py turns it into a ConnectionError) before the extra
    bytes are read, so a hostile `$1073741824` reply costs at most `n` bytes.

This sits below redis-py's parsers, so it holds for the pure-Python parser
and hiredis alike. Redis's own calls (TCP connect, TLS handshake, sendall)
take one total timeout in CPython, which `_connect` caps to the time left.
Host name resolution (getaddrinfo) is the resolver's business: not bounded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class ReplyTooLarge(OSError):
    """The server sent more bytes than the operation may read."""


class Budget(threading.local):
    """What the current remote operation may still spend, per thread (each
    thread gets its own pooled connection, so its own deadline)."""

    deadline: float | None = None   # time.monotonic(); None outside an operation
    bytes_left: int | None = None
    max_bytes: int = 0

    @contextlib.contextmanager
    def operation(self, seconds: float, max_bytes: int):
        self.deadline = time.monotonic() + seconds
        self.refill(max_bytes)
        try:
            yield self
        finally:
            self.deadline = self.bytes_left = None

    def refill(self, max_bytes: int) -> None:
        """A fresh byte allowance (a listing gives one to each SCAN reply)."""
        self.bytes_left = self.max_bytes = max_bytes

    def timeout(self, wanted: float | None) -> float | None:
        """The socket timeout for the next call: `wanted` capped by the time left."""
        if self.deadline is None:
            return wanted
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the operation's deadline has passed")
        return left if wanted is None else min(wanted, left)

    def room(self, n: int) -> int:
        """How many of `n` requested bytes may be read now."""
        if self.bytes_left is None:
            return n
        if self.bytes_left <= 0:
            raise ReplyTooLarge(f"reply over {self.max_bytes} bytes: refused")
        return min(n, self.bytes_left)

    def spend(self, n: int) -> None:
        if self.bytes_left is not None:
            self.bytes_left -= n


class BoundedSocket:
    """A socket (plain or TLS) whose reads and writes obey a Budget. The
    timeout redis-py sets is remembered and applied, capped, on each call."""

    def __init__(self, sock, budget: Budget):
        self._sock, self._budget = sock, budget
        self._wanted = sock.gettimeout()

    def settimeout(self, value) -> None:
        self._wanted = value

    def gettimeout(self):
        return self._wanted

    def setblocking(self, flag: bool) -> None:
        self._wanted = None if flag else 0.0

    def _arm(self) -> None:
        self._sock.settimeout(self._budget.timeout(self._wanted))

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        peek = flags & getattr(socket, "MSG_PEEK", 0)
        n = bufsize if peek else self._budget.room(bufsize)
        self._arm()
        data = self._sock.recv(n, flags)
        if not peek:
            self._budget.spend(len(data))
        return data

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        n = self._budget.room(nbytes or memoryview(buffer).nbytes)
        self._arm()
        got = self._sock.recv_into(buffer, n, flags)
        self._budget.spend(got)
        return got

    def send(self, data, flags: int = 0) -> int:
        self._arm()
        return self._sock.send(data, flags)

    def sendall(self, data, flags: int = 0) -> None:
        self._arm()  # CPython: one total timeout for the whole sendall
        self._sock.sendall(data, flags)

    def __getattr__(self, name):  # fileno, shutdown, close, getsockname, ...
        return getattr(self._sock, name)


class _Bounded:
    """Mixin for a redis-py connection class: its socket obeys `budget`."""

    def __init__(self, *args, budget: Budget, **kwargs):
        self.budget = budget
        super().__init__(*args, **kwargs)

    def _connect(self):
        # connect() and a TLS handshake are single calls with a total timeout
        left = self.budget.timeout(None)
        saved = self.socket_connect_timeout, self.socket_timeout
        if left is not None:
            self.socket_connect_timeout = left if saved[0] is None else min(saved[0], left)
            self.socket_timeout = left if saved[1] is None else min(saved[1], left)
        try:
            sock = super()._connect()
        finally:
            self.socket_connect_timeout, self.socket_timeout = saved
        sock.settimeout(self.socket_timeout)
        return BoundedSocket(sock, self.budget)


_classes: dict = {}


def bounded_class(base: type) -> type:
    """`base` (Connection, SSLConnection, UnixDomainSocketConnection) with a
    Budget: pass `budget=` among its keyword arguments."""
    if base not in _classes:
        _classes[base] = type(f"Bounded{base.__name__}", (_Bounded, base), {})
    return _classes[base]


__all__ = ["Budget", "BoundedSocket", "ReplyTooLarge", "bounded_class"]
