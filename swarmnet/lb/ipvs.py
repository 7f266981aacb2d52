"""The IPVS load-balancer backend. KERNEL BOUNDARY: every IPVS call of swarmnet is here, and
the nft calls of the small table this backend owns beside IPVS.

What it programs, in the namespace it owns (the VIP must be a LOCAL address there: IPVS sees
packets at LOCAL_IN and LOCAL_OUT only; the caller adds it, e.g. /32 on ``lo``):

- **One IPVS service per (VIP, protocol, port)** for a service with a port: one
  self-contained kernel object whose key is our key, so the diff maps 1:1 onto requests and
  ``dump`` reads it back without help.
- **One firewall-mark IPVS service per (VIP, protocol)** for an all-ports service (port 0,
  ``plan.ALL_PORTS``), Docker's design: IPVS keys such a service on ``skb->mark`` only, and
  destinations with port 0 keep the packet's destination port. Docker has one mark per VIP;
  we have one per (VIP, protocol) because ``LBService`` keys carry the protocol, so a VIP's
  tcp and udp all-ports services may have different backends (or exist alone).
- **Table ``inet swarmnet-ipvs``** (``IpvsConfig.table``), owned by this backend and by no
  one else::

      map marks { type ipv4_addr . inet_proto : mark }      # all-ports VIP -> its mark
      set rejects { type ipv4_addr . inet_proto . inet_service }   # no live backend
      set rejects-vip { type ipv4_addr . inet_proto }              # idem, all-ports
      chain prerouting { type filter hook prerouting priority mangle; ... }
      chain output     { type filter hook output priority mangle; ... }
          ct state new <key> @rejects[-vip] reject (tcp reset for tcp)
          meta mark set ip daddr . meta l4proto map @marks

  One hash lookup per packet whatever the number of VIPs. The map IS the record of which
  mark belongs to which VIP: ``dump`` joins it with IPVS's fwmark services, so a restarted
  agent recovers its marks from the kernel. Marks come from ``mark_base + i`` (the lowest
  free ``i``, new keys in sorted order: deterministic given the kernel's state), and a
  service keeps its mark for life, so a full sync never renumbers (which would recreate
  the IPVS service and cut its connections). A fwmark service in our range without a map
  entry (a crash between the two writes) is deleted by the next full sync.
- **Rejects**: IPVS drops silently when a service has no destination; the plan promises a
  refusal (TCP RST / ICMP port unreachable), so a service without a live backend is in a
  reject set, as with the nft backend. Unlike the nft backend the rule matches ``ct state
  new`` only: IPVS keeps draining (weight 0) destinations, and their established
  connections must go on (the chains run after conntrack, priority mangle = -150).
- **NAT forwarding** (``IP_VS_CONN_F_MASQ``, fwd_method 0, as the VM lab found): backends are
  in other namespaces and reply through the node, which un-NATs them. **rr scheduler**, like
  Docker. **sysctls** of the namespace (``net.ipv4.vs.*``), set at start: ``conntrack=1``
  (keep conntrack entries for IPVS connections, so NAT rules, reply routing and the reject
  chains' ``ct state`` see them), ``expire_nodest_conn=1`` (a connection whose backend was
  removed is dropped at its next packet instead of black-holing until timeout: Docker's
  stale-UDP pain point 5), ``conn_reuse_mode=0`` (Docker's setting: do not reschedule
  reused source ports, which with conntrack=1 stalls new connections for a second).
- A **draining** backend (weight 0) stays as a destination with weight 0: established
  connections continue, new ones go elsewhere.

Order of a change (no window where a marked packet finds no IPVS service, or where a
service without live backends is silent): nft "pre" (mark elements removed, rejects added),
then the IPVS requests, then nft "post" (mark elements added, rejects removed).

The netlink encoding is written here with ``struct`` over a raw generic-netlink socket (the
IPVS family, linux/ip_vs.h), not with pyroute2: the import-linter contract keeps pyroute2
inside ``swarmnet.kernel``, and the IPVS message set we need is small. Requests are sent one
at a time and each ack is checked. IPVS has no multi-object transactions: a failure mid-way
leaves some changes applied, and the next ``sync`` is a full one that diffs against a fresh
dump (IPVS and the mark table), which repairs it. The nft table is written with the ``nft``
program (one transaction per call): it changes only when all-ports services come and go or
a service gains or loses its last live backend, so a process start is affordable there.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
from dataclasses import dataclass, field

from ..kernel import nsutil
from ..kernel.errors import KernelError
from .backend import SyncingBackend
from .plan import ALL_PORTS, Backend, LBChanges, LBService, LBState, backend_diff, diff

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = 0x3FFF

IPVS_GENL_NAME = b"IPVS\0"
IPVS_GENL_VERSION = 1
IPVS_CMD_NEW_SERVICE, IPVS_CMD_SET_SERVICE, IPVS_CMD_DEL_SERVICE, IPVS_CMD_GET_SERVICE = 1, 2, 3, 4
IPVS_CMD_NEW_DEST, IPVS_CMD_SET_DEST, IPVS_CMD_DEL_DEST, IPVS_CMD_GET_DEST = 5, 6, 7, 8
IPVS_CMD_FLUSH = 17
IPVS_CMD_ATTR_SERVICE, IPVS_CMD_ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK = 1, 2, 3, 4, 5
SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = 6, 7, 8, 9
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = 1, 2, 3, 4, 5, 6
DEST_ADDR_FAMILY = 11
IP_VS_CONN_F_MASQ = 0
PROTO_NUM = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO_NUM.items()}
MarkKey = tuple[str, str]  # (vip, proto) of an all-ports service


@dataclass(frozen=True)
class IpvsConfig:
    scheduler: str = "rr"  # Docker's choice; every backend equal, no connection counting
    sysctls: tuple[tuple[str, str], ...] = (
        ("conntrack", "1"),
        ("expire_nodest_conn", "1"),
        ("conn_reuse_mode", "0"),
    )
    timeout_s: float = 10.0  # one netlink request: the kernel answers in microseconds
    table: str = "swarmnet-ipvs"  # the owned nft table (family inet); not the nft backend's
    # Marks are 0x534E0000 + i ("SN" in the high half: recognisable in a trace, and far from
    # the small marks other tools use); 65,536 all-ports (VIP, protocol) pairs per namespace.
    mark_base: int = 0x534E0000
    mark_count: int = 0x10000
    nft_timeout_s: float = 120.0  # one `nft` run: a process start, ~20x slower in a TCG VM

    def owns_mark(self, mark: int) -> bool:
        return self.mark_base <= mark < self.mark_base + self.mark_count


# ---- message encoding (pure) --------------------------------------------------------------


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _nest(kind: int, attrs: list[bytes]) -> bytes:
    return _nla(kind | NLA_F_NESTED, b"".join(attrs))


def _u16(v: int) -> bytes:
    return struct.pack("=H", v)


def _u32(v: int) -> bytes:
    return struct.pack("=I", v)


def _be16(v: int) -> bytes:
    return struct.pack(">H", v)


def _addr(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def service_attr(
    svc: LBService, full: bool, scheduler: str = "rr", mark: int | None = None
) -> bytes:
    """IPVS_CMD_ATTR_SERVICE: the key, (af, protocol, addr, port) or (af, fwmark) when
    ``mark`` is given (an all-ports service); ``full`` adds what a new service needs
    (scheduler, flags, timeout, netmask: the kernel requires all four)."""
    attrs = [_nla(SVC_AF, _u16(socket.AF_INET))]
    if mark is not None:
        attrs.append(_nla(SVC_FWMARK, _u32(mark)))
    else:
        attrs += [
            _nla(SVC_PROTOCOL, _u16(PROTO_NUM[svc.proto])),
            _nla(SVC_ADDR, _addr(svc.vip)),
            _nla(SVC_PORT, _be16(svc.port)),
        ]
    if full:
        attrs += [
            _nla(SVC_SCHED_NAME, scheduler.encode() + b"\0"),
            _nla(SVC_FLAGS, struct.pack("=II", 0, 0xFFFFFFFF)),
            _nla(SVC_TIMEOUT, _u32(0)),
            _nla(SVC_NETMASK, struct.pack(">I", 0xFFFFFFFF)),
        ]
    return _nest(IPVS_CMD_ATTR_SERVICE, attrs)


def dest_attr(b: Backend, full: bool) -> bytes:
    """IPVS_CMD_ATTR_DEST. Port 0 (an all-ports backend): IPVS keeps the packet's port."""
    attrs = [_nla(DEST_ADDR, _addr(b.ip)), _nla(DEST_PORT, _be16(b.port))]
    if full:
        attrs += [
            _nla(DEST_FWD_METHOD, _u32(IP_VS_CONN_F_MASQ)),
            _nla(DEST_WEIGHT, _u32(b.weight)),
            _nla(DEST_U_THRESH, _u32(0)),
            _nla(DEST_L_THRESH, _u32(0)),
            _nla(DEST_ADDR_FAMILY, _u16(socket.AF_INET)),
        ]
    return _nest(IPVS_CMD_ATTR_DEST, attrs)


