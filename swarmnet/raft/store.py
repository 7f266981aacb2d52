"""The replicated store: ClusterState behind pysyncobj, driven from asyncio.

pysyncobj runs its own tick thread (autoTick; the ONLY ticking strategy: nothing here calls
doTick), and only that thread applies commands. The event loop never blocks on Raft:
``submit`` hands a command to pysyncobj's queue with a callback that records the result
and wakes the loop once per burst of results (``call_soon_threadsafe``); change listeners
are notified at most once per tick (per-command wake-ups cost a third of a follower's CPU
in bench/raft_ipam.py); everything else the loop calls is a plain attribute
read (``_isLeader``, ``_getLeader``, ``raftCurrentTerm``, a set copy or a membership test),
never a wait. Reads take a lock shared with the apply path (held only for one tiny command)
and copy what they need, so the API never sees a half-applied command.

Configuration choices (measured in ../shared/pysyncobj/RESULTS.md):
- ``journalFile`` AND ``fullDumpFile``: the journal alone wedges a restarted node after the
  first compaction; the in-memory default forgets every IP and VNI on restart.
- durable acks: swarmnet.raft.journal (group commit: one msync per tick before any ack).
- ``appendEntriesUseBatch=False``: with batching every write waits for a 100 ms tick.
- ``password``: pysyncobj's wire format is pickle; without a password the Raft port is
  remote code execution. ``bindAddress``: the port binds to the manager's address only
  (pysyncobj binds 0.0.0.0 by default).
- ``leaderFallbackTimeout`` 30 s -> 10 s: how long a leader cut off from the majority keeps
  believing it leads. Leader-only work is additionally gated by a replicated no-op.

Health: a tick-thread heartbeat (an on-tick callback) is watched from the loop; a dead or
stalled tick thread is logged CRITICAL and every write answers 503 until restart.
"""

from __future__ import annotations

import _socket
import asyncio
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from swarmnet.raft.journal import DurableJournal, GroupCommitTransport, register_journal
from swarmnet.raft.state import ClusterState

# pysyncobj 0.3.17 (win_inet_pton.py, imported by its tcp_connection) replaces
# socket.inet_ntop with a Windows-only function on EVERY platform, so any later caller in
# the process (pyroute2 decoding IFA_ADDRESS, for one) gets a TypeError. Put the real one back.
socket.inet_ntop = _socket.inet_ntop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RaftConfig:
    raft_port: int = 2378  # DESIGN "Ports": managers only, next to the 2377 control port
    command_timeout_s: float = 10.0  # a write that has not committed by then is "unknown outcome"
    connection_retry_s: float = 1.0  # pysyncobj's 5 s default makes catch-up slow (RESULTS T3)
    log_compaction_min_entries: int = 5000  # pysyncobj default; keeps the journal bounded
    fsync: bool = True  # False only for the benchmark's "cost of durability" ratio
    leader_fallback_s: float = 10.0  # pysyncobj: 30 s (a deposed leader believes it leads)
    election_wait_s: float = 3.0  # a write with quorum but no known leader waits this long
    tick_stall_s: float = 5.0  # no tick for this long -> the store is broken (503, CRITICAL)
    # The leader holds an AppendEntries without entries (commit-index update, heartbeat) this
    # long, so that the next command's AppendEntries carries it instead (journal.py PATCH
    # POINT 8: +10 % one-at-a-time writes); 0: send at once, as pysyncobj does.
    idle_append_entries_hold_s: float = 0.001
    # One AppendEntries per follower per tick instead of one per command (journal.py PATCH
    # POINT 9); False: pysyncobj's behaviour.
    coalesce_append_entries: bool = True


class StoreError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Replica(SyncObjConsumer):
    def __init__(self, lock: threading.Lock):
        # Attributes set before SyncObjConsumer.__init__ are excluded from the dump.
        self._lock = lock
        # Set by every apply (tick thread); Store._on_tick (end of the tick) or Store._flush
        # (loop, with results) clears it and notifies: once per tick, not once per command.
        # A set racing a clear is harmless: the notification runs after both applies.
        self.applied = False
        super().__init__()
        self.state = ClusterState()

    @replicated
    def apply_command(self, blob: bytes) -> Any:
        cmd = msgpack.unpackb(blob, raw=False)
        with self._lock:
            result = self.state.apply(cmd)
        self.applied = True
        return result

    def _deserialize(self, data: Any) -> None:
        with self._lock:
            super()._deserialize(data)
        self.applied = True


