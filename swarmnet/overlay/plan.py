"""A node's overlay networks as desired kernel state (plain data), and the ops that take the
kernel from what it has to that state.

Nothing here performs I/O: ``desired(node)`` is a value that tests compare with ``==``, and
``plan(node, base, netns, sandboxes)`` diffs it against snapshots and returns a list of
kernel-boundary ops (DESIGN principles 2 and 3). ``reconciler.OverlayReconciler`` does the
snapshotting and applying.

Where things live. Docker keeps one namespace per overlay network (``br0`` + ``vxlan0``
inside it). We program each network's bridge and VXLAN device directly in the *base*
namespace (the agent's, i.e. the lab host's namespace): one namespace fewer per network and
per node, every FDB/neighbour entry goes through one netlink socket (so the kernel boundary
can batch them), and the VXLAN device's ``local`` address is the underlay address of that
same namespace. The bridges carry no IP address, so the overlay subnets never appear in the
base namespace's routing table and overlapping user subnets cannot collide at L3; the
only L3 endpoints of an overlay are the task sandboxes.

What we own (and therefore may delete): in the base namespace, links whose names match
``sn-br-<digits>``, ``sn-vx-<digits>`` or ``sn-v<11 base32 chars>``; namespaces whose name
starts with ``netns_prefix + "t-"``; in a sandbox, the links named by that sandbox's
attachments (``eth0``...) and their IPv4 addresses, and the up flag of ``lo``. Nothing else
is ever touched: other subsystems (LB, DNS, a gateway bridge) can share the same namespaces.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field, replace

from swarmnet.ipsec.plan import encrypted_mtu
from swarmnet.kernel.types import (
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
    VethAdd,
    VxlanAdd,
    VxlanAttrs,
)

VXLAN_PORT = 4789  # IANA-assigned VXLAN port; Docker's default data-path port too.
# Encapsulation cost inside the underlay MTU: inner Ethernet 14 + VXLAN 8 + UDP 8 + outer
# IPv4 20 = 50 bytes. With a 1500-byte underlay this gives Docker's 1450.
VXLAN_OVERHEAD = 50
LOOPBACK = "lo"

# Owned-name patterns in the base namespace. Exact patterns rather than bare prefixes, so that
# a link another subsystem names "sn-..." is never mistaken for ours.
_OWNED_BASE_LINK = re.compile(r"sn-br-\d+|sn-vx-\d+|sn-v[a-z2-7]{11}")
SANDBOX_INFIX = "t-"


# ---- input model ----------------------------------------------------------------------


@dataclass(frozen=True)
class OverlayNetwork:
    id: str
    name: str
    vni: int
    subnet: str  # "10.0.1.0/24"
    # ``--opt encrypted``: VXLAN of this VNI is carried in ESP (swarmnet.ipsec), so its MTU
    # leaves room for the ESP overhead too (network_mtu).
    encrypted: bool = False


@dataclass(frozen=True)
class LocalAttachment:
    """A local task's endpoint on one network."""

    task_id: str
    network_id: str
    address: str  # "10.0.1.5/24"
    netns: str  # the task sandbox's namespace name
    ifname: str  # name inside the sandbox: "eth0", "eth1", ... (the worker assigns them)


@dataclass(frozen=True)
class RemoteEndpoint:
    """A task on another node, as gossip announces it."""

    network_id: str
    ip: str  # no prefix
    vtep: str  # the remote node's underlay (VTEP) address


@dataclass(frozen=True)
class NodeOverlay:
    vtep: str  # this node's advertise address (the VXLAN `local`)
    underlay_mtu: int  # MTU of the underlay interface
    networks: tuple[OverlayNetwork, ...]
    # Every local task sandbox namespace that must exist (a task with no network has one).
    sandboxes: tuple[str, ...]
    attachments: tuple[LocalAttachment, ...]
    remotes: tuple[RemoteEndpoint, ...]
    # Sandboxes this node owns are named netns_prefix + "t-" + task_id; namespaces with that
    # prefix that are not desired are removed. Nodes sharing one /run/netns (the netns lab)
    # must use prefixes where none is a prefix of another's owned prefix.
    netns_prefix: str


