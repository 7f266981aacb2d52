"""NetworkDB's wire format and configuration (netdb.py is the state machine that uses them).

What two NetworkDB nodes must agree on lives here: the message types and their layout, the
format version, the size and count limits a received message is checked against, and the
timing knobs (``NetDBConfig``). Pure: no I/O, no clock, no randomness.

Wire: one type byte, then a msgpack array whose first item is the format version. Every
decode error raises ``_Bad(reason)``; the state machine drops the message and bumps
``counters["drop_<reason>"]``, never raises into the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgpack

WIRE_VERSION = 1
# APPEND ONLY: the values are on the wire. Chosen clear of serf's user message types (0-9),
# so a serf agent in the pool ignores ours and we ignore its own.
MSG_TABLE_EVENTS = 0xD0  # [v, sender, nid, [entry...]]: gossip of recent changes
MSG_BULK_SYNC = 0xD1  # [v, sender, nid, sync_id, reply_wanted, [entry...], [member...]]
MSG_NET_EVENTS = 0xD2  # [v, sender, [[node, nid, ltime, leaving]...]]: broadcast, relayed
MSG_NET_SYNC = 0xD3  # [v, sender, [records...], reply_wanted]: a direct exchange, not relayed
# entry = [key, owner, ltime, deleted, value]; member = [node, ltime, leaving]

LTIME_MAX = 2**63 - 1
ENTRY_OVERHEAD_BYTES = 16  # msgpack array/int/bool headers around one entry
NAME_BYTES_MAX = 128  # node names and network ids (Docker: 64-hex ids, short host names)


class NetDBError(ValueError):
    """The caller misused the API (not a peer misbehaving: those messages are dropped)."""


@dataclass(frozen=True)
class NetDBConfig:
    """Every duration in seconds (``_s``), every size in bytes (``_bytes``)."""

    gossip_interval_s: float = 0.2
    """Per network, recent changes go to ``fanout`` random members of that network this often.
    Docker's NetworkDB and memberlist LAN: 200 ms. An idle network sends a new change at once
    (the next tick is already due), so a put does not wait for the tick."""

    fanout: int = 3
    """Members of the network each gossip round goes to. Docker: 3 (memberlist's GossipNodes)."""

    retransmit_mult: int = 4
    """Each change is sent retransmit_mult * ceil(log10(members + 1)) times (memberlist's
    formula): enough for an epidemic to reach the whole network with high probability; the
    bulk sync repairs the rest."""

    owner_push_max: int = 32
    """A node's OWN change (put, delete) also goes straight to up to this many members of the
    network (all of them in a network this small), at once and batched per loop iteration,
    before the epidemic gossip carries it on. The owner knows the members: a direct send
    saves the relays' gossip ticks (up to 200 ms per hop) and the small chance that the
    epidemic misses a member, which only the next bulk sync (30 s) would then repair. 0: off
    (Docker's behaviour: gossip only)."""

    bulk_sync_s: float = 30.0
    """Full exchange of each network's table with one random member of it, and of the
    node/network membership table with one random node. Docker: 30 s. Also done at once when
    we join a network, when a member joins one of ours, and when a failed member comes back."""

    join_sync_peers: int = 3
    """When we join a network (a restarted node rejoining its networks included), its table
    is pulled at once (push-pull bulk sync) from up to this many members, and from members
    we learn of later while no answer has come yet: a restarted node's tables are full about
    one round trip after it knows the members, not at the next periodic sync (up to 30 s).
    Docker's NetworkDB syncs with every member on join (``bulkSync(all)``): at 1,000 members
    that is 1,000 full tables at once, while any one member holds the whole table; three
    keep one lost or slow answer from mattering."""

    join_sync_retry_s: float = 1.0
    """An initial sync nobody answered (a lost chunk, a member that just died) is asked again
    of other members this long after: about 1,000 LAN round trips, so a slow answer is not
    doubled, and far below the periodic sync it would otherwise wait for. The delay doubles
    per retry (a network whose members never answer does not wake us every second) until
    it reaches ``bulk_sync_s``, where the periodic sync takes over."""

    tombstone_s: float = 1800.0
    """Deleted entries (and network leaves) are kept this long so that a delayed older copy
    cannot resurrect them. Docker: 30 min (reapEntryInterval)."""

    failed_grace_s: float = 1800.0
    """A failed member's entries and memberships stay (hidden) this long, so that a member
    back from a short disconnect or restart is not rejected (moby #53141, PR #53142). Same
    as the tombstone period: a member back later is treated as new, which is still correct."""

    reap_interval_s: float = 5.0
    """How often tombstones and expired failed members are purged. Docker: 5 s."""

    netdb_message_bytes_max: int = 1200
    """Largest payload we build: memberlist's 1,400-byte UDP packet minus its compound,
    encryption and label overheads (``packet_reserved_bytes``), with room to spare."""

    netdb_entries_per_message_max: int = 64
    """Entries (or membership records) a received message may carry; more is dropped."""

    netdb_value_bytes_max: int = 512
    """Largest value. An endpoint {ip, mac, vtep, task, service} is about 150 bytes."""

    netdb_key_bytes_max: int = 128
    """Largest key (a 64-hex endpoint id is 64 bytes)."""

    netdb_entries_max: int = 100_000
    """Entries (tombstones included) held across all networks; beyond, new ones are dropped
    and counted. 10,000 tasks with their tombstones fit well below it."""

    netdb_network_records_max: int = 100_000
    """(node, network) membership records held; beyond, new ones are dropped and counted."""

    netdb_queue_max: int = 4096
    """Changes waiting to be gossiped per network; beyond, the oldest are dropped (the bulk
    sync carries them later). Bounds memory when a network has no reachable member."""

    def validate(self) -> NetDBConfig:
        if self.gossip_interval_s <= 0 or self.bulk_sync_s <= 0 or self.reap_interval_s <= 0:
            raise NetDBError("netdb intervals must be positive")
        if self.fanout < 1 or self.retransmit_mult < 1:
            raise NetDBError("netdb fanout and retransmit_mult must be at least 1")
        if self.owner_push_max < 0:
            raise NetDBError("netdb owner_push_max must be >= 0")
        if self.join_sync_peers < 1 or self.join_sync_retry_s <= 0:
            raise NetDBError("netdb join_sync_peers must be >= 1 and join_sync_retry_s > 0")
        if self.tombstone_s < 0 or self.failed_grace_s < 0:
            raise NetDBError("netdb tombstone_s and failed_grace_s must be >= 0")
        one = self.netdb_key_bytes_max + self.netdb_value_bytes_max + 2 * NAME_BYTES_MAX
        if self.netdb_message_bytes_max < one + 64:
            raise NetDBError("netdb_message_bytes_max must hold one entry of the largest size")
        return self

    @classmethod
    def default(cls, **overrides: object) -> NetDBConfig:
        return replace(cls(), **overrides).validate()  # type: ignore[arg-type]


class _Bad(Exception):
    """A malformed message; the text is the counter's reason."""


def decode(payload: bytes, cfg: NetDBConfig) -> tuple[int, list]:
    """Validate and decode one message: ``(type, body)`` with every field checked, or
    ``_Bad(reason)``. Limits come from ``cfg``; extra trailing items are ignored (a newer
    version may append)."""
    if not isinstance(payload, bytes | bytearray) or len(payload) < 2:
        raise _Bad("short")
    if len(payload) > cfg.netdb_message_bytes_max + 512:
        raise _Bad("oversized")
    kind = payload[0]
    if kind not in (MSG_TABLE_EVENTS, MSG_BULK_SYNC, MSG_NET_EVENTS, MSG_NET_SYNC):
        raise _Bad("unknown_type")
    try:
        body = msgpack.unpackb(bytes(payload[1:]), raw=False, strict_map_key=True)
    except Exception:  # msgpack raises many types (ExtraData, FormatError, ...)
        raise _Bad("undecodable") from None
    if not isinstance(body, list) or len(body) < 3:
        raise _Bad("malformed")
    if not isinstance(body[0], int) or body[0] < WIRE_VERSION:
        raise _Bad("version")
    _name(body[1])
    if kind in (MSG_NET_EVENTS, MSG_NET_SYNC):
        recs = _lst(body[2], cfg.netdb_entries_per_message_max)
        for r in recs:
            if not isinstance(r, list) or len(r) < 4:
                raise _Bad("malformed")
            _name(r[0]), _name(r[1]), _ltime(r[2]), _bool(r[3])
        body[2] = [r[:4] for r in recs]
        body[3:] = [len(body) > 3 and body[3] is True]
        return kind, body
    _name(body[2])
    if kind == MSG_TABLE_EVENTS:
        if len(body) < 4:
            raise _Bad("malformed")
        body[3] = _entries(body[3], cfg)
        return kind, body
    if len(body) < 7:
        raise _Bad("malformed")
    _ltime(body[3]), _bool(body[4])
    body[5] = _entries(body[5], cfg)
    members = _lst(body[6], cfg.netdb_entries_per_message_max)
    for r in members:
        if not isinstance(r, list) or len(r) < 3:
            raise _Bad("malformed")
        _name(r[0]), _ltime(r[1]), _bool(r[2])
    body[6] = [r[:3] for r in members]
    return kind, body


def _entries(raw: object, cfg: NetDBConfig) -> list[list]:
    out = []
    for e in _lst(raw, cfg.netdb_entries_per_message_max):
        if not isinstance(e, list) or len(e) < 5:
            raise _Bad("malformed")
        key, owner, ltime, deleted, value = e[:5]
        if not isinstance(key, str) or not key or len(key.encode()) > cfg.netdb_key_bytes_max:
            raise _Bad("bad_key")
        _name(owner), _ltime(ltime), _bool(deleted)
        if not isinstance(value, bytes) or len(value) > cfg.netdb_value_bytes_max:
            raise _Bad("bad_value")
        out.append([key, owner, ltime, deleted, value])
    return out


def chunks(items: list[list], cfg: NetDBConfig) -> list[list[list]]:
    """Split records into messages within the size and count limits."""
    out: list[list[list]] = []
    cur: list[list] = []
    size = 96  # type byte, version, sender, network id, sync id
    for item in items:
        n = ENTRY_OVERHEAD_BYTES + sum(
            len(x.encode()) if isinstance(x, str) else len(x)
            for x in item
            if isinstance(x, str | bytes)
        )
        if cur and (
            size + n > cfg.netdb_message_bytes_max or len(cur) >= cfg.netdb_entries_per_message_max
        ):
            out.append(cur)
            cur, size = [], 96
        cur.append(item)
        size += n
    if cur:
        out.append(cur)
    return out


def pack(kind: int, head: list, *tail: object) -> bytes:
    return bytes([kind]) + msgpack.packb([WIRE_VERSION, *head, *tail], use_bin_type=True)


def check_name(s: object, what: str) -> None:
    if not isinstance(s, str) or not s or len(s.encode()) > NAME_BYTES_MAX:
        raise NetDBError(f"netdb: {what} must be 1..{NAME_BYTES_MAX} bytes of text")


def _name(s: object) -> None:
    if not isinstance(s, str) or not s or len(s) > NAME_BYTES_MAX:
        raise _Bad("bad_name")


def _ltime(t: object) -> None:
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= LTIME_MAX:
        raise _Bad("bad_ltime")


def _bool(b: object) -> None:
    if not isinstance(b, bool):
        raise _Bad("bad_flag")


def _lst(x: object, limit: int) -> list:
    if not isinstance(x, list):
        raise _Bad("malformed")
    if len(x) > limit:
        raise _Bad("too_many_entries")
    return x
