"""Durable acknowledgements (swarmnet.raft.journal): group commit, torn tails, compaction,
and the real thing: SIGKILL at random moments during a write stream, no acknowledged write
lost (3 processes on loopback, bench/raft_cluster.py)."""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

import pytest

from swarmnet.raft.journal import DurableJournal, GroupCommitTransport

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


# ---- the journal alone ------------------------------------------------------------------


def test_sync_runs_once_per_batch_and_only_when_dirty(tmp_path: Path) -> None:
    j = DurableJournal(str(tmp_path / "j"))
    assert j.sync() is False  # nothing written
    for i in range(1, 101):
        j.add(b"\x01cmd", i, 1)
    assert j.sync() is True and j.syncs == 1  # 100 entries, one msync
    assert j.sync() is False and j.syncs == 1
    j._destroy()


def test_journal_reloads_and_drops_a_torn_tail(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 11):
        j.add(b"\x01" + bytes([i]) * 50, i, 1)
    j.sync()
    j._destroy()
    # Simulate a crash during an msync: the header already counts a record whose bytes
    # never reached the disk (zeros).
    import struct

    from pysyncobj import journal as pj

    with open(path, "r+b") as f:
        f.seek(pj.LAST_RECORD_OFFSET_OFFSET)
        end = struct.unpack("<I", f.read(4))[0]
        f.seek(pj.LAST_RECORD_OFFSET_OFFSET)
        f.write(struct.pack("<I", end + 200))
    j2 = DurableJournal(path)
    assert [e[1] for e in j2[:]] == list(range(1, 11))
    j2.add(b"\x01next", 11, 1)
    j2.sync()
    j2._destroy()
    assert [e[1] for e in DurableJournal(path)[:]] == list(range(1, 12))


def test_compaction_rewrites_atomically(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    j = DurableJournal(path)
    for i in range(1, 21):
        j.add(b"\x01x", i, 2)
    j.deleteEntriesTo(15)
    assert [e[1] for e in j[:]] == [16, 17, 18, 19, 20]
    j.add(b"\x01y", 21, 2)
    j.sync()
    j._destroy()
    assert [e[1] for e in DurableJournal(path)[:]] == [16, 17, 18, 19, 20, 21]
    assert not Path(path + ".compact").exists()


def test_meta_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    j = DurableJournal(str(tmp_path / "j"))
    synced.clear()
    j.setCurrentTerm(3, "a:1")
    assert len(synced) >= 2  # the file and its directory
    assert DurableJournal(str(tmp_path / "j")).getCurrentTerm() == 3


# ---- the ack waits for the sync ---------------------------------------------------------


class _FakeSyncObj:
    def __init__(self, journal: object) -> None:
        self._SyncObj__raftLog = journal
        self.callbacks: list = []

    def addOnTickCallback(self, cb) -> None:  # noqa: N802
        self.callbacks.append(cb)


def test_follower_ack_is_held_until_the_journal_is_synced(monkeypatch) -> None:
    events: list[str] = []

    class Journal:
        def sync(self) -> bool:
            events.append("sync")
            return True

    sent: list[dict] = []
    monkeypatch.setattr(
        "pysyncobj.transport.TCPTransport.__init__", lambda self, *a: None, raising=True
    )
    monkeypatch.setattr(
        "pysyncobj.transport.TCPTransport.send",
        lambda self, node, msg: (events.append(f"send {msg['type']}"), sent.append(msg)),
    )
    so = _FakeSyncObj(Journal())
    t = GroupCommitTransport(so, None, [])
    assert so.callbacks == [t.group_commit]
    for i in range(3):  # three AppendEntries answered in one tick
        t.send("leader", {"type": "next_node_idx", "next_node_idx": i, "success": True})
    t.send("leader", {"type": "apply_command", "command": b""})  # not an ack: goes at once
    assert events == ["send apply_command"]
    t.group_commit()  # the tick ends
    assert events == ["send apply_command", "sync"] + ["send next_node_idx"] * 3
    assert [m["next_node_idx"] for m in sent[1:]] == [0, 1, 2]


def test_entryless_append_entries_are_held_superseded_or_released(monkeypatch) -> None:
    """PATCH POINT 8: a commit-update/heartbeat AppendEntries waits for the next one with
    entries (then dropped), or for the deadline; one that lets a follower see its forwarded
    write commit goes at once; entries and snapshot chunks are never held."""

    class Journal:
        def sync(self) -> bool:
            return False

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        "pysyncobj.transport.TCPTransport.__init__", lambda self, *a: None, raising=True
    )
    monkeypatch.setattr(
        "pysyncobj.transport.TCPTransport.send", lambda self, node, msg: sent.append((node, msg))
    )
    t = GroupCommitTransport(_FakeSyncObj(Journal()), None, [])
    t.coalesce_ae = False  # PATCH POINT 9 is tested below

    def ae(commit: int, entries: list | None = None) -> dict:
        return {"type": "append_entries", "commit_index": commit, "entries": entries or []}

    t.send("a", ae(5))
    t.send("b", ae(5))
    assert sent == []  # both held
    t.send("a", ae(6))  # a newer one replaces the held one
    t.send("a", ae(6, [(b"x", 7, 1)]))  # entries: sent, and supersedes a's held one
    assert sent == [("a", ae(6, [(b"x", 7, 1)]))]
    snap = {"type": "append_entries", "commit_index": 6, "serialized": None}
    t.send("a", snap)
    assert sent[-1] == ("a", snap)
    t.flush_idle_append_entries()  # the deadline passed
    assert sent[-1] == ("b", ae(5)) and len(sent) == 3
    # b forwarded a write that got index 9: a commit index below 9 may wait, 9 goes at once.
    t.send("b", {"type": "apply_command_response", "request_id": 1, "log_idx": 9})
    t.send("b", ae(8))
    assert sent[-1][1]["type"] == "apply_command_response"
    t.send("b", ae(9))
    assert sent[-1] == ("b", ae(9))
    t.send("b", ae(10))  # nothing forwarded is waiting any more: held again
    assert sent[-1] == ("b", ae(9))
    t.idle_ae_hold_s = 0.0  # 0: pysyncobj's behaviour, nothing held
    t.send("a", ae(11))
    assert sent[-1] == ("a", ae(11))