def parse_attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i + 4 <= len(buf):
        n, kind = struct.unpack_from("=HH", buf, i)
        if n < 4:
            break
        out[kind & NLA_TYPE_MASK] = buf[i + 4 : i + n]
        i += (n + 3) & ~3
    return out


def parse_service(payload: bytes) -> LBService | int | None:
    """One answer of a service dump: an ``LBService`` without backends (a VIP:port
    service), the mark (an int) of a fwmark service, or None (IPv6, another protocol,
    port 0 without a mark: not something this backend programs)."""
    a = parse_attrs(parse_attrs(payload)[IPVS_CMD_ATTR_SERVICE])
    if struct.unpack("=H", a[SVC_AF][:2])[0] != socket.AF_INET:
        return None
    if SVC_FWMARK in a and SVC_ADDR not in a:
        return struct.unpack("=I", a[SVC_FWMARK][:4])[0]
    proto = PROTO_NAME.get(struct.unpack("=H", a[SVC_PROTOCOL][:2])[0])
    port = struct.unpack(">H", a[SVC_PORT][:2])[0]
    if proto is None or port == ALL_PORTS:
        return None
    return LBService(str(ipaddress.IPv4Address(a[SVC_ADDR][:4])), proto, port)


def parse_dest(payload: bytes) -> Backend:
    d = parse_attrs(parse_attrs(payload)[IPVS_CMD_ATTR_DEST])
    return Backend(
        str(ipaddress.IPv4Address(d[DEST_ADDR][:4])),
        struct.unpack(">H", d[DEST_PORT][:2])[0],
        struct.unpack("=I", d[DEST_WEIGHT][:4])[0],
    )


