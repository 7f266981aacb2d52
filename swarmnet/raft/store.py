"""The replicated store: ClusterState behind pysyncobj, driven from asyncio.

pysyncobj runs its own tick thread (autoTick), and only that thread applies commands; the
event loop never blocks on Raft: ``submit`` hands a command to pysyncobj with a callback
that resolves an asyncio future through ``call_soon_threadsafe``. Reads take a lock shared
with the apply path and copy what they need, so the API never sees a half-applied command.

Configuration choices (measured in ../shared/pysyncobj/RESULTS.md):
- ``journalFile`` AND ``fullDumpFile``: the journal alone wedges a restarted node after the
  first compaction; the in-memory default forgets every IP and VNI on restart.
- ``appendEntriesUseBatch=False``: with batching every write waits for a 100 ms tick.
- ``password``: pysyncobj's wire format is pickle; without a password the Raft port is
  remote code execution. The port binds to the manager's address only.
Durability against host crashes (fsync) is the managers issue (#4); see docs.
"""

from __future__ import annotations

import _socket
import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

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


class StoreError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Replica(SyncObjConsumer):
    def __init__(self, lock: threading.Lock, on_apply: Callable[[], None]):
        # Attributes set before SyncObjConsumer.__init__ are excluded from the dump.
        self._lock = lock
        self._on_apply = on_apply
        super().__init__()
        self.state = ClusterState()

    @replicated
    def apply_command(self, blob: bytes) -> Any:
        cmd = msgpack.unpackb(blob, raw=False)
        with self._lock:
            result = self.state.apply(cmd)
        self._on_apply()
        return result

    def _deserialize(self, data: Any) -> None:
        with self._lock:
            super()._deserialize(data)
        self._on_apply()


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
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._replica = _Replica(self._lock, self._notify_from_thread)
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = SyncObjConf(
            password=password,
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / "raft.dump"),
            appendEntriesUseBatch=False,
            connectionRetryTime=self.config.connection_retry_s,
            logCompactionMinEntries=self.config.log_compaction_min_entries,
            dynamicMembershipChange=True,
        )
        self._sync = SyncObj(self_addr, partners, conf=conf, consumers=[self._replica])

    # ---- change notification ---------------------------------------------------------

    def _notify_from_thread(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._notify)
        except RuntimeError:
            pass  # loop closed during shutdown

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

    # ---- reads and writes -------------------------------------------------------------

    def read(self, fn: Callable[[ClusterState], Any]) -> Any:
        with self._lock:
            return fn(self._replica.state)

    @property
    def index(self) -> int:
        return self._replica.state.index

    def is_leader(self) -> bool:
        return bool(self._sync._isLeader())

    def leader(self) -> str | None:
        leader = self._sync._getLeader()
        return None if leader is None else str(getattr(leader, "address", leader))

    def has_quorum(self) -> bool:
        return self._sync._getLeader() is not None

    async def wait_leader(self, timeout_s: float = 30.0) -> None:
        deadline = self._loop.time() + timeout_s
        while self._sync._getLeader() is None:
            if self._loop.time() > deadline:
                raise StoreError(503, "no Raft leader elected")
            await asyncio.sleep(0.05)

    async def submit(self, cmd: dict) -> dict:
        """Commit one command and return its result (a dict; errors are results)."""
        fut: asyncio.Future = self._loop.create_future()

        def done(result: Any, error: int) -> None:
            def resolve() -> None:
                if fut.done():
                    return
                if error == FAIL_REASON.SUCCESS:
                    fut.set_result(result)
                else:
                    fut.set_exception(StoreError(503, _fail_message(error)))

            self._loop.call_soon_threadsafe(resolve)

        blob = msgpack.packb(cmd, use_bin_type=True)
        self._replica.apply_command(blob, callback=done)
        try:
            async with asyncio.timeout(self.config.command_timeout_s):
                return await fut
        except TimeoutError as e:
            raise StoreError(
                503, "the write did not commit in time (no quorum?); it may still apply"
            ) from e

    def close(self) -> None:
        self._sync.destroy()


def _fail_message(code: int) -> str:
    names = {
        FAIL_REASON.QUEUE_FULL: "the Raft queue is full",
        FAIL_REASON.MISSING_LEADER: "no Raft leader: the managers have no quorum",
        FAIL_REASON.DISCARDED: "the write was discarded by a leader change",
        FAIL_REASON.NOT_LEADER: "this manager is not the leader",
        FAIL_REASON.LEADER_CHANGED: "the leader changed; the write may or may not have applied",
        FAIL_REASON.REQUEST_DENIED: "the Raft request was denied",
    }
    return names.get(code, f"Raft failure {code}")
