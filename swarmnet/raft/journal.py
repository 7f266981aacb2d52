"""Durable acknowledgements for pysyncobj 0.3.17: group commit, fsynced meta and dumps.

pysyncobj never syncs anything (../shared/pysyncobj/RESULTS.md 1.1): the journal is an mmap
that is never msynced, ``.meta`` (currentTerm, votedFor) is renamed without fsync, and the
full dump is renamed without fsync. An acknowledged write therefore survives a SIGKILL (the
dirty pages belong to the kernel) but not a host crash. This module makes it survive both:

- ``DurableJournal`` (a FileJournal) marks itself dirty on every change; ``sync()`` msyncs
  the mapping once, however many entries were added since the last sync (group commit).
- ``GroupCommitTransport`` holds every ``next_node_idx`` message (a follower's answer to
  AppendEntries, i.e. its ack) while the journal has unsynced changes, and right after each
  poll (and again at the end of each tick) syncs the journal and only then sends the held
  acks. The end-of-tick sync runs on the leader BEFORE its next tick computes the commit
  index, in which the leader counts itself: entries appended in tick N are synced at the
  end of tick N, and the commit count of tick N+1 is the first to see them.
- meta and dumps are written to a temporary file, fsynced, renamed, and the directory fsynced.

Guarantee: a write acknowledged to a client was on stable storage on a majority of managers
before the acknowledgement. The only entry a leader may count unsynced is the no-op it
appends at election (appended and counted in the same tick); a single-manager cluster can
thus lose that no-op, which carries no client data.

Every patch point below names the pysyncobj internals it depends on; they are checked for
0.3.17 exactly (pinned in pyproject.toml) and importing this module fails loudly on any other
version rather than silently losing the guarantee.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pysyncobj.serializer
import pysyncobj.syncobj
from pysyncobj import journal as _pj
from pysyncobj import pickle as _pickle
from pysyncobj.transport import TCPTransport
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

log = logging.getLogger(__name__)

PINNED_VERSION = "0.3.17"
if PYSYNCOBJ_VERSION != PINNED_VERSION:  # pragma: no cover - guards the patch points below
    raise ImportError(
        f"swarmnet.raft.journal patches pysyncobj {PINNED_VERSION} internals; "
        f"found {PYSYNCOBJ_VERSION}: re-check every patch point before changing the pin"
    )


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str, dst: str) -> bool:
    """fsync(src); rename(src, dst); fsync(dir): a crash leaves the old or the new file."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    fsync_dir(dst)
    return True


# PATCH POINT 1 (serializer.py): Serializer.serialize (the snapshot, written in a forked
# child) and Serializer.setTransmissionData (a snapshot received from the leader) both end
# with ``atomicReplace(tmp, final)``, imported into the serializer module's namespace; on
# POSIX it is a bare os.rename. Replacing that name makes both durable.
pysyncobj.serializer.atomicReplace = durable_replace


class DurableMetaStorer(_pj.MetaStorer):
    """PATCH POINT 2 (journal.py MetaStorer.storeMeta): write, fsync, rename, fsync dir.

    FileJournal.setCurrentTerm stores meta synchronously before a vote or a new term goes out
    (Raft requires currentTerm/votedFor durable by then); now it really is durable."""

    def storeMeta(self, meta: dict) -> None:  # noqa: N802 - pysyncobj's name
        tmp = self.getPath() + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_pickle.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.getPath())
        fsync_dir(self.getPath())


_HEADER_PREFIX = (
    _pj.APP_NAME
    + b"\0" * (_pj.NAME_SIZE - len(_pj.APP_NAME))
    + _pj.APP_VERSION
    + b"\0" * (_pj.VERSION_SIZE - len(_pj.APP_VERSION))
)


def _header(last_record_offset: int) -> bytes:
    return _HEADER_PREFIX + struct.pack("<II", _pj.JOURNAL_FORMAT_VERSION, last_record_offset)


def _record(command: bytes, idx: int, term: int) -> bytes:
    data = struct.pack("<QQ", idx, term) + _pickle.to_bytes(command)
    size = struct.pack("<I", len(data))
    return size + data + size