def node_overlay(
    vtep: str,
    underlay_mtu: int,
    netns_prefix: str,
    networks: dict[str, dict],
    running: list[dict],
    extra: list[LocalAttachment],
    remotes: tuple[RemoteEndpoint, ...],
) -> NodeOverlay:
    """The worker's input model from an assignment's ``networks`` and its ``running`` tasks
    (each network attachment becomes eth0, eth1... in the task's sandbox), plus ``extra``
    attachments (hooks' own sandboxes). Attachments to networks not in ``networks`` are
    dropped."""
    attachments = [
        LocalAttachment(
            task_id=t["id"],
            network_id=a["network_id"],
            address=a["address"],
            netns=sandbox_name(netns_prefix, t["id"]),
            ifname=f"eth{i}",
        )
        for t in running
        for i, a in enumerate(t["networks"])
        if a["network_id"] in networks
    ]
    extra = [a for a in extra if a.network_id in networks]
    attachments += extra
    sandboxes = {sandbox_name(netns_prefix, t["id"]) for t in running} | {a.netns for a in extra}
    return NodeOverlay(
        vtep=vtep,
        underlay_mtu=underlay_mtu,
        networks=tuple(
            OverlayNetwork(
                id=n["id"],
                name=n["name"],
                vni=n["vni"],
                subnet=n["subnet"],
                encrypted=bool(n.get("encrypted")),
            )
            for n in sorted(networks.values(), key=lambda n: n["vni"])
        ),
        sandboxes=tuple(sorted(sandboxes)),
        attachments=tuple(attachments),
        remotes=remotes,
        netns_prefix=netns_prefix,
    )


# ---- deterministic names --------------------------------------------------------------


def mac_for_ip(ip: str) -> str:
    """Docker's rule: 02:42 followed by the four IPv4 bytes. Deterministic, so a MAC never
    has to be gossiped or stored, and a stale entry is recognisable from the IP alone."""
    packed = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in packed)


def bridge_name(vni: int) -> str:
    return _checked(f"sn-br-{vni}")


def vxlan_name(vni: int) -> str:
    return _checked(f"sn-vx-{vni}")


def veth_name(task_id: str, network_id: str) -> str:
    """Base-namespace end of a task's veth on a network. A hash, because task and network
    IDs are far longer than IFNAMSIZ allows: 11 base32 chars = 55 bits, so a collision among
    a node's veths is out of reach. The NUL separator keeps ("ab","c") != ("a","bc")."""
    digest = hashlib.sha256(f"{task_id}\0{network_id}".encode()).digest()
    return _checked("sn-v" + base64.b32encode(digest).decode().lower()[:11])


def sandbox_name(netns_prefix: str, task_id: str) -> str:
    return netns_prefix + SANDBOX_INFIX + task_id


def overlay_mtu(underlay_mtu: int) -> int:
    return underlay_mtu - VXLAN_OVERHEAD


def network_mtu(net: OverlayNetwork, underlay_mtu: int) -> int:
    """The MTU of a network's bridge, VXLAN and veths: an encrypted one also carries ESP's
    header, IV, padding, trailer and ICV (1416 on a 1500 underlay; Docker's 1424 uses a
    64-bit ICV)."""
    if net.encrypted:
        return encrypted_mtu(underlay_mtu)
    return overlay_mtu(underlay_mtu)


def is_owned_base_link(name: str) -> bool:
    return _OWNED_BASE_LINK.fullmatch(name) is not None


def _checked(name: str) -> str:
    assert len(name) <= IFNAMSIZ_MAX, f"interface name too long: {name!r}"
    return name


# ---- desired state --------------------------------------------------------------------


@dataclass
class Desired:
    """Everything this node wants of the kernel for its overlays. Comparable with ``==``.

    ``base`` is the base namespace; ``sandboxes`` maps each task sandbox to what we want in
    it. Only the objects we own appear (see the module docstring): a sandbox's ``lo`` is
    listed for its up flag only.
    """

    base: KernelState = field(default_factory=KernelState)
    sandboxes: dict[str, KernelState] = field(default_factory=dict)


