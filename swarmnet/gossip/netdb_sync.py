"""How NetworkDB's tables spread (netdb.py's state machine holds them and merges): the
owner's direct push, the epidemic gossip rounds, bulk syncs (periodic, and the join sync
that refills a (re)joining node at once) and the node/network membership exchange.

A mixin of ``NetworkDB``, as the membership core is split (core_probe, core_gossip, ...):
it reads and writes the state that netdb.py declares, and only appends to ``_outbound``
(``(node name | None, payload)``): no I/O, no clock, randomness from the injected ``rng``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from swarmnet.gossip.netdb_wire import (
    MSG_BULK_SYNC,
    MSG_NET_SYNC,
    MSG_TABLE_EVENTS,
    NetDBConfig,
    chunks,
    pack,
)

if TYPE_CHECKING:
    import random

_pack = pack


def _retransmit_limit(mult: int, n: int) -> int:
    return mult * math.ceil(math.log10(n + 1))


class _SyncMixin:
    """The spreading half of ``NetworkDB`` (see netdb.py for the state it declares)."""

    # Declared by NetworkDB.__init__ (netdb.py); listed here for the reader and the checker.
    name: str
    rng: random.Random
    config: NetDBConfig
    _alive: set[str]
    _members: dict
    _tables: dict
    _queues: dict[str, dict[str, int]]
    _push: dict[str, set[str]]
    _push_at: float
    _gossip_at: float
    _last_gossip_s: float
    _unsynced: dict[str, set[str]]
    _sync_retry: dict[str, tuple[float, float]]
    _sync_ids: int
    _outbound: list[tuple[str | None, bytes]]

    counters: dict[str, int]

    def _count(self, name: str, n: int = 1) -> None:
        if n:
            self.counters[name] = self.counters.get(name, 0) + n

    def _peers(self, nid: str) -> list[str]:
        """Alive members of ``nid`` other than us, in a deterministic order."""
        alive = self._alive
        recs = self._members.get(nid, {})
        return [n for n, r in recs.items() if not r.leaving and n in alive]

    def _pull(self, nid: str, now: float, candidates: list[str] | None = None) -> int:
        """Initial sync of ``nid`` (joined, no table received yet): push-pull with members
        of it (``candidates``, or any), up to ``join_sync_peers`` unanswered at once. Returns
        how many were asked now."""
        asked = self._unsynced.get(nid)
        if asked is None:
            return 0
        room = self.config.join_sync_peers - len(asked)
        pool = self._peers(nid) if candidates is None else candidates
        peers = [p for p in pool if p not in asked and p in self._alive and p != self.name]
        if room <= 0 or not peers:
            return 0
        if len(peers) > room:
            peers = self.rng.sample(peers, room)
        for p in peers:
            self._sync_with(p, nid, now)
        self._count("initial_syncs_out", len(peers))
        return len(peers)

    def _sync_with(self, node: str, nid: str, now: float) -> None:
        """Push-pull ``nid``'s table with ``node``; while our initial sync of ``nid`` waits,
        its answer completes it (and a retry is armed in case none comes)."""
        asked = self._unsynced.get(nid)
        if asked is not None:
            asked.add(node)
            retry = self.config.join_sync_retry_s
            self._sync_retry.setdefault(nid, (now + retry, retry))
        self._send_bulk(node, nid, reply=True)

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
            parts = chunks(items, self.config)
            for target in peers:
                for chunk in parts:
                    self._outbound.append(
                        (target, _pack(MSG_TABLE_EVENTS, [self.name, nid], chunk))
                    )
            self._count("owner_pushes", len(peers) * len(parts))
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
        for chunk in chunks(ents, self.config) or [[]]:
            self._outbound.append((dest, _pack(MSG_BULK_SYNC, head, chunk, [])))
        for chunk in chunks(mems, self.config):
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
        for chunk in chunks(recs, self.config) or ([[]] if reply else []):
            self._outbound.append((dest, _pack(MSG_NET_SYNC, [self.name], chunk, reply)))
            reply = False  # one answer is enough
