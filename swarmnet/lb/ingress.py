"""The routing mesh's host-side plumbing: what the ingress path needs besides nftables.

KERNEL BOUNDARY for the two sysctls the mesh needs (``ip_forward`` in the host namespace and
in the ingress sandbox). /proc/sys/net is per network namespace and resolved at open() from
the opening thread's namespace, so ``nsutil.in_netns`` on the calling thread is enough.
"""

from __future__ import annotations

from ..kernel import nsutil


def enable_forwarding(netns: str | None) -> None:
    """``net.ipv4.ip_forward=1`` in ``netns`` (None: the caller's namespace). Idempotent."""
    path = "/proc/sys/net/ipv4/ip_forward"
    if netns is None:
        _write_if_differs(path, "1")
        return
    with nsutil.in_netns(netns):
        _write_if_differs(path, "1")


def _write_if_differs(path: str, value: str) -> None:
    with open(path) as f:
        if f.read().strip() == value:
            return
    with open(path, "w") as f:
        f.write(value)
