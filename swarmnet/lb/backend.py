"""The load-balancer backend interface, the sync logic every backend shares, and the choice
between IPVS and nftables.

A backend owns the LB objects of ONE network namespace (``netns=None``: the caller's own).
The caller keeps the desired ``LBState`` and calls ``sync(state)`` whenever it changes
(level-triggered, like kube-proxy's ``syncProxyRules``): the backend applies the difference
with what it last applied, in one transaction where the kernel allows it. After any failure
the backend forgets what it applied, so the next ``sync`` is a full sync that replaces
everything it owns: a crash half-way is repaired by the next pass (DESIGN principle 2).
"""

from __future__ import annotations

import os
import subprocess
from typing import Literal, Protocol

from .plan import LBChanges, LBState, diff

Prefer = Literal["auto", "ipvs", "nft"]
IPVS_PROC = "/proc/net/ip_vs"


class LBBackend(Protocol):
    name: str  # "nft", "ipvs" or "fake"

    def sync(self, state: LBState) -> LBChanges:
        """Make the kernel hold ``state``, touching only what changed since the last sync
        (the first sync, and the first after a failure, is a full sync). Returns what was
        changed. Raises ``KernelError`` on failure."""
        ...

    def full_sync(self, state: LBState) -> None:
        """Replace everything this backend owns with ``state`` (recovery, startup)."""
        ...

    def dump(self) -> LBState:
        """What the kernel holds now, read back from it (not from memory)."""
        ...

    def close(self) -> None:
        """Release handles. Leaves the programmed state in place (the agent restarting must
        not cut connections); ``full_sync(LBState())`` removes it."""
        ...


class SyncingBackend:
    """The shared half of ``sync``: remember what was applied, diff, recover by full sync."""

    def __init__(self) -> None:
        self._applied: LBState | None = None

    def sync(self, state: LBState) -> LBChanges:
        if self._applied is None:
            self.full_sync(state)
            return diff(LBState(), state)
        changes = diff(self._applied, state)
        if changes.empty:
            return changes
        try:
            self._apply_changes(changes)
        except BaseException:
            self._applied = None  # unknown kernel state: the next sync is a full one
            raise
        self._applied = state
        return changes

    def full_sync(self, state: LBState) -> None:
        self._applied = None
        self._apply_full(state)
        self._applied = state

    def _apply_changes(self, changes: LBChanges) -> None:
        raise NotImplementedError

    def _apply_full(self, state: LBState) -> None:
        raise NotImplementedError


def ipvs_available(modprobe: bool = True) -> bool:
    """IPVS is usable when its proc file exists (module loaded or built in), or when
    ``modprobe ip_vs`` loads it. /proc/net is per namespace but the module is global, so
    the check holds for every namespace of this kernel."""
    if os.path.exists(IPVS_PROC):
        return True
    if not modprobe:
        return False
    try:
        rc = subprocess.run(["modprobe", "-q", "ip_vs"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return rc.returncode == 0 and os.path.exists(IPVS_PROC)


def choose_backend(prefer: Prefer = "auto", netns: str | None = None) -> LBBackend:
    """IPVS where the kernel has it (the design card's choice), nftables otherwise;
    ``prefer`` forces one (the agent's ``--lb-backend`` flag). Forcing IPVS on a kernel
    without it is an error, not a silent fallback: traffic to the VIPs would be lost."""
    if prefer not in ("auto", "ipvs", "nft"):
        raise ValueError(f"lb backend must be auto, ipvs or nft, not {prefer!r}")
    if prefer == "ipvs" or (prefer == "auto" and ipvs_available()):
        if prefer == "ipvs" and not ipvs_available():
            raise RuntimeError("the ipvs load balancer was requested but this kernel has no IPVS")
        from .ipvs import IpvsBackend

        return IpvsBackend(netns=netns)
    from .nft import NftBackend

    return NftBackend(netns=netns)