# ---- marks and the nft table (pure) -------------------------------------------------------


def mark_key(svc: LBService) -> MarkKey:
    return (svc.vip, svc.proto)


def allocate_marks(
    used: dict[MarkKey, int], wanted: list[MarkKey], cfg: IpvsConfig
) -> dict[MarkKey, int]:
    """Marks for the ``wanted`` keys that have none in ``used``: the lowest free ones, keys
    in sorted order (deterministic). Raises KernelError(ENOSPC) when the range is full."""
    taken = set(used.values())
    out: dict[MarkKey, int] = {}
    i = 0
    for key in sorted(set(wanted) - used.keys()):
        while cfg.mark_base + i in taken:
            i += 1
        if i >= cfg.mark_count:
            raise KernelError(errno.ENOSPC, ("allocate mark", key), "all fwmarks in use")
        out[key] = cfg.mark_base + i
        taken.add(cfg.mark_base + i)
    return out


def _reject_key(svc: LBService) -> tuple[str, str]:
    """(set name, element) of a service in the reject sets."""
    if svc.port == ALL_PORTS:
        return "rejects-vip", f"{svc.vip} . {svc.proto}"
    return "rejects", f"{svc.vip} . {svc.proto} . {svc.port}"


def render_reset(marks: dict[MarkKey, int], rejects: list[LBService], cfg: IpvsConfig) -> str:
    """One nft transaction that makes the owned table exactly this (whatever it held)."""
    t = f"inet {cfg.table}"
    lines = [
        f"add table {t}",
        f"delete table {t}",
        f"add table {t}",
        f"add map {t} marks {{ type ipv4_addr . inet_proto : mark; }}",
        f"add set {t} rejects {{ type ipv4_addr . inet_proto . inet_service; }}",
        f"add set {t} rejects-vip {{ type ipv4_addr . inet_proto; }}",
    ]
    for hook in ("prerouting", "output"):
        lines.append(
            f"add chain {t} {hook} {{ type filter hook {hook} priority mangle; policy accept; }}"
        )
        for match in ("ip daddr . meta l4proto . th dport @rejects",
                      "ip daddr . meta l4proto @rejects-vip"):  # fmt: skip
            lines += [
                f"add rule {t} {hook} ct state new {match} meta l4proto tcp reject with tcp reset",
                f"add rule {t} {hook} ct state new {match} reject",
            ]
        lines.append(f"add rule {t} {hook} meta mark set ip daddr . meta l4proto map @marks")
    return "\n".join(lines + render_elems(add_marks=marks, add_rejects=rejects, cfg=cfg)) + "\n"


