"""An in-memory kernel that behaves like Linux for the ops in ``types.py``.

Reconcilers and their tests run against this instead of netlink. "Behaves like Linux" means
it rejects what Linux rejects, with the errno Linux uses, and has the same side effects
(checked against the real kernel by tests/integration/test_kernel_parity.py):

- names: duplicate link or netns -> EEXIST; name longer than 15 bytes -> ERANGE (the
  netlink attribute policy's errno; other bad names EINVAL); unknown
  dev or master -> ENODEV; unknown netns -> ENOENT; master that is not a bridge -> EOPNOTSUPP.
- veth: deleting either end deletes the pair; deleting a netns deletes every link in it and
  so the veth peers living elsewhere.
- a new link is down; a new named netns has ``lo`` down; the base namespace has ``lo`` up
  with 127.0.0.1/8 (bringing ``lo`` up adds that address, as devinet.c does).
- bridge MTU follows the smallest port MTU unless the user set it with LinkSet(mtu=...)
  (br_mtu_auto_adjust); a creation MTU does not count as user-set, like the kernel.
- setting a link down flushes its IPv4 neighbours (permanent ones too: fib_disable_ip ->
  arp_ifdown) and its routes; FDB entries on a vxlan survive it (vxlan_flush keeps
  permanent ones). Deleting a link removes its addresses, routes, FDB and neighbours.
- routes: a dev must be up (ENETDOWN); a gateway must be reachable through a connected
  subnet or a link-scope route on an up dev (ENETUNREACH);
  duplicate destination -> EEXIST; deleting a missing route -> ESRCH.
- addresses: duplicate -> EEXIST; deleting a missing one -> EADDRNOTAVAIL.
- FDB (vxlan): one entry per (dev, mac): adding a MAC again -> EEXIST whatever the dst;
  deleting a MAC that is absent -> ENOENT, but with a dst that is not the entry's -> 0 and
  nothing deleted (a vxlan quirk, kept for parity). On a non-vxlan dev an entry is
  accepted but has no dst, so it is not in the snapshot (as in ``bridge fdb show``).
- neighbours: one per (dev, ip): adding again -> EEXIST; deletion ignores the MAC, as Linux.

Apply semantics (types.Kernel.apply): ops run in order; the first failure raises
KernelError naming the op, and the ops before it stay applied (no rollback). This is also
what NetlinkKernel guarantees, batching included.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import random
from dataclasses import dataclass, field, replace

from .errors import KernelError
from .types import (
    IFNAMSIZ_MAX,
    Addr,
    AddrAdd,
    AddrDel,
    BridgeAdd,
    FdbAdd,
    FdbDel,
    FdbEntry,
    KernelState,
    Link,
    LinkDel,
    LinkSet,
    NeighAdd,
    NeighDel,
    NeighEntry,
    NetnsAdd,
    NetnsDel,
    Op,
    Route,
    RouteAdd,
    RouteDel,
    VethAdd,
    VxlanAdd,
)

LO_MTU = 65536  # what the loopback driver registers with
LO_MAC = "00:00:00:00:00:00"
LO_ADDR = Addr("lo", "127.0.0.1/8")


@dataclass
class _Ns:
    """One namespace. ``links`` holds the public view; the private dicts hold what Linux
    tracks but KernelState does not show."""

    links: dict[str, Link] = field(default_factory=dict)
    addrs: set[Addr] = field(default_factory=set)
    routes: dict[str, Route] = field(default_factory=dict)  # by dst: main table, one each
    fdb: dict[tuple[str, str], str] = field(default_factory=dict)  # (dev, mac) -> dst
    fdb_nodst: set[tuple[str, str]] = field(default_factory=set)  # non-vxlan: no dst
    neigh: dict[tuple[str, str], str] = field(default_factory=dict)  # (dev, ip) -> mac
    peers: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # veth peer
    mtu_by_user: set[str] = field(default_factory=set)  # bridges whose MTU is pinned


def _lo(up: bool) -> Link:
    return Link(name="lo", kind="", mtu=LO_MTU, up=up, mac=LO_MAC)


def _check_name(name: str, op: Op) -> None:
    if len(name.encode()) > IFNAMSIZ_MAX:
        # rejected by the netlink policy of IFLA_IFNAME (NLA_STRING, IFNAMSIZ - 1), whose
        # errno is ERANGE, before dev_valid_name() would say EINVAL
        raise KernelError(errno.ERANGE, op, "interface name too long")
    if not name or "/" in name or ":" in name or name != name.strip() or name in (".", ".."):
        raise KernelError(errno.EINVAL, op, "invalid interface name")


def _cidr(addr: Addr) -> str:
    return str(ipaddress.ip_interface(addr.cidr))


def _route_dst(dst: str) -> str:
    return "default" if dst in ("default", "0.0.0.0/0") else str(ipaddress.ip_network(dst))


class FakeKernel:
    """In-memory ``types.Kernel``. ``seed`` makes generated MACs reproducible."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        base = _Ns()
        base.links["lo"] = _lo(up=True)
        base.addrs.add(LO_ADDR)
        self._ns: dict[str | None, _Ns] = {None: base}
        #: every op applied successfully, in order (tests assert on it, e.g. "a second
        #: reconcile applies nothing").
        self.ops_applied: list[Op] = []
        self.closed = False

    # ---- Kernel protocol -------------------------------------------------------------

    def list_netns(self) -> set[str]:
        return {name for name in self._ns if name is not None}

    def snapshot(self, netns: str | None = None) -> KernelState:
        ns = self._get_ns(netns, None)
        return KernelState(
            links=copy.deepcopy(ns.links),
            addrs=set(ns.addrs),
            routes=set(ns.routes.values()),
            fdb={FdbEntry(dev, mac, dst) for (dev, mac), dst in ns.fdb.items()},
            neigh={NeighEntry(dev, ip, mac) for (dev, ip), mac in ns.neigh.items()},
        )

    def apply(self, ops: list[Op]) -> None:
        for op in ops:
            handler = getattr(self, "_op_" + type(op).__name__, None)
            if handler is None:
                raise KernelError(errno.EOPNOTSUPP, op, "unknown op")
            handler(op)
            self.ops_applied.append(op)

    def close(self) -> None:
        self.closed = True

    # ---- helpers ---------------------------------------------------------------------

    def _get_ns(self, netns: str | None, op: Op | None) -> _Ns:
        try:
            return self._ns[netns]
        except KeyError:
            raise KernelError(errno.ENOENT, op, f"no netns {netns!r}") from None

    def _get_link(self, ns: _Ns, name: str, op: Op) -> Link:
        try:
            return ns.links[name]
        except KeyError:
            raise KernelError(errno.ENODEV, op, f"no device {name!r}") from None

    def _mac(self) -> str:
        # Like eth_random_addr(): unicast, locally administered.
        b = bytearray(self._rng.getrandbits(8) for _ in range(6))
        b[0] = (b[0] & 0xFE) | 0x02
        return ":".join(f"{x:02x}" for x in b)

    def _new_link(self, ns: _Ns, link: Link, op: Op) -> None:
        _check_name(link.name, op)
        if link.name in ns.links:
            raise KernelError(errno.EEXIST, op, f"device {link.name!r} exists")
        ns.links[link.name] = link

    def _remove_link(self, ns: _Ns, name: str) -> None:
        """Unregister one device and everything that hangs off it (not its veth peer)."""
        link = ns.links.pop(name)
        ns.addrs = {a for a in ns.addrs if a.dev != name}
        ns.routes = {d: r for d, r in ns.routes.items() if r.dev != name}
        ns.fdb = {k: v for k, v in ns.fdb.items() if k[0] != name}
        ns.fdb_nodst = {k for k in ns.fdb_nodst if k[0] != name}
        ns.neigh = {k: v for k, v in ns.neigh.items() if k[0] != name}
        ns.peers.pop(name, None)
        ns.mtu_by_user.discard(name)
        for other in list(ns.links.values()):
            if other.master == name:  # a deleted bridge releases its ports
                ns.links[other.name] = replace(other, master=None)
        if link.master is not None:
            self._bridge_mtu_adjust(ns, link.master)

    def _delete_link(self, ns: _Ns, name: str) -> None:
        peer = ns.peers.get(name)
        self._remove_link(ns, name)
        if peer is not None:
            peer_ns = self._ns.get(peer[0])
            if peer_ns is not None and peer[1] in peer_ns.links:
                self._remove_link(peer_ns, peer[1])

    def _bridge_mtu_adjust(self, ns: _Ns, bridge: str) -> None:
        # br_mtu_auto_adjust: the bridge takes its smallest port's MTU, unless pinned;
        # with no ports left it keeps what it has.
        br = ns.links.get(bridge)
        if br is None or bridge in ns.mtu_by_user:
            return
        mtus = [lk.mtu for lk in ns.links.values() if lk.master == bridge]
        if mtus:
            ns.links[bridge] = replace(br, mtu=min(mtus))

    def _link_down(self, ns: _Ns, name: str) -> None:
        # fib_disable_ip: routes through the dev go, and arp_ifdown flushes every IPv4
        # neighbour of the dev, permanent ones included.
        ns.routes = {d: r for d, r in ns.routes.items() if r.dev != name}
        ns.neigh = {k: v for k, v in ns.neigh.items() if k[0] != name}

    # ---- ops -------------------------------------------------------------------------

    def _op_NetnsAdd(self, op: NetnsAdd) -> None:
        if not op.name or "/" in op.name or op.name in (".", ".."):
            raise KernelError(errno.EINVAL, op, "invalid netns name")
        if op.name in self._ns:
            raise KernelError(errno.EEXIST, op, "netns exists")
        ns = _Ns()
        ns.links["lo"] = _lo(up=False)
        self._ns[op.name] = ns

    def _op_NetnsDel(self, op: NetnsDel) -> None:
        ns = self._get_ns(op.name, op)
        for name in list(ns.links):
            if name in ns.links:
                self._delete_link(ns, name)
        del self._ns[op.name]

    def _op_BridgeAdd(self, op: BridgeAdd) -> None:
        ns = self._get_ns(op.netns, op)
        self._new_link(ns, Link(op.name, "bridge", op.mtu, False, mac=self._mac()), op)

    def _op_VxlanAdd(self, op: VxlanAdd) -> None:
        ns = self._get_ns(op.netns, op)
        if not 0 <= op.attrs.vni < 1 << 24:
            raise KernelError(errno.ERANGE, op, "VNI out of range")
        link = Link(op.name, "vxlan", op.mtu, False, mac=self._mac(), vxlan=op.attrs)
        for other in ns.links.values():
            v = other.vxlan
            if v is not None and (v.vni, v.port) == (op.attrs.vni, op.attrs.port):
                # vxlan_vni_in_use: same VNI on the same UDP port, whatever the local
                raise KernelError(errno.EEXIST, op, "VNI in use")
        self._new_link(ns, link, op)

    def _op_VethAdd(self, op: VethAdd) -> None:
        ns = self._get_ns(op.netns, op)
        peer_netns = op.peer_netns if op.peer_netns is not None else op.netns
        peer_ns = self._get_ns(peer_netns, op)
        _check_name(op.name, op)
        _check_name(op.peer, op)
        if (
            op.name in ns.links
            or op.peer in peer_ns.links
            or (ns is peer_ns and op.name == op.peer)
        ):
            raise KernelError(errno.EEXIST, op, "device exists")
        mac = op.peer_mac.lower() if op.peer_mac else self._mac()
        self._new_link(peer_ns, Link(op.peer, "veth", op.mtu, False, mac=mac), op)
        self._new_link(ns, Link(op.name, "veth", op.mtu, False, mac=self._mac()), op)
        ns.peers[op.name] = (peer_netns, op.peer)
        peer_ns.peers[op.peer] = (op.netns, op.name)

    def _op_LinkDel(self, op: LinkDel) -> None:
        ns = self._get_ns(op.netns, op)
        self._get_link(ns, op.name, op)
        self._delete_link(ns, op.name)

    def _op_LinkSet(self, op: LinkSet) -> None:
        ns = self._get_ns(op.netns, op)
        link = self._get_link(ns, op.name, op)
        master = self._get_link(ns, op.master, op) if op.master else None  # name lookup
        if op.mtu is not None and op.mtu < 68:  # ETH_MIN_MTU
            raise KernelError(errno.EINVAL, op, "MTU below the minimum")
        # Same order as do_setlink(): MTU, then flags, then master; not atomic.
        if op.mtu is not None:
            link = replace(link, mtu=op.mtu)
            ns.links[link.name] = link
            if link.kind == "bridge":
                ns.mtu_by_user.add(link.name)
            if link.master is not None:
                self._bridge_mtu_adjust(ns, link.master)
        if op.up is not None and op.up != link.up:
            link = replace(link, up=op.up)
            ns.links[link.name] = link
            if op.up and link.name == "lo":
                ns.addrs.add(LO_ADDR)
            if not op.up:
                self._link_down(ns, link.name)
        if op.master is not None and op.master != (link.master or ""):
            # do_set_master() releases the old master before it tries the new one, so a
            # failed attach leaves the port detached.
            old = link.master
            if old is not None:
                link = replace(link, master=None)
                ns.links[link.name] = link
                self._bridge_mtu_adjust(ns, old)
            if master is not None:
                if master.kind != "bridge" or master.name == link.name:
                    raise KernelError(errno.EOPNOTSUPP, op, f"{op.master!r} is not a bridge")
                ns.links[link.name] = replace(link, master=master.name)
                self._bridge_mtu_adjust(ns, master.name)

    def _op_AddrAdd(self, op: AddrAdd) -> None:
        ns = self._get_ns(op.netns, op)
        self._get_link(ns, op.addr.dev, op)
        addr = Addr(op.addr.dev, _cidr(op.addr))
        if addr in ns.addrs:
            raise KernelError(errno.EEXIST, op, "address exists")
        ns.addrs.add(addr)

    def _op_AddrDel(self, op: AddrDel) -> None:
        ns = self._get_ns(op.netns, op)
        self._get_link(ns, op.addr.dev, op)
        addr = Addr(op.addr.dev, _cidr(op.addr))
        if addr not in ns.addrs:
            raise KernelError(errno.EADDRNOTAVAIL, op, "no such address")
        ns.addrs.discard(addr)

    def _gateway_dev(self, ns: _Ns, gw: str, dev: str | None) -> str | None:
        """The up device through which ``gw`` is directly reachable, or None."""
        ip = ipaddress.ip_address(gw)
        for a in ns.addrs:
            if (dev is None or a.dev == dev) and ns.links[a.dev].up:
                if ip in ipaddress.ip_interface(a.cidr).network:
                    return a.dev
        for r in ns.routes.values():
            if r.gateway is None and r.dev is not None and (dev is None or r.dev == dev):
                net = ipaddress.ip_network("0.0.0.0/0" if r.dst == "default" else r.dst)
                if ip in net and ns.links[r.dev].up:
                    return r.dev
        return None

    def _op_RouteAdd(self, op: RouteAdd) -> None:
        ns = self._get_ns(op.netns, op)
        r = op.route
        dst = _route_dst(r.dst)
        dev = r.dev
        if dev is not None:
            link = self._get_link(ns, dev, op)
            if not link.up:
                raise KernelError(errno.ENETDOWN, op, "device for nexthop is not up")
        if r.gateway is not None:
            dev = self._gateway_dev(ns, r.gateway, dev)
            if dev is None:
                raise KernelError(errno.ENETUNREACH, op, "nexthop has invalid gateway")
        if dev is None:
            raise KernelError(errno.EINVAL, op, "route needs a dev or a gateway")
        if dst in ns.routes:
            raise KernelError(errno.EEXIST, op, "route exists")
        ns.routes[dst] = Route(dst, r.gateway, dev)

    def _op_RouteDel(self, op: RouteDel) -> None:
        ns = self._get_ns(op.netns, op)
        r = op.route
        if r.dev is not None:
            self._get_link(ns, r.dev, op)
        have = ns.routes.get(_route_dst(r.dst))
        if (
            have is None
            or (r.gateway is not None and have.gateway != r.gateway)
            or (r.dev is not None and have.dev != r.dev)
        ):
            raise KernelError(errno.ESRCH, op, "no such route")
        del ns.routes[have.dst]

    def _op_FdbAdd(self, op: FdbAdd) -> None:
        ns = self._get_ns(op.netns, op)
        e = op.entry
        link = self._get_link(ns, e.dev, op)
        key = (e.dev, e.mac.lower())
        if link.kind != "vxlan":
            if key in ns.fdb_nodst:
                raise KernelError(errno.EEXIST, op, "fdb entry exists")
            ns.fdb_nodst.add(key)
            return
        if key in ns.fdb:
            raise KernelError(errno.EEXIST, op, "fdb entry exists")
        ns.fdb[key] = str(ipaddress.ip_address(e.dst))

    def _op_FdbDel(self, op: FdbDel) -> None:
        ns = self._get_ns(op.netns, op)
        e = op.entry
        link = self._get_link(ns, e.dev, op)
        key = (e.dev, e.mac.lower())
        if link.kind != "vxlan":
            if key not in ns.fdb_nodst:
                raise KernelError(errno.ENOENT, op, "no such fdb entry")
            ns.fdb_nodst.discard(key)
            return
        if key not in ns.fdb:
            raise KernelError(errno.ENOENT, op, "no such fdb entry")
        if ns.fdb[key] == str(ipaddress.ip_address(e.dst)):
            del ns.fdb[key]
        # else: Linux (vxlan_fdb_delete) answers 0 and keeps the entry; so do we.

    def _op_NeighAdd(self, op: NeighAdd) -> None:
        ns = self._get_ns(op.netns, op)
        e = op.entry
        self._get_link(ns, e.dev, op)
        key = (e.dev, str(ipaddress.IPv4Address(e.ip)))
        if key in ns.neigh:
            raise KernelError(errno.EEXIST, op, "neighbour exists")
        ns.neigh[key] = e.mac.lower()

    def _op_NeighDel(self, op: NeighDel) -> None:
        ns = self._get_ns(op.netns, op)
        e = op.entry
        self._get_link(ns, e.dev, op)
        key = (e.dev, str(ipaddress.IPv4Address(e.ip)))
        if key not in ns.neigh:
            raise KernelError(errno.ENOENT, op, "no such neighbour")
        del ns.neigh[key]
