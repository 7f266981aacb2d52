"""Network namespaces without fork.

pyroute2 creates namespaces and opens sockets in them from a forked child process. In the
agent that is fatal: the child inherits the event loop's signal wakeup fd, and when pyroute2
then SIGTERMs its child, the child's inherited handler writes SIGTERM into that shared fd and
the AGENT shuts down (seen in the lab: agents stopping 1-10 s after start). So we do it the
way iproute2 does, on the calling thread: a network namespace is per thread, so a thread
can setns() into a namespace, open a socket there (the socket keeps its namespace for
life), and setns() back; unshare(CLONE_NEWNET) + a bind mount creates a named one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with THIS thread in network namespace ``name``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)  # if this fails the thread is in the wrong namespace: let it raise
    finally:
        os.close(own)


def _ensure_run_dir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does, so that namespace
    mounts made here are visible in every mount namespace (and removable from them)."""
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    d = NETNS_RUN_DIR.encode()
    if _libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), "bind /run/netns")
    _check(_libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None), "share /run/netns")


def create(name: str) -> None:
    """Create the named network namespace /run/netns/NAME (EEXIST if it exists)."""
    _ensure_run_dir()
    path = os.path.join(NETNS_RUN_DIR, name)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare")
            try:
                src = f"/proc/self/task/{_gettid()}/ns/net".encode()
                _check(_libc.mount(src, path.encode(), b"none", MS_BIND, None), "bind netns")
            finally:
                _setns(own)
        except BaseException:
            _libc.umount2(path.encode(), MNT_DETACH)
            os.unlink(path)
            raise
    finally:
        os.close(own)


def remove(name: str) -> None:
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise OSError(errno.ENOENT, f"no netns {name!r}")
    _libc.umount2(path.encode(), MNT_DETACH)
    os.unlink(path)


def _gettid() -> int:
    return threading.get_native_id()