def test_append_entries_of_one_tick_are_merged_and_sent_before_the_sync(monkeypatch) -> None:
    """PATCH POINT 9: consecutive AppendEntries to a node in one tick become one (entries in
    order, newest commit index); a gap, a new term or another message type splits them;
    all leave in group_commit before the leader's own msync."""
    events: list[str] = []

    class Journal:
        def sync(self) -> bool:
            events.append("sync")
            return True

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        "pysyncobj.transport.TCPTransport.__init__", lambda self, *a: None, raising=True
    )

    def send(self, node, msg) -> None:
        events.append(f"send {node}")
        sent.append((node, msg))

    monkeypatch.setattr("pysyncobj.transport.TCPTransport.send", send)
    from pysyncobj.fast_queue import FastQueue

    so = _FakeSyncObj(Journal())
    t = GroupCommitTransport(so, None, [])
    so._SyncObj__commandsQueue = queue = FastQueue(100)  # noqa: SLF001 - pysyncobj's name
    queue.put_nowait((b"more", None))  # more commands this tick: keep merging

    def ae(idx: int, commit: int, term: int = 1) -> dict:
        return {
            "type": "append_entries",
            "term": term,
            "commit_index": commit,
            "entries": [(b"c%d" % idx, idx, term)],
            "prevLogIdx": idx - 1,
            "prevLogTerm": term,
        }

    for i in (10, 11, 12):
        t.send("a", ae(i, commit=i - 2))
        t.send("b", ae(i, commit=i - 2))
    t.send("a", {"type": "append_entries", "term": 1, "commit_index": 11, "entries": []})
    assert sent == []
    t.group_commit()
    assert events == ["send a", "send b", "sync"]
    merged = dict(sent[0][1])
    assert [e[1] for e in merged.pop("entries")] == [10, 11, 12]
    assert merged == {
        "type": "append_entries",
        "term": 1,
        "commit_index": 11,
        "prevLogIdx": 9,
        "prevLogTerm": 1,
    }
    assert sent[1][1]["commit_index"] == 10
    sent.clear()
    t.send("a", ae(13, 12))
    t.send("a", ae(15, 12))  # not the continuation of 13: the first leaves as it was
    assert [m["entries"][0][1] for _, m in sent] == [13]
    t.send("a", {"type": "apply_command_response", "request_id": 1, "log_idx": 16})
    assert [m["type"] for _, m in sent] == ["append_entries"] * 2 + ["apply_command_response"]
    t.send("a", ae(16, 13, term=1))
    t.send("a", ae(17, 13, term=2))  # new term: not merged
    snap = {"type": "append_entries", "term": 2, "commit_index": 13, "serialized": None}
    t.send("a", snap)  # a snapshot chunk: after what was kept, never merged
    assert [m.get("entries", [(0, "s")])[0][1] for _, m in sent[3:]] == [16, 17, "s"]
    queue.get_nowait()  # the tick's last command: its AppendEntries goes at once
    t.send("b", ae(13, 12))
    assert sent[-1] == ("b", ae(13, 12))


