"""mixerc.safe_io.read_regular_file: reads regular files only, never blocks on
a named pipe or device, never reads past its bound."""

import os
import socket
import threading
import time

import pytest

from mixerc.safe_io import RefusedFile, read_regular_file

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")


def quick(fn, *args, limit=2.0):
    """fn(*args) in a daemon thread; fails (instead of hanging the suite) if it
    has not returned after `limit` seconds."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"{fn.__name__} still blocked after {limit} s"
    out["seconds"] = time.monotonic() - start
    return out


def test_regular_file_is_read_whole(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b"x" * 1000)
    assert read_regular_file(p, 1000) == b"x" * 1000
    assert read_regular_file(str(p), 5000) == b"x" * 1000
    (tmp_path / "empty").write_bytes(b"")
    assert read_regular_file(tmp_path / "empty", 10) == b""


def test_missing_file_is_none(tmp_path):
    assert read_regular_file(tmp_path / "nothing.json", 10) is None


def test_oversized_file_is_refused(tmp_path):
    p = tmp_path / "big"
    p.write_bytes(b"x" * 1001)
    with pytest.raises(RefusedFile, match="1001 bytes"):
        read_regular_file(p, 1000)


def test_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "entry.json"
    os.mkfifo(fifo)
    r = quick(read_regular_file, fifo, 1000)
    assert isinstance(r.get("error"), RefusedFile) and "named pipe" in str(r["error"])


def test_symlink_to_a_named_pipe_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link.json").symlink_to(tmp_path / "pipe")
    r = quick(read_regular_file, tmp_path / "link.json", 1000)
    assert isinstance(r.get("error"), RefusedFile), r


def test_symlink_to_a_regular_file_is_followed(tmp_path):
    (tmp_path / "real").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_regular_file(tmp_path / "link", 100) == b"data"


def test_directory_is_refused(tmp_path):
    with pytest.raises(RefusedFile, match="directory"):
        read_regular_file(tmp_path, 1000)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_character_device_is_refused():
    r = quick(read_regular_file, "/dev/zero", 1000)
    assert isinstance(r.get("error"), RefusedFile) and "character device" in str(r["error"])


def test_unix_socket_is_refused(tmp_path):
    path = tmp_path / "s.json"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        with pytest.raises(RefusedFile, match="socket"):
            read_regular_file(path, 1000)
    finally:
        s.close()


def test_refusal_is_an_oserror_so_callers_degrade_like_any_read_error(tmp_path):
    os.mkfifo(tmp_path / "p")
    with pytest.raises(OSError):
        read_regular_file(tmp_path / "p", 10)