class DurableJournal(_pj.FileJournal):
    """FileJournal (same on-disk format) with group-commit ``sync()``.

    PATCH POINT 3: FileJournal keeps its state in name-mangled attributes
    (``_FileJournal__journalFile``, ``__journal``, ``__currentOffset``, ``__metaStorer``,
    ``__meta``, ``__metaSaved``); this class sets them itself in ``_open`` (tolerant load,
    used at start and after compaction) and relies on FileJournal for add/clear/
    deleteEntriesFrom/getters/meta."""

    def __init__(self, journal_file: str, dump_file: str | None = None, fsync: bool = True):
        # Not FileJournal.__init__: its loader trusts the header blindly; a host crash during
        # an msync can leave the header pointing past records that never reached the disk.
        self._path = journal_file
        self._fsync = fsync
        self._dirty = False
        self._lock = threading.Lock()
        self.syncs = 0  # how many msyncs ran (the benchmark and the tests read it)
        self.sync_seconds = 0.0  # time spent in them (bench/raft_node.py reports it)
        self._FileJournal__metaStorer = DurableMetaStorer(journal_file + ".meta")
        self._FileJournal__meta = self._FileJournal__metaStorer.getMeta()
        self._FileJournal__metaSaved = True
        self._open()
        if dump_file is not None:
            self._trim_to_dump(dump_file)

    # ---- loading --------------------------------------------------------------------

    def _open(self) -> None:
        if not os.path.exists(self._path):
            with open(self._path, "wb") as f:
                f.write(_header(_pj.FIRST_RECORD_OFFSET))
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self._path)
        rf = _pj.ResizableFile(self._path, defaultContent=_header(_pj.FIRST_RECORD_OFFSET))
        end = struct.unpack("<I", rf.read(_pj.LAST_RECORD_OFFSET_OFFSET, 4))[0]
        entries: list[tuple[bytes, int, int]] = []
        off = _pj.FIRST_RECORD_OFFSET
        while off + 8 <= end:
            size = struct.unpack("<I", rf.read(off, 4))[0]
            if size < 16 or off + 8 + size > end:
                break
            if struct.unpack("<I", rf.read(off + 4 + size, 4))[0] != size:
                break
            data = rf.read(off + 4, size)
            idx, term = struct.unpack("<QQ", data[:16])
            if entries and idx != entries[-1][1] + 1:
                break
            entries.append((data[16:], idx, term))
            off += size + 8
        if off != end:
            log.warning(
                "raft journal %s: torn tail after %d entries (crash during a sync?): "
                "keeping the intact prefix; those entries were never acknowledged",
                self._path,
                len(entries),
            )
            rf.write(_pj.LAST_RECORD_OFFSET_OFFSET, struct.pack("<I", off))
            self._dirty = True
        self._FileJournal__journalFile = rf
        self._FileJournal__journal = entries
        self._FileJournal__currentOffset = off

    def _trim_to_dump(self, dump_file: str) -> None:
        """PATCH POINT 4 (syncobj.py SyncObj.__loadDumpFile): on start, if the journal does
        not begin with the dump's two entries, pysyncobj CLEARS the journal. After a crash
        between writing a snapshot and trimming the journal (Serializer child done, next
        tick not yet run) the journal still begins before the snapshot, so every entry after
        it (acknowledged ones included) would be wiped. Trim to the snapshot here instead."""
        if not os.path.isfile(dump_file):
            return
        try:
            with open(dump_file, "rb") as f, gzip.GzipFile(fileobj=f) as g:
                data = _pickle.load(g)
            prev_entry = tuple(data[2])
        except Exception:
            log.exception("raft dump %s unreadable; pysyncobj will report it too", dump_file)
            return
        entries = self._FileJournal__journal
        for k, e in enumerate(entries):
            if e[1] == prev_entry[1]:
                if k > 0 and tuple(e) == prev_entry:
                    log.info("raft journal: trimming %d entries already in the snapshot", k)
                    self.deleteEntriesTo(k)
                return

    # ---- group commit ---------------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self._dirty = True

    def clear(self) -> None:
        super().clear()
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802,N803
        super().deleteEntriesFrom(entryFrom)
        self._dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802,N803
        """Compaction: FileJournal rewrites the file in place (clear, then re-add), so a crash
        midway loses the tail. Write the kept entries to a new file and rename it instead."""
        kept = self._FileJournal__journal[entryTo:]
        body = b"".join(_record(c, i, t) for c, i, t in kept)
        end = _pj.FIRST_RECORD_OFFSET + len(body)
        tmp = self._path + ".compact"
        with open(tmp, "wb") as f:
            f.write(_header(end) + body)
            f.flush()
            os.fsync(f.fileno())
        with self._lock:
            self._FileJournal__journalFile._destroy()  # msync + close the old mapping
            durable_replace(tmp, self._path)
            self._FileJournal__journalFile = _pj.ResizableFile(self._path)
            self._FileJournal__journal = list(kept)
            self._FileJournal__currentOffset = end

    def sync(self) -> bool:
        """msync the journal if anything changed since the last sync. True if it synced."""
        if not self._dirty:
            return False
        self._dirty = False
        if not self._fsync:
            return False
        t0 = time.perf_counter()
        with self._lock:
            self._FileJournal__journalFile.flush()  # mmap.flush() == msync(MS_SYNC)
        self.sync_seconds += time.perf_counter() - t0
        self.syncs += 1
        return True