def _ip_of(address: str) -> str:
    return str(ipaddress.IPv4Interface(address).ip)


def desired(node: NodeOverlay) -> Desired:
    """The value the kernel should hold for ``node``.

    A network gets a bridge and VXLAN device only when a local task is attached to it
    (remote endpoints alone do not make a network local). Attachments to a network the node
    does not know are skipped: one inconsistent input must not stop every other network
    from converging.
    """
    nets = {n.id: n for n in node.networks}
    mtus = {nid: network_mtu(n, node.underlay_mtu) for nid, n in nets.items()}
    atts = [a for a in node.attachments if a.network_id in nets]
    local_ids = {a.network_id for a in atts}

    out = Desired()
    for sb in sorted(set(node.sandboxes) | {a.netns for a in atts}):
        out.sandboxes[sb] = KernelState(links={LOOPBACK: _lo_link()})

    for nid in sorted(local_ids, key=lambda i: nets[i].vni):
        vni, mtu = nets[nid].vni, mtus[nid]
        br, vx = bridge_name(vni), vxlan_name(vni)
        out.base.links[br] = Link(br, "bridge", mtu, True)
        out.base.links[vx] = Link(
            vx, "vxlan", mtu, True, master=br, vxlan=VxlanAttrs(vni=vni, local=node.vtep)
        )

    local_ips: dict[str, set[str]] = {nid: set() for nid in local_ids}
    for a in atts:
        br = bridge_name(nets[a.network_id].vni)
        v, mtu = veth_name(a.task_id, a.network_id), mtus[a.network_id]
        out.base.links[v] = Link(v, "veth", mtu, True, master=br)
        ip = _ip_of(a.address)
        local_ips[a.network_id].add(ip)
        sb = out.sandboxes[a.netns]
        sb.links[a.ifname] = Link(a.ifname, "veth", mtu, True, mac=mac_for_ip(ip))
        sb.addrs.add(Addr(a.ifname, str(ipaddress.IPv4Interface(a.address))))

    fdb, neigh = _remote_entries(node, local_ips)
    out.base.fdb |= fdb
    out.base.neigh |= neigh
    return out


def _remote_entries(
    node: NodeOverlay, local_ips: dict[str, set[str]]
) -> tuple[set[FdbEntry], set[NeighEntry]]:
    """The FDB and neighbour entries of ``node.remotes`` on the networks of ``local_ips``
    (network id -> the local tasks' IPs there). Shared by ``desired`` and the fast path
    (``remote_delta``), so the two can never disagree on which remote wins."""
    nets = {n.id: n for n in node.networks}
    # One remote per (network, IP). Gossip should never announce two, but during a task
    # move the old and new entries can briefly coexist; pick deterministically (lowest VTEP)
    # so the plan does not flap with input order. A remote claiming a local task's IP is
    # ignored: the local endpoint is authoritative and answers ARP itself on the bridge.
    chosen: dict[tuple[str, str], RemoteEndpoint] = {}
    for r in sorted(node.remotes, key=lambda r: (r.network_id, r.ip, r.vtep)):
        if r.network_id not in local_ips or r.network_id not in nets or r.vtep == node.vtep:
            continue
        if r.ip in local_ips[r.network_id]:
            continue
        chosen.setdefault((r.network_id, r.ip), r)
    fdb: set[FdbEntry] = set()
    neigh: set[NeighEntry] = set()
    for (nid, ip), r in chosen.items():
        vx = vxlan_name(nets[nid].vni)
        mac = mac_for_ip(ip)
        fdb.add(FdbEntry(vx, mac, r.vtep))
        neigh.add(NeighEntry(vx, ip, mac))
    return fdb, neigh


