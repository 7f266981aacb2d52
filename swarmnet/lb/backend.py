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

import subprocess
from typing import Literal, Protocol

from .plan import LBChanges, LBState, diff

Prefer = Literal["auto", "ipvs", "nft"]


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


class BackendUnavailable(RuntimeError):
    """A load-balancer backend was requested by name but this kernel (or namespace) cannot
    run it. Raised instead of falling back: traffic to the VIPs would silently go nowhere."""


def ipvs_available(modprobe: bool = True, netns: str | None = None) -> bool:
    """Whether IPVS can be programmed in ``netns`` (None: the caller's namespace): the IPVS
    generic-netlink family answers from a socket opened THERE. If it does not and
    ``modprobe``, ``modprobe ip_vs`` is tried once and the question asked again (the family
    is not autoloaded). The module is global, but asking from inside the namespace also
    proves the namespace exists and that this process may open netlink sockets there."""
    from .ipvs import probe  # lazy: the kernel-boundary module, only when asked

    if probe(netns):
        return True
    if not modprobe or _modprobe_failed:
        return False
    try:
        rc = subprocess.run(["modprobe", "-q", "ip_vs"], capture_output=True, timeout=30)
        loaded = rc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        loaded = False  # no modprobe (this build host has no kmod): no way to load it
    if not loaded:
        _remember_modprobe_failed()
    return loaded and probe(netns)


_modprobe_failed = False
"""Set once ``modprobe ip_vs`` failed: the agent asks once per sandbox namespace, and a
kernel without the module does not grow it, so later asks skip the process start."""


def _remember_modprobe_failed() -> None:
    global _modprobe_failed
    _modprobe_failed = True


def choose_backend(prefer: Prefer = "auto", netns: str | None = None) -> LBBackend:
    """The backend for ``netns`` (None: the caller's own). ``"auto"``: IPVS where the kernel
    has it (the design card's choice), nftables otherwise; ``"ipvs"``/``"nft"`` force one
    (the agent's ``--lb-backend`` flag). Forcing IPVS where it is missing raises
    ``BackendUnavailable``, never a silent fallback: the operator asked for IPVS."""
    if prefer not in ("auto", "ipvs", "nft"):
        raise ValueError(f"lb backend must be auto, ipvs or nft, not {prefer!r}")
    if prefer != "nft":
        has_ipvs = ipvs_available(netns=netns)
        if prefer == "ipvs" and not has_ipvs:
            where = f"network namespace {netns}" if netns else "this network namespace"
            raise BackendUnavailable(
                f"the ipvs load balancer was requested but the kernel has no IPVS in {where} "
                "(module ip_vs not loadable); use --lb-backend nft or auto"
            )
        if has_ipvs:
            from .ipvs import IpvsBackend

            return IpvsBackend(netns=netns)
    from .nft import NftBackend

    return NftBackend(netns=netns)
