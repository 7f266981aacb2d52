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
6. Joining a network pulls its table at once (``NetDBConfig.join_sync_peers``): from members
   known then, else from the first ones we learn of, asked again (backing off) until one
   answers or the periodic sync takes over. So a node restarted with empty tables is full
   again one round trip after it knows the members.
7. How the tables spread (push, gossip rounds, bulk and join syncs) is netdb_sync.py, a
   mixin of this class.
8. Wire (netdb_wire.py): one type byte, then a msgpack array whose first item is the format
   version. Every decode error drops the message and bumps ``counters["drop_<reason>"]``,
   never raises.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from swarmnet.gossip.netdb_sync import _SyncMixin
from swarmnet.gossip.netdb_wire import (
    MSG_BULK_SYNC,
    MSG_NET_EVENTS,
    MSG_NET_SYNC,
    MSG_TABLE_EVENTS,
    WIRE_VERSION,
    NetDBConfig,
    NetDBError,
    _Bad,
    decode,
)
from swarmnet.gossip.netdb_wire import check_name as _check_name
from swarmnet.gossip.netdb_wire import pack as _pack

if TYPE_CHECKING:
    import random


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


class NetworkDB(_SyncMixin):
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
        # Peers answer each (sender, network, sync id) once. A restarted node counting from 0
        # again would repeat ids its previous life used, and the peers would stay silent to
        # its join sync (they answered that id already): its tables then stayed empty until
        # the periodic sync, 30 s. So a new life starts at a random point (48 bits: a repeat
        # is out of reach; the wire allows 63).
        self._sync_ids = rng.getrandbits(48)
        self._hinted: dict[tuple[str, str], float] = {}  # (owner, nid) -> last hint time
        # Networks joined whose table no member has sent us yet: nid -> members asked. And
        # when to ask others if none of them answers (only while someone was asked), and the
        # delay after that one (doubling: a network nobody answers does not wake us often).
        self._unsynced: dict[str, set[str]] = {}
        self._sync_retry: dict[str, tuple[float, float]] = {}
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
        if self._sync_retry:
            t = min(t, min(at for at, _ in self._sync_retry.values()))
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
        for nid in sorted(n for n, (t, _) in self._sync_retry.items() if t <= now):
            # Nobody answered: ask again, others if there are (the asked may be dead), after
            # twice the delay; beyond the periodic sync's interval, leave it to that one.
            _, delay = self._sync_retry.pop(nid)
            self._unsynced[nid].clear()
            self._count("initial_sync_retries")
            if self._pull(nid, now) and 2 * delay < cfg.bulk_sync_s:
                self._sync_retry[nid] = (now + 2 * delay, 2 * delay)
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
        # Fetch the table now rather than at the next bulk sync; if no member is known yet,
        # the first ones we learn of are asked (_apply_net).
        self._unsynced[nid] = set()
        self._pull(nid, now)

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
        self._unsynced.pop(nid, None)
        self._sync_retry.pop(nid, None)

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

    def synced(self, nid: str) -> bool:
        """True once a member asked for ``nid``'s table has answered since we joined it: our
        view is then as complete as theirs (until then it may lack entries)."""
        return nid in self._joined and nid not in self._unsynced

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
                        self._sync_with(name, nid, now)
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
            kind, body = decode(payload, self.config)
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
        if sender in self._unsynced.get(nid, ()):
            # A member we asked sent its table (its first chunk: the others follow it).
            del self._unsynced[nid]
            self._sync_retry.pop(nid, None)
            self._count("initial_syncs_done")
        if reply and sender != self.name and self._replied.get((sender, nid)) != sync_id:
            self._replied[(sender, nid)] = sync_id
            self._replied.move_to_end((sender, nid))
            while len(self._replied) > 4096:
                self._replied.popitem(last=False)
            self._send_bulk(sender, nid, reply=False)

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
            if self._pull(nid, now, [node]):
                pass  # we still wait for this network's table: ask it (push-pull)
            elif self._lucky(nid):
                # A member new to one of our networks: about `fanout` of us send it the table.
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


__all__ = [
    "MSG_BULK_SYNC",
    "MSG_NET_EVENTS",
    "MSG_NET_SYNC",
    "MSG_TABLE_EVENTS",
    "WIRE_VERSION",
    "NetDBConfig",
    "NetDBError",
    "NetworkDB",
    "TableEvent",
    "_pack",
]