def render_elems(
    *,
    cfg: IpvsConfig,
    add_marks: dict[MarkKey, int] | None = None,
    del_marks: list[MarkKey] | None = None,
    add_rejects: list[LBService] | None = None,
    del_rejects: list[LBService] | None = None,
) -> list[str]:
    """Element changes of the owned table, one nft command each (empty: nothing to run)."""
    t = f"inet {cfg.table}"
    lines = [f"delete element {t} marks {{ {v} . {p} }}" for v, p in del_marks or []]
    for (v, p), m in sorted((add_marks or {}).items()):
        lines.append(f"add element {t} marks {{ {v} . {p} : {m:#x} }}")
    for s in add_rejects or []:
        name, elem = _reject_key(s)
        lines.append(f"add element {t} {name} {{ {elem} }}")
    for s in del_rejects or []:
        name, elem = _reject_key(s)
        lines.append(f"delete element {t} {name} {{ {elem} }}")
    return lines


def parse_marks(doc: dict) -> dict[MarkKey, int]:
    """The ``marks`` map of ``nft -j list table inet <table>``."""
    out: dict[MarkKey, int] = {}
    for item in doc.get("nftables", []):
        if "map" in item and item["map"].get("name") == "marks":
            for key_expr, mark in item["map"].get("elem", []):
                vip, proto = key_expr["concat"]
                if isinstance(proto, int):
                    proto = PROTO_NAME.get(proto, str(proto))
                out[(vip, proto)] = int(mark)
    return out


@dataclass(frozen=True)
class Req:
    """One IPVS netlink request (``what`` names it in a KernelError)."""

    cmd: int
    attrs: tuple[bytes, ...]
    what: object


@dataclass
class IpvsPlan:
    """A change as data: nft text before, IPVS requests, nft text after, and the marks of
    every all-ports service once it is applied."""

    pre: str = ""
    reqs: list[Req] = field(default_factory=list)
    post: str = ""
    marks: dict[MarkKey, int] = field(default_factory=dict)


def plan_changes(changes: LBChanges, marks: dict[MarkKey, int], cfg: IpvsConfig) -> IpvsPlan:
    """The O(changed) plan. ``marks``: the marks in place now (kept for kept services)."""
    new_marks = allocate_marks(
        marks, [mark_key(s) for s in changes.added if s.port == ALL_PORTS], cfg
    )
    allm = {**marks, **new_marks}

    def key(s: LBService, full: bool = False) -> bytes:
        mark = allm[mark_key(s)] if s.port == ALL_PORTS else None
        return service_attr(s, full, cfg.scheduler, mark)

    reqs: list[Req] = []
    del_marks: list[MarkKey] = []
    add_rejects: list[LBService] = []
    del_rejects: list[LBService] = []
    add_marks: dict[MarkKey, int] = {}
    for s in changes.removed:
        if s.port == ALL_PORTS:
            del_marks.append(mark_key(s))
        reqs.append(Req(IPVS_CMD_DEL_SERVICE, (key(s),), ("del service", s.key)))
        if not s.live:
            del_rejects.append(s)
    for old, new in changes.changed:
        k, d = key(new), backend_diff(old, new)
        if old.live and not new.live:
            add_rejects.append(new)  # before the last live destination goes
        reqs += [Req(IPVS_CMD_NEW_DEST, (k, dest_attr(b, True)), ("add dest", b)) for b in d.added]
        reqs += [
            Req(IPVS_CMD_SET_DEST, (k, dest_attr(b, True)), ("set dest", b)) for b in d.reweighted
        ]
        reqs += [
            Req(IPVS_CMD_DEL_DEST, (k, dest_attr(b, False)), ("del dest", b)) for b in d.removed
        ]
        if new.live and not old.live:
            del_rejects.append(new)  # after the first live destination is there
    for s in changes.added:
        if not s.live:
            add_rejects.append(s)
        reqs.append(Req(IPVS_CMD_NEW_SERVICE, (key(s, True),), ("add service", s.key)))
        reqs += [
            Req(IPVS_CMD_NEW_DEST, (key(s), dest_attr(b, True)), ("add dest", b))
            for b in s.backends
        ]
        if s.port == ALL_PORTS:
            add_marks[mark_key(s)] = allm[mark_key(s)]
    for k in del_marks:
        allm.pop(k, None)
    pre = render_elems(cfg=cfg, del_marks=del_marks, add_rejects=add_rejects)
    post = render_elems(cfg=cfg, add_marks=add_marks, del_rejects=del_rejects)
    return IpvsPlan(_text(pre), reqs, _text(post), allm)


