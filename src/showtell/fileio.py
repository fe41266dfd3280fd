"""Atomic file writes (a reader never sees a half-written checkpoint, cache or results file), a check that a file
can be written before long work, file names as printable text, and file hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from showtell.errors import ShowtellError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(path: str | os.PathLike, replace: bool = False) -> None:
    """Raise a one-line ShowtellError unless ``path`` can be written, before any long work; creates nothing.

    ``replace``: the file will be replaced by a rename (``atomic_path``), so its folder must take a new file;
    otherwise an existing file is written in place and only it must be writable."""
    p = Path(path)
    try:
        if p.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if p.exists() and not replace:
            open(p, "ab").close()  # appending nothing changes nothing
        else:
            tempfile.TemporaryFile(dir=p.parent).close()
    except OSError as e:
        raise ShowtellError(f"{path}: cannot write ({e.strerror})") from None


def display_name(text: str) -> str:
    """``text`` (a file name or a message holding one) as valid Unicode: the bytes of a name that are not UTF-8,
    which Python holds as lone surrogates (U+DC80-U+DCFF, PEP 383), become ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # some other lone surrogate: not from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
