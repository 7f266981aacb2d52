"""Incremental nftables changes as raw nf_tables netlink messages. KERNEL BOUNDARY (with
``nft``): the encoder below is pure; ``NftNetlink`` owns one NETLINK_NETFILTER socket.

Why not libnftables for a change (measured, 1,000 services x 10 backends, nft 1.0.6): before
every command that adds a rule, libnftables refetches its cache of the table (GETGEN,
GETTABLE, GETCHAIN, GETSET, GETOBJ, GETFLOWTABLE, and the elements of the anonymous maps),
because our own previous commit bumped the ruleset generation. For 1,000 service chains and
their 1,000 anonymous maps that was 6-8 ms per change whatever its size, while the change
itself is two or three small messages. So a change is sent here as ONE nfnetlink batch
(BATCH_BEGIN ... BATCH_END: one kernel transaction, all or nothing, exactly like
``nft -f``), encoded from the very same ``plan`` ops the fake applies, with no cache at all:

- ``FlushChain``: NFT_MSG_DELRULE with table + chain and no handle (the kernel's "flush
  chain"), so no rule handles are needed;
- ``AddServiceRule``: NFT_MSG_NEWSET of the anonymous selection map (``__map%d``, bound by a
  batch-local set id), NFT_MSG_NEWSETELEM of its slots, NFT_MSG_NEWRULE referencing it. The
  old rule's anonymous map is released by the kernel with the old rule;
- chains and the ``services``/``vips``/``rejects`` elements: NEWCHAIN, DELCHAIN,
  NEWSETELEM, DELSETELEM by name.

The bytes are those nft 1.0.6 sends for the rule ``render`` writes (flags, expressions,
the set's user data that tells ``nft list`` the byte order: see the golden test in
tests/unit/test_lb_plan.py, captured with ``nft --debug=mnl``), so a dump of the table
through libnftables reads back exactly what a full load would have written, and a full
resync from kernel state keeps working after any number of netlink changes.

Errors: the kernel handles a batch inside our sendmsg and queues one NLMSG_ERROR per failing
message before sendmsg returns; the last message asks for an ACK so that success is
positive, not the absence of an answer.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence

from ..kernel import nsutil
from ..kernel.errors import KernelError
from .plan import (
    ALL_PORTS,
    AddChain,
    AddElem,
    AddReject,
    AddServiceRule,
    DelChain,
    DelElem,
    DelReject,
    FlushChain,
    LBService,
    NftOp,
    ServiceKey,
    slots,
)

NETLINK_NETFILTER = 12
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE = 32
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x200, 0x400, 0x800
NLA_F_NESTED = 0x8000
NFPROTO_INET, NFPROTO_IPV4 = 1, 2

# enum nf_tables_msg_types
NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWSET, NEWSETELEM, DELSETELEM = 3, 5, 6, 8, 9, 12, 14

# attribute numbers from linux/netfilter/nf_tables.h
CHAIN_TABLE, CHAIN_NAME = 1, 3
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS = 1, 2, 4
LIST_ELEM = 1
EXPR_NAME, EXPR_DATA = 1, 2
SET_TABLE, SET_NAME, SET_FLAGS, SET_KEY_TYPE, SET_KEY_LEN = 1, 2, 3, 4, 5
SET_DATA_TYPE, SET_DATA_LEN, SET_DESC, SET_ID, SET_USERDATA = 6, 7, 9, 10, 13
SET_DESC_SIZE = 1
ELEM_LIST_TABLE, ELEM_LIST_SET, ELEM_LIST_ELEMENTS, ELEM_LIST_SET_ID = 1, 2, 3, 4
ELEM_KEY, ELEM_DATA, ELEM_FLAGS = 1, 2, 3
DATA_VALUE, DATA_VERDICT = 1, 2
VERDICT_CODE, VERDICT_CHAIN = 1, 2
NFT_GOTO = -4
NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_INTERVAL, NFT_SET_MAP = 0x1, 0x2, 0x4, 0x8
NFT_SET_ELEM_INTERVAL_END = 0x1
NFT_REG_1, NFT_REG32_01 = 1, 9  # the 8-byte lookup result: address in reg 1, port 4 bytes on
NFT_META_L4PROTO, NFT_CMP_EQ, NFT_NG_RANDOM, NFT_BYTEORDER_HTON, NFT_NAT_DNAT = 16, 0, 1, 1, 0x1
# nftables' datatype ids, as nft stores them in a set (a concatenation is t1 << 6 | t2)
TYPE_INTEGER, TYPE_IPADDR, TYPE_INET_SERVICE = 4, 7, 13
# libnftnl's set user data (NFTNL_UDATA_SET_*) and nftables' enum byteorder
UDATA_KEYBYTEORDER, UDATA_DATABYTEORDER, UDATA_DATA_INTERVAL = 0, 1, 6
BYTEORDER_INVALID, BYTEORDER_HOST, BYTEORDER_BIG = 0, 1, 2
ANON_MAP_NAME = b"__map%d\0"  # the kernel picks the number

PROTO_NUM = {"tcp": 6, "udp": 17}


# ---- pure encoding -------------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _nest(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(LIST_ELEM, _str(EXPR_NAME, name), _nest(EXPR_DATA, *attrs))


def _udata(kind: int, value: int) -> bytes:
    return struct.pack("=BB", kind, 4) + struct.pack("=I", value)  # host order (libnftnl)


def _svc_key(key: ServiceKey) -> bytes:
    """``ip daddr . meta l4proto [. th dport]``: each part in its own 4-byte register."""
    vip, proto, port = key
    out = socket.inet_aton(vip) + struct.pack("=B3x", PROTO_NUM[proto])
    return out if port == ALL_PORTS else out + struct.pack(">H2x", port)


class Batch:
    """One nfnetlink batch (one kernel transaction) under construction. ``seq`` is the
    BATCH_BEGIN's sequence number; the messages follow it, then BATCH_END."""

    def __init__(self, table: str, map_name: str, vip_map_name: str, seq: int = 1) -> None:
        self.table = table
        self.maps = (map_name, vip_map_name)
        self.seq = seq
        self.msgs: list[tuple[int, NftOp | None, bytes]] = []  # (seq, op, message)
        self._set_id = 0

    @staticmethod
    def _frame(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
        n = 20 + len(body)  # nlmsghdr (16) + nfgenmsg (4)
        hdr = struct.pack("=IHHII", n, kind, NLM_F_REQUEST | flags, seq, 0)
        return hdr + struct.pack("=BBH", family, 0, socket.htons(res_id)) + body

    def _nft(self, kind: int, flags: int, op: NftOp, *attrs: bytes) -> None:
        seq = self.seq + 1 + len(self.msgs)
        body = b"".join(attrs)
        kind |= NFNL_SUBSYS_NFTABLES << 8
        self.msgs.append((seq, op, self._frame(kind, flags, seq, NFPROTO_INET, 0, body)))

    def add(self, op: NftOp) -> None:
        t = _str(1, self.table)  # NFTA_{CHAIN,RULE,SET,SET_ELEM_LIST}_TABLE are all 1
        match op:
            case AddChain(name):
                self._nft(NEWCHAIN, NLM_F_CREATE, op, t, _str(CHAIN_NAME, name))
            case DelChain(name):
                self._nft(DELCHAIN, 0, op, t, _str(CHAIN_NAME, name))
            case FlushChain(name):
                self._nft(DELRULE, 0, op, t, _str(RULE_CHAIN, name))
            case AddServiceRule(name, service):
                self._service_rule(op, name, service)
            case AddElem(key, chain):
                verdict = _nest(
                    ELEM_DATA,
                    _nest(DATA_VERDICT, _u32(VERDICT_CODE, NFT_GOTO), _str(VERDICT_CHAIN, chain)),
                )
                self._elems(NEWSETELEM, op, self._map(key), [_key(key) + verdict])
            case DelElem(key):
                self._elems(DELSETELEM, op, self._map(key), [_key(key)])
            case AddReject(key):
                self._elems(NEWSETELEM, op, _rejects(key), [_key(key)])
            case DelReject(key):
                self._elems(DELSETELEM, op, _rejects(key), [_key(key)])
            case _:
                raise AssertionError(f"{op!r} is not an incremental op (full loads use nft)")

    def _map(self, key: ServiceKey) -> str:
        return self.maps[1] if key[2] == ALL_PORTS else self.maps[0]

    def _elems(self, kind: int, op: NftOp, set_name: str, elems: list[bytes]) -> None:
        flags = NLM_F_CREATE if kind == NEWSETELEM else 0
        self._nft(
            kind,
            flags,
            op,
            _str(ELEM_LIST_TABLE, self.table),
            _str(ELEM_LIST_SET, set_name),
            _nest(ELEM_LIST_ELEMENTS, *_list(elems)),
        )

    def _service_rule(self, op: NftOp, chain: str, service: LBService) -> None:
        """``meta l4proto P dnat ip to numgen random mod N map { lo[-hi] : ip [. port] }``,
        or ``counter`` with no live backend (the ``rejects`` set answers first)."""
        t = _str(RULE_TABLE, self.table)
        c = _str(RULE_CHAIN, chain)
        total, sl = slots(service)
        if total == 0:
            exprs = [_expr("counter")]
        else:
            self._set_id += 1
            sid = self._set_id
            interval = any(s.lo != s.hi for s in sl)  # nft uses a hash unless there are ranges
            ports = service.port != ALL_PORTS
            data_len = 8 if ports else 4
            udata = (
                _udata(UDATA_KEYBYTEORDER, BYTEORDER_HOST)
                + _udata(UDATA_DATABYTEORDER, BYTEORDER_INVALID if ports else BYTEORDER_BIG)
                + _udata(UDATA_DATA_INTERVAL, 0)
            )
            flags = NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP
            flags |= NFT_SET_INTERVAL if interval else 0
            self._nft(
                NEWSET,
                NLM_F_CREATE,
                op,
                t,
                _attr(SET_NAME, ANON_MAP_NAME),
                _u32(SET_FLAGS, flags),
                _u32(SET_KEY_TYPE, TYPE_INTEGER),
                _u32(SET_KEY_LEN, 4),
                _u32(SET_DATA_TYPE, TYPE_IPADDR << 6 | TYPE_INET_SERVICE if ports else TYPE_IPADDR),
                _u32(SET_DATA_LEN, data_len),
                _u32(SET_ID, sid),
                _nest(SET_DESC, _u32(SET_DESC_SIZE, 2 * len(sl) if interval else len(sl))),
                _attr(SET_USERDATA, udata),
            )
            # interval keys are big endian (the rule converts numgen's value with byteorder);
            # a hash keeps numgen's host-order value as it is
            keyfmt = ">I" if interval else "=I"
            elems = []
            for s in sl:
                target = socket.inet_aton(s.backend.ip)
                if ports:
                    target += struct.pack(">H2x", s.backend.port)
                elems.append(
                    _nest(ELEM_KEY, _attr(DATA_VALUE, struct.pack(keyfmt, s.lo)))
                    + _nest(ELEM_DATA, _attr(DATA_VALUE, target))
                )
            if interval:
                elems.append(
                    _u32(ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END)
                    + _nest(ELEM_KEY, _attr(DATA_VALUE, struct.pack(">I", total)))
                )
            self._nft(
                NEWSETELEM,
                NLM_F_CREATE,
                op,
                t,
                _attr(ELEM_LIST_SET, ANON_MAP_NAME),
                _u32(ELEM_LIST_SET_ID, sid),
                _nest(ELEM_LIST_ELEMENTS, *_list(elems)),
            )
            nat = [_u32(1, NFT_NAT_DNAT), _u32(2, NFPROTO_IPV4), _u32(3, NFT_REG_1)]
            if ports:
                nat.append(_u32(5, NFT_REG32_01))  # NFTA_NAT_REG_PROTO_MIN
            exprs = [
                _expr("meta", _u32(2, NFT_META_L4PROTO), _u32(1, NFT_REG_1)),
                _expr(
                    "cmp",
                    _u32(1, NFT_REG_1),
                    _u32(2, NFT_CMP_EQ),
                    _nest(3, _attr(DATA_VALUE, bytes([PROTO_NUM[service.proto]]))),
                ),
                _expr(
                    "numgen", _u32(1, NFT_REG_1), _u32(2, total), _u32(3, NFT_NG_RANDOM), _u32(4, 0)
                ),
            ]
            if interval:
                exprs.append(
                    _expr(
                        "byteorder",
                        _u32(1, NFT_REG_1),
                        _u32(2, NFT_REG_1),
                        _u32(3, NFT_BYTEORDER_HTON),
                        _u32(4, 4),
                        _u32(5, 4),
                    )
                )
            exprs += [
                _expr(
                    "lookup",
                    _u32(2, NFT_REG_1),
                    _u32(3, NFT_REG_1),
                    _attr(1, ANON_MAP_NAME),
                    _u32(4, sid),
                ),
                _expr("nat", *nat),
            ]
        self._nft(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, op, t, c, _nest(RULE_EXPRESSIONS, *exprs))

    def encode(self) -> bytes:
        """BATCH_BEGIN, the messages (the last one asks for an ACK), BATCH_END."""
        if not self.msgs:
            return b""
        seq, op, last = self.msgs[-1]
        flags = struct.unpack_from("=H", last, 6)[0] | NLM_F_ACK
        self.msgs[-1] = (seq, op, last[:6] + struct.pack("=H", flags) + last[8:])
        sub = NFNL_SUBSYS_NFTABLES
        begin = self._frame(NFNL_MSG_BATCH_BEGIN, 0, self.seq, socket.AF_UNSPEC, sub, b"")
        end = self._frame(NFNL_MSG_BATCH_END, 0, seq + 1, socket.AF_UNSPEC, sub, b"")
        return begin + b"".join(m for _s, _o, m in self.msgs) + end


def _key(key: ServiceKey) -> bytes:
    return _nest(ELEM_KEY, _attr(DATA_VALUE, _svc_key(key)))


def _rejects(key: ServiceKey) -> str:
    return "rejects-vip" if key[2] == ALL_PORTS else "rejects"


def encode(
    ops: Sequence[NftOp], table: str, map_name: str, vip_map_name: str, seq: int = 1
) -> tuple[bytes, dict[int, NftOp]]:
    """The batch for ``ops`` and which op each sequence number carries (for errors)."""
    b = Batch(table, map_name, vip_map_name, seq)
    for op in ops:
        b.add(op)
    data = b.encode()
    return data, {s: op for s, op, _m in b.msgs if op is not None}


# ---- the socket ----------------------------------------------------------------------------


def netns_inode(netns: str | None) -> int | None:
    """Which namespace the name stands for now (None: the caller's own)."""
    if netns is None:
        return None
    return os.stat(os.path.join(nsutil.NETNS_RUN_DIR, netns)).st_ino


class NftNetlink:
    """One NETLINK_NETFILTER socket in the backend's namespace.

    The socket keeps the namespace it was opened in for life; if the named namespace is
    deleted and created again (same name, new inode) the next commit reopens it, so a change
    never lands in a dead namespace."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.sock: socket.socket | None = None
        self._ino: int | None = None
        self._seq = 1

    def _open(self) -> socket.socket:
        ino = netns_inode(self.netns)
        if self.sock is not None and ino == self._ino:
            return self.sock
        self.close()
        if self.netns is None:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        else:
            with nsutil.in_netns(self.netns):
                s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        s.bind((0, 0))
        # errors carry only the refused message's header, not its whole body back
        s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock, self._ino = s, ino
        return s

    def commit(self, ops: Sequence[NftOp], table: str, map_name: str, vip_map_name: str) -> None:
        """Apply ``ops`` as one kernel transaction; raise ``KernelError`` naming the first op
        the kernel refused (nothing is applied then)."""
        if not ops:
            return
        try:
            sock = self._open()
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, "nft netlink socket", str(e)) from e
        data, by_seq = encode(ops, table, map_name, vip_map_name, self._seq)
        last = max(by_seq)
        # the next batch starts after this one's BATCH_END (sequence numbers are 32 bits)
        self._seq = last + 2 if last < 1 << 30 else 1
        try:
            _drain(sock)  # nothing stale from an earlier, interrupted commit
            if len(data) > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2:
                _grow(sock, socket.SO_SNDBUF, 2 * len(data))  # one datagram, like nft does
            sock.send(data)
            answers = _drain(sock)
        except OSError as e:
            self.close()  # a fresh socket next time; the caller's next sync is a full one
            raise KernelError(e.errno or errno.EIO, "nft netlink", str(e)) from e
        errors: list[tuple[int, int]] = []
        acked = False
        for seq, err in answers:
            if err:
                errors.append((seq, err))
            elif seq == last:
                acked = True
        if errors:
            seq, err = min(errors)
            op = by_seq.get(seq, "nft batch")
            raise KernelError(err, op, f"{os.strerror(err)} (kernel refused the transaction)")
        if not acked:
            raise KernelError(errno.EIO, "nft batch", "no acknowledgement from nf_tables")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _drain(sock: socket.socket) -> list[tuple[int, int]]:
    """Every queued NLMSG_ERROR as (sequence number, positive errno; 0 = ACK)."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        off = 0
        while off + 16 <= len(data):
            n, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            if kind == NLMSG_ERROR and off + 20 <= len(data):
                out.append((seq, -struct.unpack_from("=i", data, off + 16)[0]))
            off += max((n + 3) & ~3, 16)


def _grow(sock: socket.socket, opt: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)  # root: above wmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _list(elems: list[bytes]) -> list[bytes]:
    """Set elements nested as libnftnl does: the i-th is attribute number i (the kernel
    reads them in order and ignores the number)."""
    return [_nest(i, e) for i, e in enumerate(elems, 1)]
