"""NetworkDB: per-network endpoint tables gossiped on top of the membership layer, as a pure
state machine (DESIGN "Gossip"; Docker's libnetwork/networkdb, with its 2025 bugs fixed).

Rules of this file:

1. No I/O and no clock. Inputs: API calls (``join_network``, ``put``, ...), ``receive`` of a
   memberlist user message, ``on_member`` of a membership event and ``handle_timer(now)``.
   Outputs: ``take_outbound()`` -> ``(dest, payload)`` where ``dest`` is a node name (send
   with ``Membership.send_user``) or None (cluster-wide: ``Membership.broadcast_user``), and
   ``take_events()`` -> ``TableEvent``. Randomness comes only from the injected ``rng``.
2. Entries are ``(network, key) -> (owner, Lamport time, value | tombstone)``. One table clock
   per node, witnessed on every received time, so a local change always outbids what we saw.
   Conflicts: higher time wins; at EQUAL time a tombstone never beats a live entry (moby PR
   #50342: forged equal-time tombstones hid live entries) and two live values tie-break on
   the bytes so every node picks the same. Only the owner writes an entry: a live entry is
   never taken over by another owner, and the owner never lets a remote view of its own
   entries win: it re-asserts at a higher time (this is also how a restarted node, which
   lost its clock, outbids and removes what its previous life left behind).
3. Events of a network we are not in are ignored and never stored (PR #49932), and so are
   live entries from an owner known to have left that network (a table event racing the
   leave would otherwise leave an orphan that bulk syncs spread forever).
4. A FAILED member's entries are hidden at once (delete events, so FDB/neigh/DNS drop them)
   but kept, with its network memberships, for ``failed_grace_s``: when it comes back its
   entries reappear and what it re-sends is accepted (moby #53141's NXDOMAIN came from
   dropping this state). A member that LEAVES gracefully has its entries deleted.
5. Which node is in which network is itself gossiped cluster-wide (broadcast on change,
   repaired by a periodic full exchange with one random node and inside bulk syncs), with
   its own Lamport clock.
6. Wire: one type byte, then a msgpack array whose first item is the format version. Every
   decode error drops the message and bumps ``counters["drop_<reason>"]``, never raises.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import msgpack

if TYPE_CHECKING:
    import random

WIRE_VERSION = 1
# APPEND ONLY: the values are on the wire. Chosen clear of serf's user message types (0-9),
# so a serf agent in the pool ignores ours and we ignore its own.
MSG_TABLE_EVENTS = 0xD0  # [v, sender, nid, [entry...]]: gossip of recent changes
MSG_BULK_SYNC = 0xD1  # [v, sender, nid, sync_id, reply_wanted, [entry...], [member...]]
MSG_NET_EVENTS = 0xD2  # [v, sender, [[node, nid, ltime, leaving]...]]: broadcast, relayed
MSG_NET_SYNC = 0xD3  # [v, sender, [records...], reply_wanted]: a direct exchange, not relayed
# entry = [key, owner, ltime, deleted, value]; member = [node, ltime, leaving]

_LTIME_MAX = 2**63 - 1
_ENTRY_OVERHEAD_BYTES = 16  # msgpack array/int/bool headers around one entry
_NAME_BYTES_MAX = 128  # node names and network ids (Docker: 64-hex ids, short host names)


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
        if self.tombstone_s < 0 or self.failed_grace_s < 0:
            raise NetDBError("netdb tombstone_s and failed_grace_s must be >= 0")
        one = self.netdb_key_bytes_max + self.netdb_value_bytes_max + 2 * _NAME_BYTES_MAX
        if self.netdb_message_bytes_max < one + 64:
            raise NetDBError("netdb_message_bytes_max must hold one entry of the largest size")
        return self

    @classmethod
    def default(cls, **overrides: object) -> NetDBConfig:
        return replace(cls(), **overrides).validate()  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TableEvent:
    """A change of what this node sees (our own entries included: the consumer filters by
    ``owner`` if it must). A delete carries the last value, so consumers can unprogram it."""

    kind: Literal["add", "update", "delete"]
    nid: str
    key: str
    value: bytes
    owner: str


@dataclass(slots=True)
class _Entry:
    owner: str
    ltime: int
    value: bytes
    deleted: bool
    reap_s: float = 0.0  # tombstones only


@dataclass(slots=True)
class _NetRec:
    ltime: int
    leaving: bool
    reap_s: float = 0.0  # leaves only


class _Bad(Exception):
    """A malformed message; the text is the counter's reason."""