async def test_store_ack_comes_after_the_sync(tmp_path: Path) -> None:
    """Single-node Store: the write's callback fires only after an msync covering it."""
    import socket

    from swarmnet.raft.store import RaftConfig, Store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Store(f"127.0.0.1:{port}", [], tmp_path / "raft", "pw", RaftConfig(raft_port=port))
    try:
        await store.wait_leader()
        j = store.journal
        assert j is not None
        order: list[str] = []
        real_sync = j.sync
        lock = threading.Lock()

        def sync() -> bool:
            with lock:
                dirty = j._dirty
                r = real_sync()
                if dirty:
                    order.append("sync")
                return r

        j.sync = sync  # type: ignore[method-assign]
        real_apply = store._replica.state.apply

        def apply(cmd: dict) -> dict:
            order.append("apply")
            return real_apply(cmd)

        store._replica.state.apply = apply  # type: ignore[method-assign]
        await store.submit({"op": "noop"})
        assert "apply" in order
        assert "sync" in order[: order.index("apply")]
    finally:
        await store.aclose()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_tick_thread_refuses_writes(tmp_path: Path, caplog) -> None:
    import socket

    from swarmnet.raft.store import RaftConfig, Store, StoreError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Store(
        f"127.0.0.1:{port}",
        [],
        tmp_path / "raft",
        "pw",
        RaftConfig(raft_port=port, tick_stall_s=1.0),
    )
    try:
        await store.wait_leader()
        await store.submit({"op": "noop"})

        def boom(*a, **k):
            raise SystemExit("injected")  # not an Exception: pysyncobj's loop does not catch it

        store._sync._onTick = boom  # the tick thread looks it up on every iteration
        deadline = time.monotonic() + 30
        while store.health_error() is None:
            assert time.monotonic() < deadline, "the dead tick thread was not noticed"
            await __import__("asyncio").sleep(0.05)
        with pytest.raises(StoreError) as e:
            await store.submit({"op": "noop"})
        assert e.value.status == 503 and "tick thread" in e.value.message
        deadline = time.monotonic() + 30
        while not any(r.levelname == "CRITICAL" for r in caplog.records):
            assert time.monotonic() < deadline, "no CRITICAL log"
            await __import__("asyncio").sleep(0.05)
    finally:
        store.close()


# ---- SIGKILL during a write stream --------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_write() -> None:
    from raft_cluster import Cluster

    rng = random.Random()
    c = Cluster(n=3, compact=200)  # compactions happen during the run too
    acked: set[str] = set()
    stop = threading.Event()
    try:
        c.start_all()
        c.init()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                alive = c.alive()
                if not alive:
                    time.sleep(0.01)
                    continue
                name = f"n{i}"
                try:
                    code, _ = c.call(rng.choice(alive), "/write", {"name": name}, timeout=12)
                except OSError:
                    code = 0
                if code == 200:
                    acked.add(name)
                    i += 1
                else:
                    time.sleep(0.02)  # retry the same name: idempotent by id

        threads = [threading.Thread(target=writer) for _ in range(1)]
        for t in threads:
            t.start()
        for _ in range(8):
            time.sleep(rng.uniform(0.2, 1.5))
            victim = rng.choice([c.leader(), rng.randrange(3)])
            c.kill(victim)
            time.sleep(rng.uniform(0.0, 1.0))
            c.start(victim)
        # and once, all three at the same moment (the case the journal must survive alone)
        time.sleep(1.0)
        for i in range(3):
            c.kill(i)
        for i in range(3):
            c.start(i)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert len(acked) > 50
        c.leader(60)
        deadline = time.monotonic() + 60
        while True:
            sts = [c.status(i) for i in range(3)]
            missing = [sorted(acked - set(st["networks"])) if st else ["<down>"] for st in sts]
            if not any(missing):
                break
            assert time.monotonic() < deadline, f"acknowledged writes missing: {missing}"
            time.sleep(0.2)
    finally:
        stop.set()
        c.close()
