"""Files of the pcap directory (``POST /pcap``), opened by descriptor.

:func:`open_inside` resolves a client's path below the directory without following any
symbolic link there, opens the file without waiting (a FIFO cannot block), and keeps it only
if it is a regular file that starts like a capture. The descriptor it returns is what the
job reads later: what the name points to by then changes nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from agent.sources import SourceError
from agent.sources.files.capstream import Capture, kind_of

__all__ = ["PathRefused", "open_inside"]


class PathRefused(Exception):
    """A ``POST /pcap`` path that is not taken, with the HTTP ``status`` that says why: 403
    outside the pcap directory or through a symbolic link, 404 no such file, 409 the pcap
    directory itself is gone, 422 not a regular capture file."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_inside(root: Path, path: str) -> Capture:
    """The capture file ``path`` names (relative to ``root``, or absolute below it), open.

    Opened by descriptor: each component below ``root`` relative to its parent's descriptor,
    with ``O_NOFOLLOW`` (a symbolic link below ``root`` is refused, not followed); the file
    with ``O_NONBLOCK`` (a FIFO cannot block) and kept only if it is a regular file whose
    header is a capture's. ``root`` must be a real path (:func:`os.path.realpath`); the
    capture is called by its real path. Raises :class:`PathRefused`."""
    parts = _below(root, path)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise PathRefused(409, f"the pcap directory {root} cannot be opened: {e.strerror}"
                          ) from None
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                new = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise _refusal(e, fd, name, path) from None
            os.close(fd)
            fd = new
        if not parts:
            raise PathRefused(422, f"not a regular file: {path} (the pcap directory itself)")
        held, fd = fd, -1
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return Capture.from_fd(held, root.joinpath(*parts), regular=True)
    except SourceError as e:
        raise PathRefused(422, str(e)) from None


def _below(root: Path, path: str) -> list[str]:
    """The components of ``path`` below ``root``, ``..`` taken lexically (nothing below
    ``root`` is a link that could make that wrong: links are refused); an absolute path may
    reach ``root`` through links above it. PathRefused (403) if it is not below ``root``."""
    if "\0" in path:
        raise PathRefused(403, "path contains a NUL byte")
    full = os.path.normpath(os.path.join(root, path))
    top = str(root)
    if os.path.commonpath([top, full]) != top:
        head = os.path.dirname(full)
        while os.path.realpath(head) != top:
            if head == os.path.dirname(head):
                raise PathRefused(403, f"{path!r} is outside the pcap directory")
            head = os.path.dirname(head)
        top = head
    rel = os.path.relpath(full, top)
    return [] if rel == "." else rel.split(os.sep)


def _refusal(e: OSError, dir_fd: int, name: str, path: str) -> PathRefused:
    """Why opening ``name`` in ``dir_fd`` (a component of ``path``) failed, as a refusal."""
    try:
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return PathRefused(403, f"{path!r}: {name!r} is a symbolic link, which is not "
                                "followed here")
    if e.errno == errno.ENOENT:
        return PathRefused(404, f"no such file: {path}")
    if e.errno == errno.ENOTDIR:
        return PathRefused(404, f"no such file: {path} ({name!r} is not a directory)")
    if e.errno == errno.ENXIO and mode:
        return PathRefused(422, f"not a regular file: {path} ({kind_of(mode)})")
    return PathRefused(422, f"cannot open {path}: {e.strerror}")