def plan_full(
    current: LBState,
    marks: dict[MarkKey, int],
    orphans: list[int],
    desired: LBState,
    cfg: IpvsConfig,
) -> IpvsPlan:
    """The plan that makes IPVS and the owned table exactly ``desired``, from what a dump
    found: ``current`` services, the ``marks`` map, and ``orphans`` (fwmark services in our
    range that the map does not name). The table is reset in the "pre" step with the
    rejects of ``desired`` and the marks it keeps; new marks are added after their IPVS
    service exists; with nothing desired the table is deleted."""
    wanted = {mark_key(s) for s in desired.services if s.port == ALL_PORTS}
    kept = {k: m for k, m in marks.items() if k in wanted}
    # Marks of removed services are still live until their IPVS service goes: not reusable.
    gone = {k: m for k, m in marks.items() if k not in wanted}
    changes = diff(current, desired)
    plan = plan_changes(changes, {**kept, **gone}, cfg)
    # An added service whose mark is in the map (its IPVS service was lost) keeps it: the
    # reset re-adds it with the kept ones.
    new = {k: m for k, m in plan.marks.items() if k in wanted and k not in kept}
    rejects = [s for s in desired.sorted() if not s.live]
    if desired.services:
        pre = render_reset(kept, rejects, cfg)
    else:
        pre = f"add table inet {cfg.table}\ndelete table inet {cfg.table}\n"
    orphan_reqs = [
        Req(IPVS_CMD_DEL_SERVICE, (_fwmark_attr(m),), ("del orphan fwmark service", m))
        for m in sorted(orphans)
    ]
    post = _text(render_elems(cfg=cfg, add_marks=new))
    return IpvsPlan(pre, orphan_reqs + plan.reqs, post, {**kept, **new})


def _fwmark_attr(mark: int) -> bytes:
    return _nest(IPVS_CMD_ATTR_SERVICE, [_nla(SVC_AF, _u16(socket.AF_INET)),
                                         _nla(SVC_FWMARK, _u32(mark))])  # fmt: skip


def _text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


# ---- the socket ---------------------------------------------------------------------------


class _GenlSocket:
    def __init__(self, timeout_s: float) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.settimeout(timeout_s)
        self.sock.bind((0, 0))
        self.seq = 0
        try:
            self.family = self._family_id()
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _family_id(self) -> int:
        msgs = self.request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            [_nla(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME)],
            version=1,
            dump=False,
            ack=False,
            what="IPVS family",
        )
        attrs = parse_attrs(msgs[0])
        return struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID][:2])[0]

    def request(self, family: int, cmd: int, attrs: list[bytes], *, version: int = 1,
                dump: bool = False, ack: bool = True, what: object = None) -> list[bytes]:  # fmt: skip
        """Send one request; return the attribute payloads of the answers (after the genl
        header). Raises KernelError with the kernel's errno."""
        self.seq += 1
        body = struct.pack("=BBH", cmd, version, 0) + b"".join(attrs)
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0) | (NLM_F_ACK if ack else 0)
        self.sock.send(struct.pack("=IHHII", 16 + len(body), family, flags, self.seq, 0) + body)
        out: list[bytes] = []
        while True:
            data = self.sock.recv(1 << 20)
            i = 0
            while i + 16 <= len(data):
                n, kind, _fl, seq, _pid = struct.unpack_from("=IHHII", data, i)
                payload = data[i + 16 : i + n]
                i += (n + 3) & ~3
                if seq != self.seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise KernelError(code, what, os.strerror(code))
                    return out  # the ack
                if kind == NLMSG_DONE:
                    return out
                out.append(payload[4:])  # skip the genl header
                if not dump and not ack:
                    return out


def probe(netns: str | None = None, timeout_s: float = 10.0) -> bool:
    """Whether the IPVS generic-netlink family answers in ``netns`` (the module loaded)."""
    ctx = contextlib.nullcontext() if netns is None else nsutil.in_netns(netns)
    try:
        with ctx:
            _GenlSocket(timeout_s).close()
    except KernelError:
        return False
    return True


