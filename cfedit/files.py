"""Reading and writing files safely: bounded reads of regular files, atomic writes, writable checks.

Every file cfedit reads from a user (graph, image, checkpoint, label file) goes through
:func:`read_regular`, so a FIFO, ``/dev/zero`` or a huge file is refused before a byte is read;
every file it writes goes through :func:`atomic_write_bytes`, so a crash never leaves half of one.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from cfedit.errors import CfeditError, DestinationError

#: Bytes written (and removed) by :func:`check_writable` to find a full disk before a long run.
PROBE_BYTES = 1 << 20


def human_size(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if n < 1024:
        return f"{n} bytes"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "something other than a file"


def open_regular(path: str | Path, limit: int, error: type[CfeditError], what: str) -> BinaryIO:
    """Open a regular file of at most ``limit`` bytes for reading, or raise ``error`` naming it.

    The type is checked before opening (opening a FIFO blocks; a device never ends) and again on the
    open descriptor, in case the path was swapped in between.
    """
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            f = os.fdopen(fd, "rb")
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
                return f
            f.close()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    except ValueError:  # a NUL byte in the name
        raise error(f"{path!r}: not a usable file name") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is {_kind(st.st_mode)}, not a regular file (expected a {what})")
    raise error(f"{path}: {what} of {st.st_size:,} bytes is over the limit of {human_size(limit)}")


def read_regular(path: str | Path, limit: int, error: type[CfeditError], what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    with open_regular(path, limit, error, what) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(data) > limit:  # it grew after the check
        raise error(f"{path}: {what} is over the limit of {human_size(limit)}")
    return data


def read_text(path: str | Path, limit: int, error: type[CfeditError], what: str, source: str | None = None) -> str:
    """The UTF-8 text (a BOM dropped) of a regular file of at most ``limit`` bytes; a file that is not
    UTF-8 is refused naming the line, the byte and its offset. ``source`` names the file in errors."""
    data = read_regular(path, limit, error, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{source or path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    f"save the {what} as UTF-8") from None


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write a file so that a reader (or a crash) never sees half of it: temp file + rename.

    ``durable`` also flushes the data to the disk before the rename (a few ms per file); a writer of
    thousands of small files that are listed by a durable index written last may skip it. An error
    names ``path`` itself, not the temp file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path, what: str = "output") -> None:
    """Refuse, before a long run, a destination its final write would fail on.

    ``path`` may not be a folder; its folder is created if missing and must take a probe file of
    :data:`PROBE_BYTES` (removed again), which finds a read-only or an already full disk. A disk that
    fills up during the run still fails at the write, atomically.
    """
    path = Path(path)
    if path.is_dir():
        raise DestinationError(f"{path}: is a folder; the {what} must be a file path")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as e:
        where = folder if e.filename is None or str(e.filename).endswith(".probe") else e.filename
        raise DestinationError(f"{where}: cannot write the {what} there ({e.strerror})") from None
