"""Knowing when the manifest directory changed, without reading it: inotify, else a stat poll.

``cloud-connector run`` shares its process with the proxy, so finding out whether anything changed
must cost next to nothing while nothing does. On Linux the kernel tells us (inotify, through
ctypes: no dependency), for DIR and every visible subdirectory; elsewhere, or when inotify is
unavailable (no free watches, DIR missing), a poll compares a :func:`signature` of names, inodes,
sizes and modification times. Either way the caller then compares signatures, computed off the
event loop, before it reads any file: an event says "maybe", the signature says "yes".
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import struct
import sys
import time
from pathlib import Path

from cloudconnector.standalone.manifests import manifest_files

logger = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int, int], ...]

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

QUIET = 0.1  # after an event, wait this long for more (an editor's or tool's burst of writes)
QUIET_LIMIT = 1.0  # but never longer than this in all


def signature(directory: Path) -> Signature:
    """What :func:`manifest_files` would read, by name, inode, size and mtime: no file is opened."""
    out = []
    for path in manifest_files(directory) if directory.is_dir() else ():
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


class DirWatch:
    """Wake the caller when DIR may have changed; :meth:`wait` never reads a manifest."""

    def __init__(self, directory: Path, poll: float) -> None:
        self.directory = directory
        self.poll = poll
        self._libc = _libc()
        self._fd: int | None = None
        self._dirs: dict[int, Path] = {}  # watch descriptor -> directory
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def mode(self) -> str:
        return "inotify" if self._fd is not None else "poll"

    def arm(self) -> None:
        """Start watching DIR if not already (again after DIR was removed and re-created)."""
        if self._fd is not None or self._libc is None or not self.directory.is_dir():
            return
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            logger.warning("inotify unavailable (%s): checking %s by polling", _errno(), self.directory)
            self._libc = None
            return
        self._fd = fd
        try:
            self._watch_tree(self.directory)
        except OSError as e:  # typically fs.inotify.max_user_watches reached
            logger.warning("cannot watch %s (%s): checking it by polling", self.directory, e)
            self.close()
            self._libc = None
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def close(self) -> None:
        if self._fd is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None
        self._dirs.clear()

    async def wait(self, within: float) -> bool:
        """Return True once DIR may have changed (settled: no event for :data:`QUIET`), or False
        after ``within`` seconds. Polling mode returns True every ``poll`` seconds."""
        within = max(0.0, within)
        if self._fd is None:
            await asyncio.sleep(min(within, self.poll))
            return within >= self.poll
        if not self._event.is_set():
            try:
                await asyncio.wait_for(self._event.wait(), within)
            except TimeoutError:
                return False
        end = time.monotonic() + QUIET_LIMIT
        while self._event.is_set() and time.monotonic() < end:
            self._event.clear()
            await asyncio.sleep(QUIET)
        self._event.clear()
        return True

    def _watch_tree(self, top: Path) -> None:
        assert self._libc is not None and self._fd is not None
        for root, dirs, _files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # as manifest_files skips them
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(root), _MASK)
            if wd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            self._dirs[wd] = Path(root)

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as e:
            logger.warning("inotify read failed (%s): checking %s by polling", e, self.directory)
            self.close()
            self._event.set()
            return
        self._event.set()
        offset = 0
        lost_root = False
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            parent = self._dirs.get(wd)
            if mask & IN_IGNORED:
                self._dirs.pop(wd, None)
                lost_root = lost_root or parent == self.directory
            elif mask & (IN_DELETE_SELF | IN_MOVE_SELF) and parent == self.directory:
                lost_root = True
            elif mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and parent is not None:
                child = os.fsdecode(name)
                if not child.startswith("."):
                    # Gone again already, or out of watches: the signature still tells.
                    with contextlib.suppress(OSError):
                        self._watch_tree(parent / child)
        if lost_root:
            # DIR itself went away: poll until it is back, then watch the new one.
            self.close()


def _errno() -> str:
    return os.strerror(ctypes.get_errno())
