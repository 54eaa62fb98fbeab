"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every writer in the package goes through here (results, manifests, engines, bundles,
spool files), so crash safety is one piece of code: write to a temporary name in the
same directory, flush and fsync, rename over the target, then fsync the directory so the
rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: str | Path) -> None:
    """Make a rename/creation inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, durable: bool = True) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`.

    On an exception the temporary file is removed and `path` is untouched.
    `durable=False` skips the fsyncs (caches that may be rebuilt).
    """
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode) as fh:
        yield fh


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    """Write UTF-8 `text` to `path` atomically; returns `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def created_mode(directory: bool = False) -> int:
    """Permissions a file (or directory) created normally gets: 0666 (0777) less the umask.
    mkstemp/mkdtemp make private ones; renamed into place, they must not stay private."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """A temporary sibling path for a library that writes files itself (ONNX Runtime,
    torch.onnx); on success it replaces `path`, on an exception it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); the result gets the permissions of a file
        # created normally (0666 less the umask), or keeps those of the file it replaces.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else created_mode())
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