def _retransmit_limit(mult: int, n: int) -> int:
    return mult * math.ceil(math.log10(n + 1))


class NetworkDB:
    """The endpoint tables of node ``name``. See the module docstring."""

    def __init__(
        self, name: str, rng: random.Random, now: float, config: NetDBConfig | None = None
    ):
        self.name = name
        self.rng = rng
        self.config = (config or NetDBConfig()).validate()
        self.counters: dict[str, int] = {}
        self._clock = 0  # table Lamport clock
        self._net_clock = 0  # network membership Lamport clock
        self._joined: set[str] = set()
        self._tables: dict[str, dict[str, _Entry]] = {}
        self._n_entries = 0
        self._members: dict[str, dict[str, _NetRec]] = {}  # nid -> node -> record
        self._n_records = 0
        self._queues: dict[str, dict[str, int]] = {}  # nid -> key -> transmits left
        self._push: dict[str, set[str]] = {}  # nid -> own keys changed, not yet pushed
        self._alive: set[str] = set()
        self._failed: dict[str, float] = {}  # name -> purge time
        self._gone: dict[str, float] = {}  # left, or failed and purged -> forget time
        self._replied: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._sync_ids = 0
        self._hinted: dict[tuple[str, str], float] = {}  # (owner, nid) -> last hint time
        self._outbound: list[tuple[str | None, bytes]] = []
        self._events: list[TableEvent] = []
        cfg = self.config
        self._gossip_at = now + rng.random() * cfg.gossip_interval_s
        self._bulk_at = now + rng.random() * cfg.bulk_sync_s
        self._reap_at = now + cfg.reap_interval_s
        self._last_gossip_s = now - cfg.gossip_interval_s
        self._push_at = now

    # ---- the driver's interface -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Absolute time of the next timer. The gossip tick counts only while a change waits,
        so an idle node wakes up every few seconds, not every 200 ms."""
        t = min(self._bulk_at, self._reap_at)
        if any(self._queues.values()):
            t = min(t, self._gossip_at)
        if self._push:
            t = min(t, self._push_at)
        return t

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        pushed = self._push_own() if self._push else set()
        if now >= self._gossip_at:
            if any(self._queues.values()):
                self._last_gossip_s = now
                self._gossip(pushed)
            k = math.floor((now - self._gossip_at) / cfg.gossip_interval_s) + 1
            self._gossip_at += k * cfg.gossip_interval_s
        if now >= self._bulk_at:
            self._bulk_at = now + cfg.bulk_sync_s
            for nid in sorted(self._joined):
                peers = self._peers(nid)
                if peers:
                    self._send_bulk(peers[self.rng.randrange(len(peers))], nid, reply=True)
            alive = sorted(self._alive)
            if alive:
                self._send_net_records(alive[self.rng.randrange(len(alive))], None)
        if now >= self._reap_at:
            self._reap_at = now + cfg.reap_interval_s
            self._reap(now)

    def take_outbound(self) -> list[tuple[str | None, bytes]]:
        out, self._outbound = self._outbound, []
        return out

    def take_events(self) -> list[TableEvent]:
        out, self._events = self._events, []
        return out

    # ---- API ------------------------------------------------------------------------------

    def join_network(self, nid: str, now: float) -> None:
        _check_name(nid, "network id")
        if nid in self._joined:
            return
        self._joined.add(nid)
        self._tables.setdefault(nid, {})
        self._set_own_record(nid, leaving=False, now=now)
        peers = self._peers(nid)
        if peers:  # fetch the table now rather than at the next bulk sync
            self._send_bulk(peers[self.rng.randrange(len(peers))], nid, reply=True)

    def leave_network(self, nid: str, now: float) -> None:
        if nid not in self._joined:
            return
        self._joined.discard(nid)
        self._set_own_record(nid, leaving=True, now=now)
        for key, e in self._tables.pop(nid, {}).items():
            self._n_entries -= 1
            if self._visible(e):
                self._events.append(TableEvent("delete", nid, key, e.value, e.owner))
        self._queues.pop(nid, None)
        self._push.pop(nid, None)

    def put(self, nid: str, key: str, value: bytes, now: float) -> None:
        """Create or update our entry ``key`` in ``nid``."""
        cfg = self.config
        if nid not in self._joined:
            raise NetDBError(f"netdb: not in network {nid!r}")
        if not key or len(key.encode()) > cfg.netdb_key_bytes_max:
            raise NetDBError(f"netdb: key must be 1..{cfg.netdb_key_bytes_max} bytes")
        if len(value) > cfg.netdb_value_bytes_max:
            raise NetDBError(f"netdb: value larger than {cfg.netdb_value_bytes_max} bytes")
        table = self._tables[nid]
        e = table.get(key)
        if e is not None and e.owner != self.name and not e.deleted:
            raise NetDBError(f"netdb: {nid}/{key} belongs to {e.owner}")
        self._clock += 1
        new = _Entry(self.name, self._clock, bytes(value), False)
        if e is None and not self._room(nid, key):
            raise NetDBError("netdb: netdb_entries_max reached")
        self._store(nid, key, e, new, now)
        self._queue(nid, key, now)
        self._mark_push(nid, key, now)

    def delete(self, nid: str, key: str, now: float) -> bool:
        """Delete our entry (a tombstone, reaped after ``tombstone_s``). False if we hold no
        live entry of ours under that key."""
        e = self._tables.get(nid, {}).get(key)
        if e is None or e.owner != self.name or e.deleted:
            return False
        self._clock += 1
        self._store(nid, key, e, _Entry(self.name, self._clock, e.value, True), now)
        self._queue(nid, key, now)
        self._mark_push(nid, key, now)
        return True

    def entries(self, nid: str) -> dict[str, tuple[str, bytes]]:
        """What this node sees in ``nid``: key -> (owner, value), live and visible only."""
        return {
            k: (e.owner, e.value) for k, e in self._tables.get(nid, {}).items() if self._visible(e)
        }

    def stored_networks(self) -> set[str]:
        """Networks of which we hold any entry, tombstones and hidden ones included."""
        return {nid for nid, t in self._tables.items() if t}

    def networks(self) -> set[str]:
        return set(self._joined)

    def network_members(self, nid: str) -> list[str]:
        """Nodes we believe are in ``nid`` (ourselves included), in any member state."""
        return [n for n, r in self._members.get(nid, {}).items() if not r.leaving]

    # ---- membership events ----------------------------------------------------------------

    def on_member(self, kind: str, name: str, now: float) -> None:
        """Feed every membership event (join/leave/failed/update) of the gossip core."""
        if name == self.name:
            return
        if kind in ("join", "update"):
            first = not self._alive and not self._failed
            back = self._failed.pop(name, None) is not None
            fresh = name not in self._alive
            self._alive.add(name)
            self._gone.pop(name, None)
            if back:
                self._count("members_resumed")
                self._set_visibility(name, visible=True)
            if first:
                # We just started (or were alone): fetch who is in which network from the
                # first member we meet, rather than wait for the periodic exchange.
                self._send_net_records(name, None, reply=True)
            elif fresh:
                # Tell it where we are now: after a long absence or a restart it knows nothing.
                self._send_net_records(name, self.name)
                for nid in sorted(self._joined):
                    rec = self._members.get(nid, {}).get(name)
                    if rec is not None and not rec.leaving:
                        self._send_bulk(name, nid, reply=True)
        elif kind == "failed":
            if name in self._failed:
                return
            self._alive.discard(name)
            self._failed[name] = now + self.config.failed_grace_s
            self._count("members_suspended")
            self._set_visibility(name, visible=False)
        elif kind == "leave":
            self._alive.discard(name)
            was_failed = self._failed.pop(name, None) is not None
            self._gone[name] = now + self.config.tombstone_s
            for nid in list(self._tables):
                self._tombstone_owner(nid, name, now, silent=was_failed)
            for recs in self._members.values():
                if recs.pop(name, None) is not None:
                    self._n_records -= 1

    # ---- receiving ------------------------------------------------------------------------

    def receive(self, from_node: str, payload: bytes, now: float) -> None:
        """A user message. ``from_node`` is advisory (memberlist user messages do not say who
        sent them); the sender named inside the payload is the one we answer."""
        try:
            kind, body = self._decode(payload)
        except _Bad as bad:
            self._count("drop_" + str(bad))
            return
        self._count("messages_in")
        if kind in (MSG_NET_EVENTS, MSG_NET_SYNC):
            for node, nid, ltime, leaving in body[2]:
                self._apply_net(node, nid, ltime, leaving, now, relay=kind == MSG_NET_EVENTS)
            if kind == MSG_NET_SYNC and body[3] and body[1] != self.name:
                self._send_net_records(body[1], None)
            return
        sender, nid = body[1], body[2]
        if nid not in self._joined:
            self._count("drop_not_in_network")  # never stored (PR #49932)
            return
        if kind == MSG_TABLE_EVENTS:
            for ent in body[3]:
                if self._apply_entry(nid, *ent, now, sender=sender):
                    self._queue(nid, ent[0], now)  # new to us: pass it on (epidemic)
            return
        sync_id, reply, entries, members = body[3], body[4], body[5], body[6]
        for node, ltime, leaving in members:
            self._apply_net(node, nid, ltime, leaving, now)
        for ent in entries:
            self._apply_entry(nid, *ent, now)
        if reply and sender != self.name and self._replied.get((sender, nid)) != sync_id:
            self._replied[(sender, nid)] = sync_id
            self._replied.move_to_end((sender, nid))
            while len(self._replied) > 4096:
                self._replied.popitem(last=False)
            self._send_bulk(sender, nid, reply=False)

    def _decode(self, payload: bytes) -> tuple[int, list]:
        cfg = self.config
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
            body[3] = self._entries(body[3])
            return kind, body
        if len(body) < 7:
            raise _Bad("malformed")
        _ltime(body[3]), _bool(body[4])
        body[5] = self._entries(body[5])
        members = _lst(body[6], cfg.netdb_entries_per_message_max)
        for r in members:
            if not isinstance(r, list) or len(r) < 3:
                raise _Bad("malformed")
            _name(r[0]), _ltime(r[1]), _bool(r[2])
        body[6] = [r[:3] for r in members]
        return kind, body

    def _entries(self, raw: object) -> list[list]:
        cfg = self.config
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

    # ---- conflict rules -------------------------------------------------------------------

    def _apply_entry(
        self,
        nid: str,
        key: str,
        owner: str,
        ltime: int,
        deleted: bool,
        value: bytes,
        now: float,
        sender: str = "",
    ) -> bool:
        """Merge one remote view of an entry; True if it changed our state."""
        self._clock = max(self._clock, ltime)
        table = self._tables[nid]
        cur = table.get(key)
        if owner == self.name:
            self._reassert(nid, key, cur, ltime, deleted, value, now)
            return False
        if not deleted:
            rec = self._members.get(nid, {}).get(owner)
            if (rec is not None and rec.leaving) or owner in self._gone:
                self._count("drop_owner_gone")  # an orphan racing a leave (PR #49932)
                return False
        if cur is None:
            if not self._room(nid, key):
                return False
        elif cur.owner != owner and not cur.deleted:
            self._count("drop_not_owner")  # nobody takes over or deletes another's entry
            return False
        elif ltime < cur.ltime:
            if sender == owner == cur.owner and now - self._hinted.get((owner, nid), -1e9) >= 1.0:
                # The owner itself sends an older view of its own entry: it restarted and
                # lost its clock. Send it our table so that it outbids its previous life now.
                self._hinted[(owner, nid)] = now
                self._count("owner_behind_hints")
                self._send_bulk(owner, nid, reply=False)
            return False
        elif ltime == cur.ltime:
            if deleted:
                if not cur.deleted:
                    self._count("drop_equal_time_tombstone")  # PR #50342
                return False
            if not cur.deleted and (cur.owner == owner and value <= cur.value):
                return False  # same value, or the tie-break keeps ours
        self._store(nid, key, cur, _Entry(owner, ltime, value, deleted), now)
        return True

    def _reassert(
        self,
        nid: str,
        key: str,
        cur: _Entry | None,
        ltime: int,
        deleted: bool,
        value: bytes,
        now: float,
    ) -> None:
        """Someone holds a view of OUR entry. Ours wins, at a higher time if needed."""
        if cur is None or cur.owner != self.name:
            if deleted or (cur is not None and not cur.deleted):
                return
            # A live entry of ours that we do not have: left by our previous life (restart).
            if not self._room(nid, key):
                return
            self._clock += 1
            self._store(nid, key, cur, _Entry(self.name, self._clock, value, True), now)
            self._count("stale_own_entries_deleted")
        elif ltime > cur.ltime or (
            ltime == cur.ltime and (deleted != cur.deleted or value != cur.value)
        ):
            self._clock += 1
            cur.ltime = self._clock
            self._count("own_entries_reasserted")
        else:
            return
        self._queue(nid, key, now)

    def _apply_net(
        self, node: str, nid: str, ltime: int, leaving: bool, now: float, relay: bool = False
    ) -> None:
        self._net_clock = max(self._net_clock, ltime)
        recs = self._members.get(nid)
        rec = recs.get(node) if recs else None
        if node == self.name:
            # Only we say where we are. A claim that contradicts us at a time we have not
            # outbid comes from our previous life (a restart): outbid it.
            if (rec is None or ltime >= rec.ltime) and leaving == (nid in self._joined):
                self._count("own_records_reasserted")
                self._set_own_record(nid, leaving=nid not in self._joined, now=now)
            return
        if rec is not None and ltime <= rec.ltime:
            if relay and ltime < rec.ltime and not leaving and not rec.leaving:
                # An older join from the node itself: most likely it restarted and lost its
                # clock. Send it our table (with its own record) so it catches up now.
                if nid in self._joined and node in self._alive and self._lucky(nid):
                    self._send_bulk(node, nid, reply=True)
            return
        if node in self._gone and not leaving:
            return  # a record racing its node's graceful leave
        if rec is None:
            if self._n_records >= self.config.netdb_network_records_max:
                self._count("drop_network_records_max")
                return
            recs = self._members.setdefault(nid, {})
            self._n_records += 1
        was_in = rec is not None and not rec.leaving
        recs[node] = _NetRec(ltime, leaving, now + self.config.tombstone_s if leaving else 0.0)
        if relay:  # new to us: pass the broadcast on (memberlist does not relay user messages)
            self._outbound.append(
                (None, _pack(MSG_NET_EVENTS, [self.name], [[node, nid, ltime, leaving]]))
            )
        if leaving and (was_in or rec is None):
            self._tombstone_owner(nid, node, now, silent=False)
        elif not leaving and not was_in and nid in self._joined and node in self._alive:
            # A member new to one of our networks: about `fanout` of us send it the table.
            if self._lucky(nid):
                self._send_bulk(node, nid, reply=True)

    # ---- state helpers --------------------------------------------------------------------

    def _visible(self, e: _Entry) -> bool:
        return not e.deleted and e.owner not in self._failed

    def _store(self, nid: str, key: str, old: _Entry | None, new: _Entry, now: float) -> None:
        """Replace ``old`` by ``new`` and report what the consumers see change."""
        if new.deleted:
            new.reap_s = now + self.config.tombstone_s
        self._tables[nid][key] = new
        before = old is not None and self._visible(old)
        after = self._visible(new)
        if after and not before:
            self._events.append(TableEvent("add", nid, key, new.value, new.owner))
        elif before and not after:
            self._events.append(TableEvent("delete", nid, key, old.value, old.owner))  # type: ignore[union-attr]
        elif before and after and (old.value != new.value or old.owner != new.owner):  # type: ignore[union-attr]
            self._events.append(TableEvent("update", nid, key, new.value, new.owner))

    def _room(self, nid: str, key: str) -> bool:
        if key in self._tables[nid]:
            return True
        if self._n_entries >= self.config.netdb_entries_max:
            self._count("drop_entries_max")
            return False
        self._n_entries += 1
        return True

    def _tombstone_owner(self, nid: str, owner: str, now: float, silent: bool) -> None:
        reap = now + self.config.tombstone_s
        for key, e in self._tables.get(nid, {}).items():
            if e.owner == owner and not e.deleted:
                if not silent and self._visible(e):
                    self._events.append(TableEvent("delete", nid, key, e.value, owner))
                e.deleted, e.reap_s = True, reap

    def _set_visibility(self, owner: str, visible: bool) -> None:
        kind: Literal["add", "delete"] = "add" if visible else "delete"
        for nid, table in self._tables.items():
            for key, e in table.items():
                if e.owner == owner and not e.deleted:
                    self._events.append(TableEvent(kind, nid, key, e.value, owner))

    def _set_own_record(self, nid: str, leaving: bool, now: float) -> None:
        self._net_clock += 1
        recs = self._members.setdefault(nid, {})
        if self.name not in recs:
            self._n_records += 1
        reap = now + self.config.tombstone_s if leaving else 0.0
        recs[self.name] = _NetRec(self._net_clock, leaving, reap)
        self._outbound.append(
            (None, _pack(MSG_NET_EVENTS, [self.name], [[self.name, nid, self._net_clock, leaving]]))
        )

    def _peers(self, nid: str) -> list[str]:
        """Alive members of ``nid`` other than us, in a deterministic order."""
        alive = self._alive
        recs = self._members.get(nid, {})
        return [n for n, r in recs.items() if not r.leaving and n in alive]

    def _lucky(self, nid: str) -> bool:
        """True for about ``fanout`` of the members of ``nid``: who answers a newcomer."""
        return self.rng.random() < self.config.fanout / max(1, len(self._peers(nid)))

    def _queue(self, nid: str, key: str, now: float) -> None:
        if (
            not any(self._queues.values())
            and now - self._last_gossip_s >= self.config.gossip_interval_s
        ):
            self._gossip_at = now  # idle: send at once, then at most once per interval
        q = self._queues.setdefault(nid, {})
        q.pop(key, None)  # a newer change of the same entry replaces the queued one
        q[key] = _retransmit_limit(self.config.retransmit_mult, len(self._peers(nid)) + 1)
        while len(q) > self.config.netdb_queue_max:
            q.pop(next(iter(q)))
            self._count("drop_queue_max")

    def _mark_push(self, nid: str, key: str, now: float) -> None:
        if self.config.owner_push_max <= 0:
            return
        if not self._push:
            self._push_at = now  # due at once: the driver's timer fires on the next turn
        self._push.setdefault(nid, set()).add(key)

    def _push_own(self) -> set[tuple[str, str]]:
        """Our pending own changes, straight to (up to ``owner_push_max``) members of each
        network. Returns the (network, key) pushed: this tick's gossip round skips them (the
        members just got them); later rounds still carry them on, as for any change."""
        cfg = self.config
        pushed: set[tuple[str, str]] = set()
        push, self._push = self._push, {}
        for nid in sorted(push):
            table = self._tables.get(nid)
            peers = self._peers(nid)
            if table is None or not peers:
                continue
            items = [
                [k, e.owner, e.ltime, e.deleted, e.value]
                for k in sorted(push[nid])
                if (e := table.get(k)) is not None and e.owner == self.name
            ]
            if not items:
                continue
            if len(peers) > cfg.owner_push_max:
                peers = self.rng.sample(peers, cfg.owner_push_max)
            chunks = self._chunks(items)
            for target in peers:
                for chunk in chunks:
                    self._outbound.append(
                        (target, _pack(MSG_TABLE_EVENTS, [self.name, nid], chunk))
                    )
            self._count("owner_pushes", len(peers) * len(chunks))
            pushed.update((nid, it[0]) for it in items)
        return pushed

    def _gossip(self, skip: set[tuple[str, str]] = frozenset()) -> None:  # type: ignore[assignment]
        cfg = self.config
        for nid in sorted(self._queues):
            q = self._queues[nid]
            if not q:
                continue
            peers = self._peers(nid)
            if not peers:
                q.clear()  # nobody to tell: a member that joins later gets a bulk sync
                continue
            table = self._tables.get(nid, {})
            for target in self.rng.sample(peers, min(cfg.fanout, len(peers))):
                items, size = [], 64
                # Newest first (most transmits left), as memberlist's queue does.
                for key in sorted(q, key=q.__getitem__, reverse=True):
                    e = table.get(key)
                    if e is None:
                        del q[key]
                        continue
                    if (nid, key) in skip:
                        continue
                    enc = [key, e.owner, e.ltime, e.deleted, e.value]
                    n = len(key.encode()) + len(e.owner.encode()) + len(e.value) + 16
                    if size + n > cfg.netdb_message_bytes_max:
                        break
                    if len(items) >= cfg.netdb_entries_per_message_max:
                        break
                    items.append(enc)
                    size += n
                    q[key] -= 1
                    if q[key] <= 0:
                        del q[key]
                if items:
                    self._outbound.append(
                        (target, _pack(MSG_TABLE_EVENTS, [self.name, nid], items))
                    )

    def _send_bulk(self, dest: str, nid: str, reply: bool) -> None:
        """Our whole table of ``nid`` (tombstones included) and its member records, in
        chunks. Every chunk asks for a reply (one chunk may be lost); the peer answers once
        per sync id."""
        self._sync_ids += 1
        ents = [[k, e.owner, e.ltime, e.deleted, e.value] for k, e in self._tables[nid].items()]
        mems = [[n, r.ltime, r.leaving] for n, r in self._members.get(nid, {}).items()]
        head = [self.name, nid, self._sync_ids, reply]
        for chunk in self._chunks(ents) or [[]]:
            self._outbound.append((dest, _pack(MSG_BULK_SYNC, head, chunk, [])))
        for chunk in self._chunks(mems):
            self._outbound.append((dest, _pack(MSG_BULK_SYNC, head, [], chunk)))
        self._count("bulk_syncs_out")

    def _send_net_records(self, dest: str, only: str | None, reply: bool = False) -> None:
        """Node/network records (all of them, or only ``only``'s) to ``dest``, in chunks."""
        recs = [
            [node, nid, r.ltime, r.leaving]
            for nid, nodes in self._members.items()
            for node, r in nodes.items()
            if only is None or node == only
        ]
        for chunk in self._chunks(recs) or ([[]] if reply else []):
            self._outbound.append((dest, _pack(MSG_NET_SYNC, [self.name], chunk, reply)))
            reply = False  # one answer is enough

    def _chunks(self, items: list[list]) -> list[list[list]]:
        """Split records into messages within the size and count limits."""
        cfg = self.config
        out: list[list[list]] = []
        cur: list[list] = []
        size = 96  # type byte, version, sender, network id, sync id
        for item in items:
            n = _ENTRY_OVERHEAD_BYTES + sum(
                len(x.encode()) if isinstance(x, str) else len(x)
                for x in item
                if isinstance(x, str | bytes)
            )
            if cur and (
                size + n > cfg.netdb_message_bytes_max
                or len(cur) >= cfg.netdb_entries_per_message_max
            ):
                out.append(cur)
                cur, size = [], 96
            cur.append(item)
            size += n
        if cur:
            out.append(cur)
        return out

    def _reap(self, now: float) -> None:
        for table in self._tables.values():
            dead = [k for k, e in table.items() if e.deleted and e.reap_s <= now]
            for k in dead:
                del table[k]
            self._n_entries -= len(dead)
            self._count("tombstones_reaped", len(dead))
        for name in [n for n, t in self._failed.items() if t <= now]:
            del self._failed[name]
            self._gone[name] = now + self.config.tombstone_s  # laggards may re-send its state
            self._count("failed_members_purged")
            for table in self._tables.values():
                gone = [k for k, e in table.items() if e.owner == name]
                for k in gone:
                    del table[k]
                self._n_entries -= len(gone)
            for recs in self._members.values():
                if recs.pop(name, None) is not None:
                    self._n_records -= 1
        for recs in self._members.values():
            gone = [n for n, r in recs.items() if r.leaving and r.reap_s <= now]
            for n in gone:
                del recs[n]
            self._n_records -= len(gone)
        for name in [n for n, t in self._gone.items() if t <= now]:
            del self._gone[name]
        self._hinted = {k: t for k, t in self._hinted.items() if now - t < 1.0}

    def _count(self, name: str, n: int = 1) -> None:
        if n:
            self.counters[name] = self.counters.get(name, 0) + n


def _pack(kind: int, head: list, *tail: object) -> bytes:
    return bytes([kind]) + msgpack.packb([WIRE_VERSION, *head, *tail], use_bin_type=True)


def _check_name(s: object, what: str) -> None:
    if not isinstance(s, str) or not s or len(s.encode()) > _NAME_BYTES_MAX:
        raise NetDBError(f"netdb: {what} must be 1..{_NAME_BYTES_MAX} bytes of text")


def _name(s: object) -> None:
    if not isinstance(s, str) or not s or len(s) > _NAME_BYTES_MAX:
        raise _Bad("bad_name")


def _ltime(t: object) -> None:
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _LTIME_MAX:
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