class IpvsBackend(SyncingBackend):
    name = "ipvs"

    def __init__(self, netns: str | None = None, config: IpvsConfig | None = None) -> None:
        super().__init__()
        self.netns = netns
        self.cfg = config or IpvsConfig()
        self._marks: dict[MarkKey, int] = {}
        with self._ns():  # the socket and /proc/sys/net belong to the namespace they open in
            self._sock = _GenlSocket(self.cfg.timeout_s)
            try:
                for name, value in self.cfg.sysctls:
                    with open(f"/proc/sys/net/ipv4/vs/{name}", "w") as f:
                        f.write(value)
            except BaseException:
                self._sock.close()
                raise

    def _ns(self):
        if self.netns is None:
            return contextlib.nullcontext()
        return nsutil.in_netns(self.netns)

    def _req(self, cmd: int, attrs: list[bytes], what: object, dump: bool = False) -> list[bytes]:
        return self._sock.request(self._sock.family, cmd, attrs, dump=dump, what=what)

    def _run(self, plan: IpvsPlan) -> None:
        if plan.pre:
            self._nft(plan.pre, "nft pre")
        for r in plan.reqs:
            self._req(r.cmd, list(r.attrs), r.what)
        if plan.post:
            self._nft(plan.post, "nft post")
        self._marks = plan.marks

    # ---- the backend interface ---------------------------------------------------

    def _apply_full(self, state: LBState) -> None:
        # IPVS has no atomic replace: diff against what the kernel has now (only the
        # difference is touched, so live connections to unchanged services are kept).
        current, marks, orphans = self._read()
        self._run(plan_full(current, marks, orphans, state, self.cfg))

    def _apply_changes(self, changes: LBChanges) -> None:
        self._run(plan_changes(changes, self._marks, self.cfg))

    def dump(self) -> LBState:
        return self._read()[0]

    def _read(self) -> tuple[LBState, dict[MarkKey, int], list[int]]:
        """(services, the marks map, orphan marks) as the kernel holds them now."""
        marks = self._nft_marks()
        by_mark = {m: k for k, m in marks.items()}
        out, orphans = [], []
        for payload in self._req(IPVS_CMD_GET_SERVICE, [], "dump services", dump=True):
            found = parse_service(payload)
            if found is None:
                continue
            if isinstance(found, int):
                if not self.cfg.owns_mark(found):
                    continue  # someone else's fwmark service
                if found not in by_mark:
                    orphans.append(found)
                    continue
                svc, attr = LBService(*by_mark[found], ALL_PORTS), _fwmark_attr(found)
            else:
                svc, attr = found, service_attr(found, False)
            dests = self._req(IPVS_CMD_GET_DEST, [attr], ("dump dests", svc.key), dump=True)
            out.append(LBService(svc.vip, svc.proto, svc.port, tuple(map(parse_dest, dests))))
        return LBState(frozenset(out)), marks, orphans

    def close(self) -> None:
        self._sock.close()

    # ---- the owned nft table -------------------------------------------------------

    def _nft_marks(self) -> dict[MarkKey, int]:
        rc, out, err = self._nft_exec(["-j", "list", "table", "inet", self.cfg.table], None)
        if rc != 0:
            if "No such file or directory" in err:
                return {}
            raise KernelError(errno.EIO, "nft list table", err.strip()[:2000])
        return parse_marks(json.loads(out))

    def _nft(self, text: str, what: str) -> None:
        rc, _out, err = self._nft_exec(["-f", "-"], text)
        if rc != 0:
            code = errno.EIO
            if "No such file or directory" in err:
                code = errno.ENOENT
            elif "File exists" in err:
                code = errno.EEXIST
            raise KernelError(code, what, err.strip()[:2000])

    def _nft_exec(self, args: list[str], text: str | None) -> tuple[int, str, str]:
        # A child forked by a thread inside the namespace is born in it (no `ip netns exec`).
        with self._ns():
            try:
                p = subprocess.run(["nft", *args], input=text, capture_output=True, text=True,
                                   timeout=self.cfg.nft_timeout_s)  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as e:
                raise KernelError(errno.EIO, ("nft", args[:2]), str(e)) from e
        return p.returncode, p.stdout, p.stderr