class Store:
    def __init__(
        self,
        self_addr: str,
        partners: list[str],
        data_dir: Path,
        password: str,
        config: RaftConfig | None = None,
    ):
        self.config = config or RaftConfig()
        self.self_addr = self_addr
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        # Futures whose command committed, with their results: appended by pysyncobj's
        # callbacks on the tick thread; ONE call_soon_threadsafe (self-pipe write, GIL
        # hand-over) wakes the loop for all that pile up until it runs (_flush). The first
        # result of a burst is delivered at once, not at the end of the tick: the caller's
        # next command then reaches pysyncobj's queue in time for this tick's
        # _checkCommandsToApply (one-at-a-time writes lost a poll cycle otherwise).
        # deque: append (tick thread) and popleft (loop) are thread-safe.
        self._resolved: deque[tuple[asyncio.Future, Any, int]] = deque()
        self._flush_scheduled = False
        self._replica = _Replica(self._lock)
        self._last_tick = time.monotonic()
        self._tick_jobs: list[Callable[[], None]] = []  # list.append/pop: atomic under the GIL
        data_dir.mkdir(parents=True, exist_ok=True)
        journal = str(data_dir / "raft.journal")
        dump = str(data_dir / "raft.dump")
        self.journal: DurableJournal | None = None

        def make_journal() -> DurableJournal:
            self.journal = DurableJournal(journal, dump, fsync=self.config.fsync)
            return self.journal

        register_journal(journal, make_journal)
        conf = SyncObjConf(
            password=password,
            bindAddress=self_addr,
            journalFile=journal,
            fullDumpFile=dump,
            appendEntriesUseBatch=False,
            connectionRetryTime=self.config.connection_retry_s,
            logCompactionMinEntries=self.config.log_compaction_min_entries,
            leaderFallbackTimeout=self.config.leader_fallback_s,
            dynamicMembershipChange=True,
        )
        partners = [p for p in partners if p != self_addr]
        transport = type(
            "StoreTransport",
            (GroupCommitTransport,),
            {
                "idle_ae_hold_s": self.config.idle_append_entries_hold_s,
                "coalesce_ae": self.config.coalesce_append_entries,
            },
        )
        self._sync = SyncObj(
            self_addr,
            partners,
            conf=conf,
            consumers=[self._replica],
            transportClass=transport,
        )
        self._sync.addOnTickCallback(self._on_tick)
        self._watchdog = self._loop.create_task(self._watch(), name="raft-watchdog")

    # ---- tick thread health -----------------------------------------------------------

    def _on_tick(self) -> None:
        self._last_tick = time.monotonic()  # a float store: atomic, read by the loop
        while self._tick_jobs:
            job = self._tick_jobs.pop(0)
            try:
                job()
            except Exception:
                log.exception("Raft tick job failed")
        # Runs after this tick's applies: one change notification per tick, not one per
        # command (a wake-up per command cost a third of a follower's CPU in
        # bench/raft_ipam.py). _flush may have sent it already, with a result.
        if self._replica.applied:
            self._replica.applied = False
            self._call_soon(self._notify)

    def run_on_tick(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the tick thread: pysyncobj calls that touch the transport directly
        (transferLeadership) are not thread-safe."""
        self._tick_jobs.append(job)

    def transfer_leadership(self) -> None:
        self.run_on_tick(lambda: self._sync.transferLeadership())

    def health_error(self) -> str | None:
        """None if the tick thread is alive and ticking; otherwise why not."""
        if not self._sync.tick_thread_alive():
            return "the Raft tick thread is dead"
        stalled = time.monotonic() - self._last_tick
        if stalled > self.config.tick_stall_s:
            return f"the Raft tick thread has not ticked for {stalled:.0f} s"
        return None

    async def _watch(self) -> None:
        reported = False
        while True:
            await asyncio.sleep(min(1.0, self.config.tick_stall_s / 4))
            err = self.health_error()
            if err is not None and not reported:
                log.critical("%s: this manager refuses writes until it is restarted", err)
                reported = True
            elif err is None and reported:
                log.critical("the Raft tick thread is ticking again")
                reported = False

    # ---- change notification ---------------------------------------------------------

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # loop closed during shutdown

    def _flush(self) -> None:
        """On the loop: every result recorded so far. The change notification first, as
        before the batching (a waiter woken by a result sees its change notified)."""
        self._flush_scheduled = False  # before draining: a later append schedules again
        if self._replica.applied:
            self._replica.applied = False
            self._notify()
        while self._resolved:
            _resolve(*self._resolved.popleft())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for fn in list(self._listeners):
            fn()

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    async def wait_change(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see manager._leader_loop
                await self._changed.wait()
        except TimeoutError:
            pass

    # ---- Raft status (plain attribute reads: never blocks) ----------------------------

    def read(self, fn: Callable[[ClusterState], Any]) -> Any:
        with self._lock:
            return fn(self._replica.state)

    @property
    def index(self) -> int:
        return self._replica.state.index

    @property
    def term(self) -> int:
        return int(self._sync.raftCurrentTerm)

    def is_leader(self) -> bool:
        return bool(self._sync._isLeader())

    def leader(self) -> str | None:
        leader = self._sync._getLeader()
        return None if leader is None else str(getattr(leader, "address", leader))

    def members(self) -> dict[str, bool]:
        """Raft address -> connected (this node: True). From pysyncobj's TCP status."""
        out = {self.self_addr: True}
        for node in self._sync.otherNodes:  # a copy made in C: safe against the tick thread
            out[str(node.address)] = bool(self._sync.isNodeConnected(node))
        return out

    def has_quorum(self) -> bool:
        """TCP-connected to a majority of the members (RESULTS 1.6: not a lease)."""
        m = self.members()
        return sum(m.values()) > len(m) / 2

    async def wait_leader(self, timeout_s: float = 30.0) -> None:
        deadline = self._loop.time() + timeout_s
        while self._sync._getLeader() is None:
            if self._loop.time() > deadline:
                raise StoreError(503, "no Raft leader elected")
            await asyncio.sleep(0.05)

    async def _writable(self) -> None:
        """Fail fast instead of hanging: pysyncobj queues a command while it knows no leader
        (commandsWaitLeader) and an isolated follower keeps its old leader forever (it only
        starts an election when connected to someone), so check connectivity first."""
        err = self.health_error()
        if err is not None:
            raise StoreError(503, f"{err}: this manager cannot accept writes; restart it")
        m = self.members()
        up = sum(m.values())
        if up <= len(m) / 2:
            raise StoreError(
                503,
                f"the managers have no quorum: this manager reaches {up} of {len(m)} "
                f"(needs {len(m) // 2 + 1}); reads still work, writes are refused",
            )
        deadline = self._loop.time() + self.config.election_wait_s
        while self._sync._getLeader() is None:
            if self._loop.time() > deadline:
                raise StoreError(503, "no Raft leader elected yet (election in progress); retry")
            await asyncio.sleep(0.05)

    # ---- writes -----------------------------------------------------------------------

    def _future_callback(self) -> tuple[asyncio.Future, Callable[[Any, int], None]]:
        fut: asyncio.Future = self._loop.create_future()

        def done(result: Any, error: int) -> None:
            if error != FAIL_REASON.SUCCESS:
                # Rare, and possibly from another thread (QUEUE_FULL from the caller's).
                self._call_soon(_resolve, fut, result, error)
                return
            self._resolved.append((fut, result, error))  # tick thread only
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._call_soon(self._flush)

        return fut, done

    async def _await(self, fut: asyncio.Future) -> Any:
        try:
            async with asyncio.timeout(self.config.command_timeout_s):
                return await fut
        except TimeoutError as e:
            raise StoreError(
                503, "the write did not commit in time (no quorum?); it may still apply"
            ) from e

    async def submit(self, cmd: dict) -> dict:
        """Commit one command and return its result (a dict; errors are results)."""
        await self._writable()
        fut, done = self._future_callback()
        self._replica.apply_command(msgpack.packb(cmd, use_bin_type=True), callback=done)
        return await self._await(fut)

    async def confirm_leadership(self) -> bool:
        """A replicated no-op from this term: True only if it committed while this node led
        (RESULTS 1.6: a deposed leader may believe it leads for leaderFallbackTimeout)."""
        term = self.term
        if not self.is_leader():
            return False
        await self.submit({"op": "noop", "term": term})
        return self.is_leader() and self.term == term

    async def add_member(self, raft_addr: str) -> None:
        """One membership change, waited for (pysyncobj does not serialise them itself)."""
        await self._writable()
        fut, done = self._future_callback()
        self._sync.addNodeToCluster(raft_addr, callback=lambda res, err: done(res, err))
        await self._await(fut)

    async def remove_member(self, raft_addr: str) -> None:
        await self._writable()
        fut, done = self._future_callback()
        self._sync.removeNodeFromCluster(raft_addr, callback=lambda res, err: done(res, err))
        await self._await(fut)

    def close(self) -> None:
        self._watchdog.cancel()
        self._sync.destroy()

    async def aclose(self) -> None:
        """Stop and wait for the tick thread (off the loop), so the port is free again."""
        self.close()
        await asyncio.get_running_loop().run_in_executor(None, self._sync.destroy_synchronous)


def _resolve(fut: asyncio.Future, result: Any, error: int) -> None:
    if fut.done():
        return  # timed out (cancelled) meanwhile
    if error == FAIL_REASON.SUCCESS:
        fut.set_result(result)
    else:
        fut.set_exception(StoreError(503, _fail_message(error)))


def _fail_message(code: int) -> str:
    names = {
        FAIL_REASON.QUEUE_FULL: "the Raft queue is full",
        FAIL_REASON.MISSING_LEADER: "no Raft leader: the managers have no quorum",
        FAIL_REASON.DISCARDED: "the write was discarded by a leader change",
        FAIL_REASON.NOT_LEADER: "this manager is not the leader",
        FAIL_REASON.LEADER_CHANGED: "the leader changed; the write may or may not have applied",
        FAIL_REASON.REQUEST_DENIED: "the Raft request was denied (membership change in progress?)",
    }
    return names.get(code, f"Raft failure {code}")