# PATCH POINT 5 (syncobj.py SyncObj.__init__): the journal comes from the module-level name
# ``createJournal(conf.journalFile)``; SyncObj offers no journal parameter. Journals
# registered here by path are built by their factory; any other path gets pysyncobj's own.
_factories: dict[str, Callable[[], Any]] = {}
_factories_lock = threading.Lock()
_original_create_journal = pysyncobj.syncobj.createJournal


def register_journal(path: str, factory: Callable[[], Any]) -> None:
    with _factories_lock:
        _factories[path] = factory


def _create_journal(journal_file: str | None = None) -> Any:
    with _factories_lock:
        factory = _factories.pop(journal_file, None) if journal_file else None
    if factory is not None:
        return factory()
    return _original_create_journal(journal_file)


pysyncobj.syncobj.createJournal = _create_journal


class GroupCommitTransport(TCPTransport):
    """PATCH POINT 6 (syncobj.py SyncObj.__onMessageReceived -> __sendNextNodeIdx ->
    transport.send): a follower answers AppendEntries with a ``next_node_idx`` message right
    after ``raftLog.add``. Hold those messages; sync the journal, then send them in order.
    One sync covers every entry received or appended since the last one.

    The sync-and-send (``group_commit``) runs at two points of every tick:
    - right after the poll (PATCH POINT 7, ``SyncObj._poller.poll`` wrapped on the
      instance): the AppendEntries of one poll batch are answered at once, before the next
      tick spends time applying entries (sending them at the end of the next tick instead
      halved one-at-a-time throughput in bench/raft_ipam.py);
    - as an on-tick callback, i.e. after the leader appended this tick's commands and
      before its poll: the leader's own entries are synced before the next tick counts the
      leader toward commit.

    An ack is not held when nothing is waiting for a sync: the journal holds no unsynced
    change (all it acknowledges is on disk already), or fsync is off (benchmark only).

    The leader also holds entry-less AppendEntries for up to ``idle_ae_hold_s`` (PATCH
    POINT 8, ``_hold_idle_append_entries``); 0 sends them at once, as pysyncobj does."""

    # Long enough to cover the loop's round trip to the next command one write at a time
    # (about 0.3 ms here), short against heartbeats. Store sets it from RaftConfig.
    idle_ae_hold_s: float = 0.001
    # PATCH POINT 9: merge the AppendEntries built in one tick (Store sets it from
    # RaftConfig); at most about pysyncobj's appendEntriesBatchSizeBytes of commands each.
    coalesce_ae: bool = True
    coalesce_max_bytes: int = 2**16

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any):  # noqa: N803
        # The journal and the poller are created in SyncObj.__init__ before the transport.
        self._journal = syncObj._SyncObj__raftLog
        self._held: list[tuple[Any, dict]] = []
        # PATCH POINT 8: entry-less AppendEntries held per node (see ``send``), the time by
        # which they must leave, and per node the highest log index this leader told it
        # about in an ``apply_command_response`` (a write it forwarded and waits for).
        self._idle_ae: dict[Any, dict] = {}
        self._idle_ae_deadline = 0.0
        self._forwarded: dict[Any, int] = {}
        # PATCH POINT 9: per node, the AppendEntries with entries built this tick, merged.
        self._pending_ae: dict[Any, tuple[dict, int]] = {}
        self._owner = weakref.ref(syncObj)  # its command queue exists only after us
        super().__init__(syncObj, selfNode, otherNodes)
        syncObj.addOnTickCallback(self.group_commit)
        poller = getattr(syncObj, "_poller", None)
        if poller is not None:
            poll = poller.poll

            def poll_then_commit(timeout: float) -> None:
                if self._idle_ae:  # wake up in time to send the held ones
                    timeout = max(0.0, min(timeout, self._idle_ae_deadline - time.monotonic()))
                poll(timeout)
                self.group_commit()
                if self._idle_ae and time.monotonic() >= self._idle_ae_deadline:
                    self.flush_idle_append_entries()

            poller.poll = poll_then_commit

    def _must_hold(self) -> bool:
        # Read on the tick thread, which is also the only writer of ``_dirty``: a False here
        # means every entry this ack covers was synced (or syncing is off altogether).
        j = self._journal
        return bool(getattr(j, "_fsync", True)) and bool(getattr(j, "_dirty", True))

    def send(self, node: Any, message: Any) -> bool:
        if not isinstance(message, dict):
            return super().send(node, message)
        kind = message.get("type")
        if kind == "next_node_idx" and (self._held or self._must_hold()):
            self._held.append((node, message))  # behind earlier held ones: order kept
            return True
        if kind == "append_entries":
            if self.coalesce_ae and self._coalesce(node, message):
                return True
            if self.idle_ae_hold_s > 0 and self._hold_idle_append_entries(node, message):
                return True
        else:
            self._send_pending(node)  # whatever was built before it leaves before it
            if kind == "apply_command_response" and "log_idx" in message:
                self._forwarded[node] = max(self._forwarded.get(node, 0), message["log_idx"])
        return super().send(node, message)

    def _coalesce(self, node: Any, message: dict) -> bool:
        """PATCH POINT 9 (syncobj.py SyncObj._checkCommandsToApply -> __sendAppendEntries
        after EVERY command with ``appendEntriesUseBatch=False``): k commands appended in
        one tick made k AppendEntries per follower, each with one entry, and k answers from
        each. The leader now keeps the AppendEntries built during the tick and merges each
        one that continues the previous (same term, its prevLogIdx/prevLogTerm = the last
        entry held) into one message: the entries in order, the newest commit index. That
        is exactly what the follower would have done with the k messages in a row.
        They leave as soon as pysyncobj's command queue is empty (the tick's last command
        is appended: one write at a time, at once), at the latest in ``group_commit``
        BEFORE the leader's own msync, so replication still overlaps the leader's sync (and
        never waits for a compaction). True if kept or sent here.

        An entry-less one is folded in (its commit index), snapshot chunks and anything
        else go out at once, after what was kept for that node (order per node kept)."""
        if "serialized" in message or "transmission" in message or "entries" not in message:
            self._send_pending(node)
            self._idle_ae.pop(node, None)  # older: must not arrive after a snapshot chunk
            return False
        held = self._pending_ae.get(node)
        entries = message["entries"]
        if not entries:
            if held is None or held[0]["term"] != message["term"]:
                return False
            held[0]["commit_index"] = max(held[0]["commit_index"], message["commit_index"])
            return True
        size = sum(len(e[0]) for e in entries)
        if held is not None:
            last = held[0]["entries"][-1]
            if (
                held[0]["term"] == message["term"]
                and message.get("prevLogIdx") == last[1]
                and message.get("prevLogTerm") == last[2]
                and held[1] + size <= self.coalesce_max_bytes
            ):
                held[0]["entries"] = held[0]["entries"] + list(entries)
                held[0]["commit_index"] = max(held[0]["commit_index"], message["commit_index"])
                self._pending_ae[node] = (held[0], held[1] + size)
                if not self._more_commands_queued():
                    self._send_pending(node)
                return True
            self._send_pending(node)
        self._idle_ae.pop(node, None)  # superseded: this one carries the commit index
        self._pending_ae[node] = (dict(message, entries=list(entries)), size)
        if not self._more_commands_queued():
            self._send_pending(node)  # the tick's last command: no reason to wait
        return True

    def _more_commands_queued(self) -> bool:
        """Will _checkCommandsToApply append more this tick? (Its FastQueue's deque; a
        command queued from the loop right after this read just is not merged.)"""
        owner = self._owner()
        queue = getattr(owner, "_SyncObj__commandsQueue", None)
        return bool(getattr(queue, "_FastQueue__queue", None))

    def _send_pending(self, node: Any) -> None:
        held = self._pending_ae.pop(node, None)
        if held is not None:
            self._release_forwarded(node, held[0])
            super().send(node, held[0])

    def send_pending_append_entries(self) -> None:
        for node in list(self._pending_ae):
            self._send_pending(node)

    def _hold_idle_append_entries(self, node: Any, message: dict) -> bool:
        """PATCH POINT 8 (syncobj.py SyncObj._onTick -> __applyLogEntries returns True with
        ``appendEntriesUseBatch=False`` -> __sendAppendEntries): after every apply, the
        leader sends each follower an AppendEntries without entries, only to carry the new
        commit index, and each follower answers it. One write at a time, those four
        messages (and the wake-ups of three processes) land exactly while the loop resolves
        the write and submits the next one: the next command's AppendEntries carries the
        same commit index a few hundred microseconds later. So an entry-less AppendEntries
        (commit update or heartbeat) is held up to ``idle_ae_hold_s`` and dropped if an
        AppendEntries with entries for the same node supersedes it (same leader, later
        commit index, computed later in the same tick thread); otherwise it leaves at the
        deadline (the poll wakes up for it). True if held (or superseded).

        Nothing durable depends on it: it carries no entries, and what a follower acks is
        still synced first (PATCH POINT 6). Heartbeats leave at most 1 ms late (election
        timeouts are 400 ms and more). A follower waiting for the commit of a write it
        forwarded (it answers its client once it applied ``log_idx``) is never made to
        wait: a commit index reaching that write goes out at once."""
        if "entries" not in message or "serialized" in message or "transmission" in message:
            return False  # snapshot transfer: never held
        if message["entries"]:
            self._idle_ae.pop(node, None)  # superseded: this one carries the commit index
            self._release_forwarded(node, message)
            return False
        if self._release_forwarded(node, message):
            self._idle_ae.pop(node, None)
            return False
        if not self._idle_ae:
            self._idle_ae_deadline = time.monotonic() + self.idle_ae_hold_s
        self._idle_ae[node] = message  # the newest replaces an older held one
        return True

    def _release_forwarded(self, node: Any, message: dict) -> bool:
        """True if this message lets ``node`` learn that a write it forwarded committed."""
        waiting = self._forwarded.get(node)
        if waiting is None or message.get("commit_index", 0) < waiting:
            return False
        del self._forwarded[node]
        return True

    def flush_idle_append_entries(self) -> None:
        held, self._idle_ae = self._idle_ae, {}
        for node, message in held.items():
            super().send(node, message)

    def group_commit(self) -> None:
        if self._pending_ae:  # replication first: it overlaps the leader's own msync
            self.send_pending_append_entries()
        sync = getattr(self._journal, "sync", None)
        if sync is not None:
            sync()
        if not self._held:
            return
        held, self._held = self._held, []
        for node, message in held:
            super().send(node, message)
