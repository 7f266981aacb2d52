"""A ``GossipNode`` that hosts a ``NetworkDB`` beside its membership core.

The wiring (netdb.py's module docstring) lives here so that the agent only sees a node with
tables: every membership event of the core is fed to the NetworkDB (``user`` messages to
``receive``, the rest to ``on_member``); after every input the NetworkDB's outbound messages
are handed to the core (``broadcast_user`` for cluster-wide ones, ``send_user`` to the named
member's address) and the core is flushed again by the driver's pump loop, so nothing is
reordered; table events go to a bounded queue and an optional callback. There is still ONE
``call_at``: the earliest of the core's and the NetworkDB's deadlines.

Metrics: the transport's drops (``drop_*`` per reason), the core's counters, the driver's,
and the NetworkDB's counters prefixed ``netdb_`` (its ``drop_*`` per reason among them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from swarmnet.gossip.core import MemberEvent
from swarmnet.gossip.driver import GossipNode
from swarmnet.gossip.netdb import NetDBConfig, NetworkDB, TableEvent

log = logging.getLogger(__name__)

TABLE_EVENTS_MAX = 4096
"""Table events kept for a slow consumer of ``table_events``; beyond, the oldest are dropped
and counted. The consumer of this project (the worker) reads the tables level-triggered, so
a dropped event only delays nothing: the next resync reads ``entries()``."""


class NetDBNode(GossipNode):
    """A gossip member with per-network endpoint tables. ``await start()`` first."""

    def __init__(
        self,
        *args: Any,
        netdb_config: NetDBConfig | None = None,
        on_table_event: Callable[[TableEvent], None] | None = None,
        **kw: Any,
    ):
        super().__init__(*args, **kw)
        self.netdb_config = netdb_config or NetDBConfig()
        self.on_table_event = on_table_event
        self.table_events: asyncio.Queue[TableEvent] = asyncio.Queue(TABLE_EVENTS_MAX)
        self.db: NetworkDB | None = None

    async def start(self) -> None:
        # The NetworkDB exists before the first pump, so that no membership event is missed.
        self._loop = asyncio.get_running_loop()
        self.db = NetworkDB(self.name, self.rng, self._loop.time(), self.netdb_config)
        await super().start()

    # ---- the table API (each call pumps, so its messages leave at once) ------------------

    def _table(self) -> NetworkDB:
        assert self.db is not None, "start() first"
        return self.db

    def join_network(self, nid: str) -> None:
        self._table().join_network(nid, self._now())
        self._pump()

    def leave_network(self, nid: str) -> None:
        self._table().leave_network(nid, self._now())
        self._pump()

    def put(self, nid: str, key: str, value: bytes) -> None:
        self._table().put(nid, key, value, self._now())
        self._pump()

    def delete(self, nid: str, key: str) -> bool:
        done = self._table().delete(nid, key, self._now())
        self._pump()
        return done

    def entries(self, nid: str) -> dict[str, tuple[str, bytes]]:
        return self._table().entries(nid)

    def networks(self) -> set[str]:
        return self._table().networks()

    def synced(self, nid: str) -> bool:
        """A member has sent us ``nid``'s table since we joined it (NetworkDB.synced)."""
        return self._table().synced(nid)

    def metrics(self) -> dict[str, int]:
        out = super().metrics()
        for k, v in (self.db.counters if self.db else {}).items():
            out["netdb_" + k] = out.get("netdb_" + k, 0) + v
        return out

    # ---- the driver's hooks ---------------------------------------------------------------

    def _handle_timer(self, now: float) -> None:
        super()._handle_timer(now)
        if self.db is not None:
            self.db.handle_timer(now)

    def _next_deadline(self) -> float | None:
        core = super()._next_deadline()
        db = self.db.next_deadline() if self.db is not None else None
        if core is None or db is None:
            return core if db is None else db
        return min(core, db)

    def _deliver(self, ev: MemberEvent) -> None:
        db = self.db
        if db is not None:
            try:
                if ev.kind == "user":
                    db.receive("", ev.payload, self._now())
                else:
                    db.on_member(ev.kind, ev.name, self._now())
            except Exception:  # a bug of ours: never let it stop the pump
                self._count("netdb_errors")
                log.exception("netdb failed on %s", ev.kind)
        if ev.kind != "user":  # our own table traffic would flood the member event queue
            super()._deliver(ev)

    def _flush(self) -> None:
        super()._flush()
        db, core = self.db, self.core
        if db is None or core is None:
            return
        out = db.take_outbound()
        for dest, payload in out:
            if dest is None:
                core.broadcast_user(payload)
                continue
            m = core.member(dest)
            if m is None:
                self._count("netdb_dest_unknown")
                continue
            core.send_user(m.address, payload)
        if out:
            self._pump_again = True  # the core has datagrams to send now
        for tev in db.take_events():
            if self.table_events.full():
                self.table_events.get_nowait()
                self._count("table_events_dropped")
            self.table_events.put_nowait(tev)
            if self.on_table_event is not None:
                try:
                    self.on_table_event(tev)
                except Exception:
                    self._count("table_callback_errors")
                    log.exception("table event callback failed")


__all__ = ["TABLE_EVENTS_MAX", "NetDBNode"]