def _fast_local_ips(node: NodeOverlay) -> dict[str, set[str]]:
    """The networks the fast path may touch, with the local tasks' IPs on each: those with
    a local attachment (only they have a VXLAN device) that are not encrypted (an encrypted
    network's new VTEP needs its ESP states first, which only the full pass programs)."""
    nets = {n.id: n for n in node.networks}
    out: dict[str, set[str]] = {}
    for a in node.attachments:
        n = nets.get(a.network_id)
        if n is None or n.encrypted:
            continue
        out.setdefault(a.network_id, set()).add(_ip_of(a.address))
    return out


def remote_delta(
    node: NodeOverlay, remotes: tuple[RemoteEndpoint, ...] | list[RemoteEndpoint]
) -> tuple[list[Op], NodeOverlay, bool]:
    """The fast path for remote endpoint changes (gossip table events): the FDB/neighbour ops
    that take the entries ``desired(node)`` has to those it has with ``remotes``, and the
    node those ops reach. Only unencrypted networks with a local attachment change; the
    remotes of every other network are kept as ``node`` has them (the next full pass deals
    with them). ``node`` must be what the kernel was last reconciled to (or fast-pathed to):
    the ops are a diff against that model, not against a snapshot, and any op failing means
    the model is wrong and a full ``plan`` must repair it. Op order is ``plan``'s.

    The third value says whether ``remotes`` differ from the node's on a network the fast
    path leaves alone: then the caller needs a full pass (and an encrypted network's ESP)."""
    fast = _fast_local_ips(node)
    rest = tuple(r for r in node.remotes if r.network_id not in fast)
    rest_changed = set(rest) != {r for r in remotes if r.network_id not in fast}
    new = replace(node, remotes=rest + tuple(r for r in remotes if r.network_id in fast))
    cur_fdb, cur_neigh = _remote_entries(node, fast)
    want_fdb, want_neigh = _remote_entries(new, fast)
    ops: list[Op] = []
    ops.extend(NeighDel(e) for e in sorted(cur_neigh - want_neigh, key=_neigh_key))
    ops.extend(FdbDel(e) for e in sorted(cur_fdb - want_fdb, key=_fdb_key))
    ops.extend(FdbAdd(e) for e in sorted(want_fdb - cur_fdb, key=_fdb_key))
    ops.extend(NeighAdd(e) for e in sorted(want_neigh - cur_neigh, key=_neigh_key))
    return ops, new, rest_changed


def _lo_link() -> Link:
    # Only `up` is compared. Kind "" and MTU 65536 are what the kernel reports for loopback
    # (no IFLA_INFO_KIND; the loopback driver's MTU), so the value reads like a snapshot.
    return Link(LOOPBACK, "", 65536, True)


# ---- plan -----------------------------------------------------------------------------


def plan(
    node: NodeOverlay,
    base: KernelState,
    netns: set[str],
    sandboxes: dict[str, KernelState],
) -> list[Op]:
    """Ops that take the kernel from (``base``, ``netns``, ``sandboxes``) to ``desired(node)``.

    ``base`` is a snapshot of the base namespace, ``netns`` the names under /run/netns, and
    ``sandboxes`` snapshots of the desired sandboxes that exist (a missing one is taken as
    empty). Touches only owned objects. Order: link deletes (veths, then VXLANs, then
    bridges), namespace deletes, namespace adds, loopbacks up, then per network bridge,
    VXLAN and veths with their addresses, and last one run of FDB/neighbour ops (deletes,
    then adds) that the kernel boundary batches. Applying the result and planning again
    gives ``[]``.
    """
    return _Planner(node, base, netns, sandboxes).run()


