"""The in-sandbox launcher: join the task's network namespace, make private UTS and mount
namespaces, set the hostname, bind the task's resolv.conf and hosts, then exec the command.

    python -m swarmnet.runtime.enter --netns NAME --hostname H --resolv FILE --hosts FILE -- ARGV...

It is a separate, tiny process (rather than a ``preexec_fn`` in the agent) because
``preexec_fn`` is unsafe in a threaded program such as the agent, and because a failure here
must be reported as data: one line on stderr (the task's output.log) and exit status 127,
which the supervisor turns into the task's error text.

Python 3.11 has no ``os.setns``/``os.unshare``, so the syscalls go through ctypes on libc.
The environment is prepared by the caller (the supervisor) and passed to the command as is.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import sys
from typing import NoReturn

NETNS_DIR = "/run/netns"  # where `ip netns add` (and our overlay reconciler) pins namespaces

# <linux/sched.h> and <linux/mount.h>; stable kernel ABI.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

EXIT_SETUP_FAILED = 127  # like a shell's "command not found": the command never ran


class EnterError(Exception):
    """A sandbox setup step failed; the message is the one line printed to stderr."""


def exec_argv(pid: int, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` inside the sandbox of the running task whose
    process is ``pid`` (its network, UTS and mount namespaces), like ``docker exec``.

    ``swarmnet exec TASK -- CMD`` resolves TASK to the pid and runs this."""
    if pid <= 0:
        raise ValueError(f"invalid pid {pid}")
    if not argv:
        raise ValueError("empty command")
    return ["nsenter", "-t", str(pid), "-n", "-u", "-m", "--", *argv]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise EnterError(f"{what}: {os.strerror(err)}")


def setup_sandbox(netns: str, hostname: str, resolv: str, hosts: str) -> None:
    """Move the calling process into the task's sandbox. The order matters: the network
    namespace first (setns to a netns is allowed only before we drop anything), then new
    UTS and mount namespaces, then mount propagation to private so that our bind mounts
    never leak back into the host's mount namespace."""
    libc = _libc()
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

    if not netns or "/" in netns or netns in (".", ".."):
        raise EnterError(f"netns {netns!r}: invalid name")
    path = os.path.join(NETNS_DIR, netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise EnterError(f"netns {netns}: {e.strerror}") from None
    try:
        _check(libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
    finally:
        os.close(fd)

    _check(libc.unshare(CLONE_NEWUTS | CLONE_NEWNS), "unshare uts+mount namespaces")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")

    name = hostname.encode()
    _check(libc.sethostname(name, len(name)), f"sethostname {hostname!r}")

    # Like `ip netns exec`: a fresh sysfs so /sys/class/net shows the task's interfaces,
    # not the host's. Best effort (some tools read it, none of ours need it).
    if libc.umount2(b"/sys", MNT_DETACH) == 0:
        libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None)

    for src, dst in ((resolv, "/etc/resolv.conf"), (hosts, "/etc/hosts")):
        _check(
            libc.mount(src.encode(), dst.encode(), None, MS_BIND, None),
            f"bind {src} on {dst}",
        )


def _fail(msg: str) -> NoReturn:
    print(f"swarmnet: {msg}", file=sys.stderr, flush=True)
    os._exit(EXIT_SETUP_FAILED)


def _parse(argv: list[str]) -> argparse.Namespace:
    # Split at the first "--" ourselves: everything after it is the task's command, verbatim
    # (argparse's REMAINDER handling of "--" differs between Python versions).
    if "--" not in argv:
        _fail("usage: enter --netns NAME --hostname H --resolv FILE --hosts FILE -- ARGV...")
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="swarmnet.runtime.enter")
    p.add_argument("--netns", required=True)
    p.add_argument("--hostname", required=True)
    p.add_argument("--resolv", required=True)
    p.add_argument("--hosts", required=True)
    ns = p.parse_args(argv[:i])
    ns.argv = argv[i + 1 :]
    if not ns.argv:
        _fail("no command given after --")
    return ns


def main(argv: list[str] | None = None) -> NoReturn:
    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
    except SystemExit:  # argparse already printed why; keep the one exit status
        os._exit(EXIT_SETUP_FAILED)
    try:
        setup_sandbox(args.netns, args.hostname, args.resolv, args.hosts)
    except EnterError as e:
        _fail(str(e))
    # Python ignores SIGPIPE and SIGXFSZ at startup, and ignored signals survive exec:
    # restore the defaults so the task behaves as if started by a shell (`yes | head`).
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    cmd = args.argv
    try:
        os.execvpe(cmd[0], cmd, os.environ)
    except FileNotFoundError:
        _fail(f"exec {cmd[0]}: not found")
    except OSError as e:
        _fail(f"exec {cmd[0]}: {e.strerror}")


if __name__ == "__main__":
    main()
