"""The real kernel boundary: ``types.Kernel`` on netlink (pyroute2 0.9.7 plus a raw socket).

Namespaces: ``base_netns=None`` works in the process's own namespace; a name makes that
namespace play the base (``netns=None`` in ops) so tests and benches never touch the root
namespace. Named namespaces live under /run/netns and are made and removed with
pyroute2's netns helpers. One IPRoute socket and one raw NETLINK_ROUTE socket are cached
per namespace (sockets are bound to the namespace they were created in) and closed in
``close()`` or when that namespace is deleted (an open socket would keep it alive).

Batching: FDB and neighbour entries come by the thousand (one per remote endpoint), so a
run of consecutive FdbAdd/FdbDel/NeighAdd/NeighDel in one ``apply`` is encoded with
``struct`` from a fixed 48-byte layout (byte-identical to pyroute2's ``ndmsg`` encoding, a
unit test checks) and sent as many messages per ``sendmsg``; the acks are read in bulk and
matched to ops by sequence number. The kernel handles every message of a datagram even
after one fails, so when op k fails the later ops of its datagram that succeeded are
undone (the inverse op is sent, errors ignored): the caller sees exactly the fake's
contract, ops before k applied, k and later not.

Kernel facts this relies on, checked by tests/integration/test_kernel_parity.py:
deleting a namespace destroys its links asynchronously (cleanup_net runs in a workqueue),
so NetnsDel deletes the virtual links first, which makes veth peers elsewhere disappear
before ``apply`` returns, as the fake promises.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from . import nsutil
from .errors import KernelError
from .types import (
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
    VxlanAttrs,
)

NETNS_RUN_DIR = "/run/netns"

# netlink / rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h)
NLMSG_ERROR = 2
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NDA_DST = 1
NDA_LLADDR = 2
NTF_SELF = 0x02
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
AF_BRIDGE = 7
SOL_NETLINK = 270
SO_SNDBUFFORCE = 32  # asm-generic/socket.h; Python's socket module lacks them
SO_RCVBUFFORCE = 33
NETLINK_CAP_ACK = 10  # acks of failed requests echo only the header, not the payload
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTPROT_STATIC = 4
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253

# nlmsghdr(16) + ndmsg(12) + NDA_DST(4+4) + NDA_LLADDR(4+6, padded to 8 + 4): 48 bytes.
_NEIGH_MSG = struct.Struct("=IHHII BxxxiHBB HH4s HH6s2x")
_NEIGH_MSG_LEN = _NEIGH_MSG.size
_NLMSGHDR = struct.Struct("=IHHII")
_ERR = struct.Struct("=i")
_SEQ = struct.Struct("=I")

BATCH_BYTES_MAX = 200_000
"""Bytes per sendmsg. The kernel refuses a netlink datagram larger than the socket's send
buffer (netlink_sendmsg: EMSGSIZE); 200 KB is about 4,000 entries, enough to amortise the
syscall, and their acks (one skb each, about 1 KB of truesize) fit RCVBUF_BYTES."""
SNDBUF_BYTES = 1 << 20  # must exceed BATCH_BYTES_MAX
RCVBUF_BYTES = 8 << 20  # the kernel doubles it: 16 MB of acks, several batches' worth
ACK_TRUESIZE_BYTES = 1024  # receive-buffer cost of one ack skb (payload ~36 B, rounded up)
ACK_TIMEOUT_S = 30.0  # the kernel answers within the sendmsg call; this only stops a hang

_BATCHABLE = (FdbAdd, FdbDel, NeighAdd, NeighDel)


def _mac_bytes(mac: str) -> bytes:
    b = bytes.fromhex(mac.replace(":", ""))
    if len(b) != 6:
        raise ValueError(f"bad MAC {mac!r}")
    return b


def _ipv4_bytes(ip: str) -> bytes:
    # inet_pton is strict (no "10.1" shorthand) and ten times faster than ipaddress,
    # which was the largest Python cost of a 20,000-entry batch.
    try:
        return socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        raise ValueError(f"bad IPv4 address {ip!r}") from None


def encode_neigh(op: FdbAdd | FdbDel | NeighAdd | NeighDel, ifindex: int, seq: int) -> bytes:
    """One RTM_NEWNEIGH/RTM_DELNEIGH request for ``op`` (FDB: AF_BRIDGE with NTF_SELF, as
    ``bridge fdb add ... self permanent``; neighbour: AF_INET, NUD_PERMANENT)."""
    e = op.entry
    if isinstance(op, FdbAdd | FdbDel):
        family, state, ntf, ip = AF_BRIDGE, NUD_NOARP | NUD_PERMANENT, NTF_SELF, e.dst
    else:
        family, state, ntf, ip = socket.AF_INET, NUD_PERMANENT, 0, e.ip
    if isinstance(op, FdbAdd | NeighAdd):
        mtype, flags = RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    else:
        mtype, flags = RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK
    return _NEIGH_MSG.pack(
        _NEIGH_MSG_LEN, mtype, flags, seq, 0,
        family, ifindex, state, ntf, 0,
        8, NDA_DST, _ipv4_bytes(ip),
        10, NDA_LLADDR, _mac_bytes(e.mac),
    )  # fmt: skip


def _inverse(op: Op) -> Op:
    if isinstance(op, FdbAdd):
        return FdbDel(op.entry, op.netns)
    if isinstance(op, FdbDel):
        return FdbAdd(op.entry, op.netns)
    if isinstance(op, NeighAdd):
        return NeighDel(op.entry, op.netns)
    assert isinstance(op, NeighDel)
    return NeighAdd(op.entry, op.netns)


@contextmanager
def _errors(op: object) -> Iterator[None]:
    """Turn pyroute2 and OS errors into KernelError naming the op."""
    try:
        yield
    except NetlinkError as e:
        raise KernelError(e.code, op, str(e)) from e
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, op, str(e)) from e


class NetlinkKernel:
    """``types.Kernel`` on the real kernel. Not thread-safe: one caller at a time."""

    def __init__(self, base_netns: str | None = None) -> None:
        self.base_netns = base_netns
        self._ipr: dict[str | None, IPRoute] = {}
        self._raw: dict[str | None, socket.socket] = {}
        self._chunk: dict[str | None, int] = {}  # messages per sendmsg, per raw socket
        self._seq = 0
        if base_netns is not None and not self._exists(base_netns):
            raise KernelError(errno.ENOENT, None, f"base netns {base_netns!r} not found")

    def clone(self) -> NetlinkKernel:
        """Another kernel on the same base namespace with sockets of its own (opened on first
        use, on the thread that uses it): for a second thread, since this one is not
        thread-safe (the worker's fast path)."""
        return NetlinkKernel(self.base_netns)

    # ---- Kernel protocol -------------------------------------------------------------

    def list_netns(self) -> set[str]:
        return set(pr_netns.listnetns()) - {self.base_netns}

    def snapshot(self, netns: str | None = None) -> KernelState:
        ipr = self._iproute(netns, None)
        with _errors(("snapshot", netns)):
            return self._snapshot(ipr)

    def apply(self, ops: list[Op]) -> None:
        i = 0
        while i < len(ops):
            op = ops[i]
            if isinstance(op, _BATCHABLE):
                j = i + 1
                while j < len(ops) and isinstance(ops[j], _BATCHABLE) and ops[j].netns == op.netns:
                    j += 1
                self._apply_batch(op.netns, ops[i:j])
                i = j
                continue
            handler = getattr(self, "_op_" + type(op).__name__, None)
            if handler is None:
                raise KernelError(errno.EOPNOTSUPP, op, "unknown op")
            with _errors(op):
                handler(op)
            i += 1

    def close(self) -> None:
        for key in list(self._ipr) + list(self._raw):
            self._close_ns(key)

    def __enter__(self) -> NetlinkKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- namespaces and sockets ------------------------------------------------------

    def _real(self, netns: str | None) -> str | None:
        return self.base_netns if netns is None else netns

    @staticmethod
    def _exists(name: str) -> bool:
        return os.path.exists(os.path.join(NETNS_RUN_DIR, name))

    def _check_ns(self, netns: str | None, op: object) -> str | None:
        real = self._real(netns)
        if real is not None and not self._exists(real):
            raise KernelError(errno.ENOENT, op, f"no netns {real!r}")
        return real

    def _iproute(self, netns: str | None, op: object) -> IPRoute:
        real = self._check_ns(netns, op)
        ipr = self._ipr.get(real)
        if ipr is None:
            with _errors(op):
                # flags=0: never let pyroute2 create a namespace we did not ask for.
                if real is None:
                    ipr = IPRoute()
                else:
                    with nsutil.in_netns(real):  # no fork: see nsutil
                        ipr = IPRoute()
            self._ipr[real] = ipr
        return ipr

    def _raw_socket(self, netns: str | None, op: object) -> socket.socket:
        real = self._check_ns(netns, op)
        sock = self._raw.get(real)
        if sock is None:
            with _errors(op):
                if real is None:
                    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
                else:
                    with nsutil.in_netns(real):
                        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
                for force, plain, size in (
                    (SO_SNDBUFFORCE, socket.SO_SNDBUF, SNDBUF_BYTES),
                    (SO_RCVBUFFORCE, socket.SO_RCVBUF, RCVBUF_BYTES),
                ):
                    try:  # the FORCE variant (root) is not capped by net.core.*mem_max
                        sock.setsockopt(socket.SOL_SOCKET, force, size)
                    except PermissionError:
                        sock.setsockopt(socket.SOL_SOCKET, plain, size)
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
                sock.bind((0, 0))
                sock.settimeout(ACK_TIMEOUT_S)
                # Without the FORCE options (not root) the buffer may be small: never send
                # more requests at once than the acks that fit, or acks are lost (ENOBUFS).
                rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                self._chunk[real] = max(
                    1, min(BATCH_BYTES_MAX // _NEIGH_MSG_LEN, rcvbuf // ACK_TRUESIZE_BYTES)
                )
            self._raw[real] = sock
        return sock

    def _close_ns(self, real: str | None) -> None:
        ipr = self._ipr.pop(real, None)
        if ipr is not None:
            with suppress(Exception):
                ipr.close()
        sock = self._raw.pop(real, None)
        self._chunk.pop(real, None)
        if sock is not None:
            sock.close()

    def _index(self, ipr: IPRoute, name: str, op: object) -> int:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise KernelError(errno.ENODEV, op, f"no device {name!r}")
        return found[0]

    # ---- snapshot --------------------------------------------------------------------

    def _snapshot(self, ipr: IPRoute) -> KernelState:
        state = KernelState()
        msgs = list(ipr.get_links())
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
        vxlans: set[int] = set()
        for m in msgs:
            info = m.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
            vx = None
            if kind == "vxlan":
                vxlans.add(m["index"])
                data = info.get_attr("IFLA_INFO_DATA")
                vx = VxlanAttrs(
                    vni=data.get_attr("IFLA_VXLAN_ID"),
                    local=data.get_attr("IFLA_VXLAN_LOCAL") or "",
                    port=data.get_attr("IFLA_VXLAN_PORT"),
                    learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
                    proxy=bool(data.get_attr("IFLA_VXLAN_PROXY")),
                )
            master = m.get_attr("IFLA_MASTER")
            name = m.get_attr("IFLA_IFNAME")
            state.links[name] = Link(
                name=name,
                kind=kind,
                mtu=m.get_attr("IFLA_MTU"),
                up=bool(m["flags"] & IFF_UP),
                master=names.get(master) if master else None,
                mac=(m.get_attr("IFLA_ADDRESS") or "").lower() or None,
                vxlan=vx,
            )
        for m in ipr.get_addr(family=socket.AF_INET):
            ip = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            state.addrs.add(Addr(names[m["index"]], f"{ip}/{m['prefixlen']}"))
        for m in ipr.get_routes(family=socket.AF_INET):
            table = m.get_attr("RTA_TABLE") or m["table"]
            if table != RT_TABLE_MAIN or m["proto"] not in (RTPROT_BOOT, RTPROT_STATIC):
                continue
            if m["type"] != RTN_UNICAST:
                continue
            dst = "default" if m["dst_len"] == 0 else f"{m.get_attr('RTA_DST')}/{m['dst_len']}"
            oif = m.get_attr("RTA_OIF")
            state.routes.add(Route(dst, m.get_attr("RTA_GATEWAY"), names.get(oif)))
        if vxlans:
            for m in ipr.get_neighbours(family=AF_BRIDGE):
                dst = m.get_attr("NDA_DST")
                if m["ifindex"] in vxlans and dst and m["state"] & NUD_PERMANENT:
                    mac = m.get_attr("NDA_LLADDR").lower()
                    state.fdb.add(FdbEntry(names[m["ifindex"]], mac, dst))
        for m in ipr.get_neighbours(family=socket.AF_INET):
            mac = m.get_attr("NDA_LLADDR")
            if m["state"] & NUD_PERMANENT and mac:
                state.neigh.add(NeighEntry(names[m["ifindex"]], m.get_attr("NDA_DST"), mac))
        return state

    # ---- batched FDB / neighbour ops -------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFFFFFFFF + 1
        return self._seq

    def _apply_batch(self, netns: str | None, ops: list[Op]) -> None:
        sock = self._raw_socket(netns, ops[0])
        if self._real(netns) is None:
            # Our own namespace: one ioctl per device, instead of a pyroute2 dump of every
            # link, which was most of a small batch's time (the worker's fast path, two ops).
            index: dict[str, int] = {}
            for dev in {op.entry.dev for op in ops}:
                with suppress(OSError):  # no such device: ENODEV below, naming the op
                    index[dev] = socket.if_nametoindex(dev)
        else:
            ipr = self._iproute(netns, ops[0])
            with _errors(ops[0]):
                index = {m.get_attr("IFLA_IFNAME"): m["index"] for m in ipr.get_links()}
        stop: KernelError | None = None
        msgs: list[bytes] = []
        for op in ops:
            ifindex = index.get(op.entry.dev)
            if ifindex is None:
                stop = KernelError(errno.ENODEV, op, f"no device {op.entry.dev!r}")
                break
            try:
                msgs.append(encode_neigh(op, ifindex, 0))
            except ValueError as e:
                stop = KernelError(errno.EINVAL, op, str(e))
                break
        per_chunk = self._chunk[self._real(netns)]
        for start in range(0, len(msgs), per_chunk):
            chunk_ops = ops[start : start + per_chunk]
            codes = self._send(sock, msgs[start : start + per_chunk], chunk_ops[0])
            failed = next((k for k, c in enumerate(codes) if c), None)
            if failed is not None:
                undo = [
                    _inverse(o)
                    for o, c in zip(chunk_ops[failed + 1 :], codes[failed + 1 :], strict=True)
                    if c == 0
                ]
                if undo:
                    undo_msgs = [encode_neigh(o, index[o.entry.dev], 0) for o in undo]
                    self._send(sock, undo_msgs, undo[0])
                raise KernelError(codes[failed], chunk_ops[failed], "batched")
        if stop is not None:
            raise stop

    def _send(self, sock: socket.socket, msgs: list[bytes], op: object) -> list[int]:
        """Send ``msgs`` in one datagram (fresh sequence numbers patched in) and return
        each one's errno (0 = done), in order."""
        buf = bytearray(b"".join(msgs))
        pending: dict[int, int] = {}
        for k in range(len(msgs)):
            seq = self._next_seq()
            _SEQ.pack_into(buf, k * _NEIGH_MSG_LEN + 8, seq)
            pending[seq] = k
        codes = [0] * len(msgs)
        with _errors(op):
            sock.send(buf)
            rbuf = bytearray(1 << 20)
            view = memoryview(rbuf)
            while pending:
                n = sock.recv_into(rbuf)
                off = 0
                while off + 16 <= n:
                    length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(view, off)
                    if mtype == NLMSG_ERROR and seq in pending:
                        codes[pending.pop(seq)] = -_ERR.unpack_from(view, off + 16)[0]
                    off += (length + 3) & ~3 if length else n
        return codes

    # ---- one-by-one ops (pyroute2) ---------------------------------------------------

    def _op_NetnsAdd(self, op: NetnsAdd) -> None:
        if not op.name or "/" in op.name or op.name in (".", ".."):
            raise KernelError(errno.EINVAL, op, "invalid netns name")
        if self._exists(op.name):
            raise KernelError(errno.EEXIST, op, "netns exists")
        with _errors(op):
            nsutil.create(op.name)

    def _op_NetnsDel(self, op: NetnsDel) -> None:
        ipr = self._iproute(op.name, op)
        # Delete virtual links first: namespace teardown is asynchronous, and the veth
        # peers in other namespaces must be gone when apply returns.
        for m in ipr.get_links():
            info = m.get_attr("IFLA_LINKINFO")
            if info and info.get_attr("IFLA_INFO_KIND"):
                try:
                    ipr.link("del", index=m["index"])
                except NetlinkError as e:
                    if e.code != errno.ENODEV:  # already gone with its veth peer
                        raise
        self._close_ns(op.name)
        with _errors(op):
            nsutil.remove(op.name)

    def _op_BridgeAdd(self, op: BridgeAdd) -> None:
        self._iproute(op.netns, op).link("add", ifname=op.name, kind="bridge", mtu=op.mtu)

    def _op_VxlanAdd(self, op: VxlanAdd) -> None:
        a = op.attrs
        self._iproute(op.netns, op).link(
            "add",
            ifname=op.name,
            kind="vxlan",
            mtu=op.mtu,
            vxlan_id=a.vni,
            vxlan_local=a.local,
            vxlan_port=a.port,
            vxlan_learning=int(a.learning),
            vxlan_proxy=int(a.proxy),
        )

    def _op_VethAdd(self, op: VethAdd) -> None:
        ipr = self._iproute(op.netns, op)
        peer: dict[str, object] = {"ifname": op.peer, "mtu": op.mtu}
        if op.peer_mac:
            peer["address"] = op.peer_mac.lower()
        fd = None
        if op.peer_netns is not None and self._real(op.peer_netns) != self._real(op.netns):
            self._check_ns(op.peer_netns, op)
            fd = os.open(os.path.join(NETNS_RUN_DIR, op.peer_netns), os.O_RDONLY)
            peer["net_ns_fd"] = fd  # the peer is born in its namespace: no move, no race
        try:
            ipr.link("add", ifname=op.name, kind="veth", mtu=op.mtu, peer=peer)
        finally:
            if fd is not None:
                os.close(fd)

    def _op_LinkDel(self, op: LinkDel) -> None:
        ipr = self._iproute(op.netns, op)
        ipr.link("del", index=self._index(ipr, op.name, op))

    def _op_LinkSet(self, op: LinkSet) -> None:
        ipr = self._iproute(op.netns, op)
        kw: dict[str, object] = {"index": self._index(ipr, op.name, op)}
        if op.mtu is not None:
            kw["mtu"] = op.mtu
        if op.master is not None:
            kw["master"] = self._index(ipr, op.master, op) if op.master else 0
        if op.up is not None:
            kw["state"] = "up" if op.up else "down"
        ipr.link("set", **kw)

    def _addr(self, cmd: str, op: AddrAdd | AddrDel) -> None:
        ipr = self._iproute(op.netns, op)
        iface = ipaddress.IPv4Interface(op.addr.cidr)
        index = self._index(ipr, op.addr.dev, op)
        ipr.addr(cmd, index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)

    def _op_AddrAdd(self, op: AddrAdd) -> None:
        self._addr("add", op)

    def _op_AddrDel(self, op: AddrDel) -> None:
        self._addr("del", op)

    def _route(self, cmd: str, op: RouteAdd | RouteDel) -> None:
        ipr = self._iproute(op.netns, op)
        r = op.route
        kw: dict[str, object] = {
            "dst": "0.0.0.0/0" if r.dst == "default" else str(ipaddress.IPv4Network(r.dst)),
            "table": RT_TABLE_MAIN,
        }
        if r.dev is not None:
            kw["oif"] = self._index(ipr, r.dev, op)
        if r.gateway is not None:
            kw["gateway"] = r.gateway
        if cmd == "add":
            # as `ip route add`: a route without a gateway is link scope, so that it can
            # resolve gateways of other routes
            kw["proto"] = RTPROT_STATIC
            kw["scope"] = RT_SCOPE_UNIVERSE if r.gateway else RT_SCOPE_LINK
        ipr.route(cmd, **kw)

    def _op_RouteAdd(self, op: RouteAdd) -> None:
        self._route("add", op)

    def _op_RouteDel(self, op: RouteDel) -> None:
        self._route("del", op)