class _Planner:
    """One planning pass. Keeps a model of the kernel as the planned deletes leave it (a
    deleted bridge's ports lose their master, a deleted VXLAN loses its FDB and neighbour
    entries, a deleted veth's sandbox end disappears), so that the creates and fixes are
    computed against what will really be there."""

    def __init__(
        self,
        node: NodeOverlay,
        base: KernelState,
        netns: set[str],
        sandboxes: dict[str, KernelState],
    ) -> None:
        self.node = node
        self.want = desired(node)
        self.netns = set(netns)
        self.links = dict(base.links)
        self.fdb = set(base.fdb)
        self.neigh = set(base.neigh)
        # Working copies of the desired sandboxes' current state.
        self.sb: dict[str, KernelState] = {}
        for name in self.want.sandboxes:
            cur = sandboxes.get(name) if name in netns else None
            cur = cur or KernelState()
            self.sb[name] = KernelState(links=dict(cur.links), addrs=set(cur.addrs))
        nets = {n.id: n for n in node.networks}
        self.atts = sorted(
            (a for a in node.attachments if a.network_id in nets),
            key=lambda a: (nets[a.network_id].vni, a.task_id),
        )
        self.vni = {nid: n.vni for nid, n in nets.items()}

    def run(self) -> list[Op]:
        deletes = self._link_deletes()
        owned_prefix = self.node.netns_prefix + SANDBOX_INFIX
        netns_del: list[Op] = [
            NetnsDel(n)
            for n in sorted(self.netns)
            if n.startswith(owned_prefix) and n not in self.want.sandboxes
        ]
        netns_add: list[Op] = [
            NetnsAdd(n) for n in sorted(self.want.sandboxes) if n not in self.netns
        ]
        loopbacks: list[Op] = []
        for name in sorted(self.want.sandboxes):
            lo = self.sb[name].links.get(LOOPBACK)
            if lo is None or not lo.up:
                loopbacks.append(LinkSet(LOOPBACK, netns=name, up=True))
        return deletes + netns_del + netns_add + loopbacks + self._creates() + self._entries()

    # -- deletes --

    def _link_deletes(self) -> list[Op]:
        """Owned base links that are undesired or unfixable in place, and broken veth pairs."""
        doomed: set[str] = set()
        sb_dels: list[Op] = []
        for name, cur in self.links.items():
            if not is_owned_base_link(name):
                continue
            want = self.want.base.links.get(name)
            if want is None or cur.kind != want.kind or cur.vxlan != want.vxlan:
                doomed.add(name)
        for a in self.atts:
            v = veth_name(a.task_id, a.network_id)
            if v in doomed:
                continue
            sb_link = self.sb[a.netns].links.get(a.ifname)
            want_sb = self.want.sandboxes[a.netns].links[a.ifname]
            paired = (
                v in self.links
                and sb_link is not None
                and sb_link.kind == "veth"
                and sb_link.mac == want_sb.mac
            )
            if paired:
                continue
            # The kernel does not report a veth's peer, so "paired" is inferred from the
            # sandbox end carrying the MAC only we give it. Anything else is rebuilt: the
            # sandbox end first (it may be a stray link holding the name), then ours.
            if sb_link is not None:
                sb_dels.append(LinkDel(a.ifname, netns=a.netns))
                self._forget_sandbox_link(a.netns, a.ifname)
            if v in self.links:
                doomed.add(v)

        ops: list[Op] = list(sb_dels)
        rank = {"veth": 0, "vxlan": 1, "bridge": 2}
        for name in sorted(doomed, key=lambda n: (rank.get(self.links[n].kind, 0), n)):
            ops.append(LinkDel(name))
            self._forget_base_link(name)
        return ops

    def _forget_base_link(self, name: str) -> None:
        del self.links[name]
        for other in list(self.links.values()):
            if other.master == name:
                self.links[other.name] = replace(other, master=None)
        self.fdb = {e for e in self.fdb if e.dev != name}
        self.neigh = {e for e in self.neigh if e.dev != name}
        # A deleted veth takes its sandbox end along; we know which one only for our pairs.
        for a in self.atts:
            if veth_name(a.task_id, a.network_id) == name:
                self._forget_sandbox_link(a.netns, a.ifname)

    def _forget_sandbox_link(self, netns: str, ifname: str) -> None:
        sb = self.sb[netns]
        sb.links.pop(ifname, None)
        sb.addrs = {x for x in sb.addrs if x.dev != ifname}

    # -- creates and in-place fixes --

    def _creates(self) -> list[Op]:
        ops: list[Op] = []
        for name, want in self.want.base.links.items():  # bridges then VXLANs, by VNI
            if want.kind == "veth":
                continue
            cur = self.links.get(name)
            if cur is None:
                if want.kind == "bridge":
                    ops.append(BridgeAdd(name, want.mtu))
                    ops.append(LinkSet(name, up=True))
                else:
                    assert want.vxlan is not None
                    ops.append(VxlanAdd(name, want.vxlan, want.mtu))
                    ops.append(LinkSet(name, master=want.master, up=True))
            else:
                ops.extend(_fix(cur, want, None))
        for a in self.atts:
            ops.extend(self._attachment(a))
        return ops

    def _attachment(self, a: LocalAttachment) -> list[Op]:
        v = veth_name(a.task_id, a.network_id)
        want_v = self.want.base.links[v]
        want_sb = self.want.sandboxes[a.netns]
        want_peer = want_sb.links[a.ifname]
        want_addrs = {x for x in want_sb.addrs if x.dev == a.ifname}
        sb = self.sb[a.netns]
        ops: list[Op] = []
        cur_v = self.links.get(v)
        if cur_v is None:
            ops.append(
                VethAdd(
                    v,
                    a.ifname,
                    want_v.mtu,
                    peer_netns=a.netns,
                    peer_mac=want_peer.mac,
                )
            )
            ops.append(LinkSet(v, master=want_v.master, up=True))
            ops.extend(AddrAdd(x, netns=a.netns) for x in sorted(want_addrs, key=_addr_key))
            ops.append(LinkSet(a.ifname, netns=a.netns, up=True))
            return ops
        ops.extend(_fix(cur_v, want_v, None))
        cur_addrs = {x for x in sb.addrs if x.dev == a.ifname}
        ops.extend(AddrDel(x, netns=a.netns) for x in sorted(cur_addrs - want_addrs, key=_addr_key))
        ops.extend(AddrAdd(x, netns=a.netns) for x in sorted(want_addrs - cur_addrs, key=_addr_key))
        ops.extend(_fix(sb.links[a.ifname], want_peer, a.netns))
        return ops

    # -- FDB and neighbours --

    def _entries(self) -> list[Op]:
        """Stale entries on our VXLANs go (the "no stale PERMANENT entries" promise,
        moby#50232); a changed VTEP or MAC is a delete then an add, since the kernel keys
        FDB entries by MAC and neighbours by IP. Entries on devices we do not want are
        left alone: either the device goes (and its entries with it) or it is not ours."""
        ours = {n for n, lk in self.want.base.links.items() if lk.kind == "vxlan"}
        cur_fdb = {e for e in self.fdb if e.dev in ours}
        cur_neigh = {e for e in self.neigh if e.dev in ours}
        want_fdb, want_neigh = self.want.base.fdb, self.want.base.neigh
        ops: list[Op] = []
        ops.extend(NeighDel(e) for e in sorted(cur_neigh - want_neigh, key=_neigh_key))
        ops.extend(FdbDel(e) for e in sorted(cur_fdb - want_fdb, key=_fdb_key))
        # FDB before neighbour: once ARP is answered from the neighbour table, the frame
        # that follows must already know its VTEP.
        ops.extend(FdbAdd(e) for e in sorted(want_fdb - cur_fdb, key=_fdb_key))
        ops.extend(NeighAdd(e) for e in sorted(want_neigh - cur_neigh, key=_neigh_key))
        return ops


def _fix(cur: Link, want: Link, netns: str | None) -> list[Op]:
    """One LinkSet for whatever of MTU, master and up differs (nothing if all match)."""
    mtu = want.mtu if cur.mtu != want.mtu else None
    master: str | None = None
    if cur.master != want.master:
        master = want.master if want.master is not None else ""
    up = True if want.up and not cur.up else None
    if mtu is None and master is None and up is None:
        return []
    return [LinkSet(cur.name, netns=netns, up=up, master=master, mtu=mtu)]


def _addr_key(a: Addr) -> tuple[str, str]:
    return (a.dev, a.cidr)


def _fdb_key(e: FdbEntry) -> tuple[str, str, str]:
    return (e.dev, e.mac, e.dst)


def _neigh_key(e: NeighEntry) -> tuple[str, str, str]:
    return (e.dev, e.ip, e.mac)
