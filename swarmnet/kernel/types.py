"""The kernel boundary's vocabulary: what the kernel has (state) and what we ask of it (ops).

Every side effect swarmnet has on the kernel is one of the ``Op`` values below, applied
through a ``Kernel`` (``netlink.NetlinkKernel`` for real, ``fake.FakeKernel`` in memory).
Reconcilers read a ``KernelState`` snapshot, compute the difference with their desired
state as a list of ops, and apply it. Both implementations must agree on every observable
detail of ``KernelState``: the parity test runs one scenario against both and compares.

Namespaces: ``netns=None`` always means the namespace the Kernel object was created in
(for an agent in the netns lab, that is the lab host's namespace). A string names a
namespace under /run/netns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

IFNAMSIZ_MAX = 15  # Linux IFNAMSIZ is 16 including the NUL byte.


@dataclass(frozen=True)
class VxlanAttrs:
    vni: int
    local: str  # VTEP address; always set, since a missing `local` breaks multi-IP hosts (moby#53004)
    port: int = 4789
    learning: bool = False
    proxy: bool = True  # answer ARP from the neighbour table, so broadcasts never cross hosts


@dataclass(frozen=True)
class Link:
    name: str
    kind: str  # "bridge", "vxlan", "veth", or what the kernel reports for anything else
    mtu: int
    up: bool
    master: str | None = None
    mac: str | None = None  # lower-case "aa:bb:cc:dd:ee:ff"
    vxlan: VxlanAttrs | None = None


@dataclass(frozen=True)
class Addr:
    dev: str
    cidr: str  # "10.0.1.5/24"


@dataclass(frozen=True)
class Route:
    dst: str  # "default" or a CIDR
    gateway: str | None = None
    dev: str | None = None


@dataclass(frozen=True)
class FdbEntry:
    """A static unicast entry on a VXLAN device: frames for ``mac`` go to VTEP ``dst``."""

    dev: str
    mac: str
    dst: str


@dataclass(frozen=True)
class NeighEntry:
    """A permanent IPv4 neighbour entry: ``ip`` is at ``mac`` (on a VXLAN device)."""

    dev: str
    ip: str
    mac: str


@dataclass
class KernelState:
    """What one namespace has, as far as swarmnet cares. Comparable with ``==``."""

    links: dict[str, Link] = field(default_factory=dict)
    addrs: set[Addr] = field(default_factory=set)  # IPv4 only
    routes: set[Route] = field(default_factory=set)  # IPv4 main table, proto boot/static only
    fdb: set[FdbEntry] = field(default_factory=set)  # permanent entries with a dst, on vxlan devs
    neigh: set[NeighEntry] = field(default_factory=set)  # NUD_PERMANENT IPv4 entries


# ---- operations -----------------------------------------------------------------------


@dataclass(frozen=True)
class NetnsAdd:
    name: str


@dataclass(frozen=True)
class NetnsDel:
    name: str


@dataclass(frozen=True)
class BridgeAdd:
    name: str
    mtu: int
    netns: str | None = None


@dataclass(frozen=True)
class VxlanAdd:
    name: str
    attrs: VxlanAttrs
    mtu: int
    netns: str | None = None


@dataclass(frozen=True)
class VethAdd:
    """A veth pair: ``name`` stays in ``netns``; ``peer`` is created directly in
    ``peer_netns`` (None: the same namespace) with the given MAC."""

    name: str
    peer: str
    mtu: int
    peer_netns: str | None = None
    peer_mac: str | None = None
    netns: str | None = None


@dataclass(frozen=True)
class LinkDel:
    name: str
    netns: str | None = None


@dataclass(frozen=True)
class LinkSet:
    """Change what is given; ``master=""`` detaches from the master."""

    name: str
    netns: str | None = None
    up: bool | None = None
    master: str | None = None
    mtu: int | None = None


@dataclass(frozen=True)
class AddrAdd:
    addr: Addr
    netns: str | None = None


@dataclass(frozen=True)
class AddrDel:
    addr: Addr
    netns: str | None = None


@dataclass(frozen=True)
class RouteAdd:
    route: Route
    netns: str | None = None


@dataclass(frozen=True)
class RouteDel:
    route: Route
    netns: str | None = None


@dataclass(frozen=True)
class FdbAdd:
    entry: FdbEntry
    netns: str | None = None


@dataclass(frozen=True)
class FdbDel:
    entry: FdbEntry
    netns: str | None = None


@dataclass(frozen=True)
class NeighAdd:
    entry: NeighEntry
    netns: str | None = None


@dataclass(frozen=True)
class NeighDel:
    entry: NeighEntry
    netns: str | None = None


Op = (
    NetnsAdd
    | NetnsDel
    | BridgeAdd
    | VxlanAdd
    | VethAdd
    | LinkDel
    | LinkSet
    | AddrAdd
    | AddrDel
    | RouteAdd
    | RouteDel
    | FdbAdd
    | FdbDel
    | NeighAdd
    | NeighDel
)


class Kernel(Protocol):
    """The one kernel boundary. Methods are synchronous and may block on netlink; the
    asyncio side calls them through ``loop.run_in_executor`` (one thread at a time)."""

    def list_netns(self) -> set[str]:
        """Names under /run/netns."""
        ...

    def snapshot(self, netns: str | None = None) -> KernelState:
        """What ``netns`` has. Raises KernelError(ENOENT) for an unknown namespace."""
        ...

    def apply(self, ops: list[Op]) -> None:
        """Apply ops in order. Runs of FdbAdd/FdbDel/NeighAdd/NeighDel are batched (many
        netlink messages per sendmsg, acks checked in bulk). On the first failure raises
        KernelError naming the op; ops before it stay applied (reconcilers converge on
        the next pass, since they diff against a fresh snapshot)."""
        ...

    def close(self) -> None: ...
