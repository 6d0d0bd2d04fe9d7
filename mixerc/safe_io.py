"""Reading files that other people can put in place (shared cache dirs).

A plain `open()` blocks forever on a named pipe (FIFO) with no writer, and
reading /dev/zero or a huge file never ends or exhausts memory. Callers that
read untrusted paths use `read_regular_file`, which never blocks on an open,
refuses anything that is not a regular file and never reads more than a bound.

No imports of other mixerc modules: generated-code and autotune caches both
use it.
"""

from __future__ import annotations

import os
import stat

# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer.
# O_NOCTTY: opening a terminal never makes it our controlling terminal.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


class RefusedFile(OSError):
    """The path exists but is not a regular file of an acceptable size."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check(path, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile(f"{path} is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise RefusedFile(f"{path} is {st.st_size} bytes (limit {max_bytes})")


def read_regular_file(path, max_bytes: int) -> bytes | None:
    """The bytes of the regular file at `path` (symlinks followed), or None if
    nothing is there. Raises RefusedFile (an OSError) for a directory, FIFO,
    device or socket, or a file over `max_bytes`; other OSErrors (permissions)
    pass through. Never blocks on opening and reads at most max_bytes + 1."""
    try:
        # stat first: a device or FIFO is refused without ever being opened
        _check(path, os.stat(path), max_bytes)
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    try:
        _check(path, os.fstat(fd), max_bytes)  # the file opened is the one checked
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > max_bytes:  # it grew after the fstat
        raise RefusedFile(f"{path} is over {max_bytes} bytes")
    return b"".join(chunks)


def atomic_write(path, data: bytes, fsync: bool = False) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`:
    readers see the old file or the new one. The file is created with mode
    0666 less the umask (not mkstemp's 0600), so a team sharing the directory
    can read what one member wrote."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


__all__ = ["RefusedFile", "read_regular_file", "atomic_write"]
