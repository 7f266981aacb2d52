"""NetworkDB as a pure state machine: conflict rules, tombstones, failure suspend/resume,
network-scoped delivery, and a fuzz of the decoder (swarmnet/gossip/netdb.py)."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.gossip.netdb import (
    MSG_BULK_SYNC,
    MSG_NET_EVENTS,
    MSG_TABLE_EVENTS,
    NetDBConfig,
    NetDBError,
    NetworkDB,
    TableEvent,
    _pack,
)

CFG = NetDBConfig.default(tombstone_s=60.0, failed_grace_s=120.0)


class Pool:
    """NetworkDBs wired directly to each other (no membership core): every message is
    delivered at once unless ``drop`` says otherwise; None-addressed ones go to everyone."""

    def __init__(self, names: list[str], seed: int = 1, config: NetDBConfig = CFG) -> None:
        rng = random.Random(seed)
        self.now = 0.0
        self.config = config
        self.dbs = {n: NetworkDB(n, random.Random(rng.getrandbits(32)), 0.0, config) for n in names}
        self.sent: list[tuple[str, str | None, bytes]] = []
        self.down: set[str] = set()
        for a in names:
            for b in names:
                if a != b:
                    self.dbs[a].on_member("join", b, 0.0)

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for name, db in self.dbs.items():
                for dest, payload in db.take_outbound():
                    if name in self.down:
                        continue
                    moved = True
                    self.sent.append((name, dest, payload))
                    targets = [dest] if dest is not None else [n for n in self.dbs if n != name]
                    for t in targets:
                        if t not in self.down:
                            self.dbs[t].receive("", payload, self.now)
            if not moved:
                return

    def tick(self, seconds: float, step: float = 0.1) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 6)
            for name, db in self.dbs.items():
                if name not in self.down:
                    d = db.next_deadline()
                    if d is not None and d <= self.now:
                        db.handle_timer(self.now)
            self.pump()

    def events(self, name: str) -> list[TableEvent]:
        return self.dbs[name].take_events()


def _pool(
    names: list[str] = ["a", "b", "c"],  # noqa: B006
    nid: str = "n1",
    config: NetDBConfig = CFG,
) -> Pool:
    p = Pool(names, config=config)
    for n in names:
        p.dbs[n].join_network(nid, 0.0)
    p.pump()
    p.tick(1.0)
    for n in names:
        p.events(n)
    return p


def _event(nid: str, key: str, owner: str, ltime: int, deleted: bool, value: bytes) -> bytes:
    return _pack(MSG_TABLE_EVENTS, ["forger", nid], [[key, owner, ltime, deleted, value]])


def _ltime(db: NetworkDB, nid: str, key: str) -> int:
    return db._tables[nid][key].ltime


def test_put_update_delete_propagate_with_events() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "ep1", b"v1", p.now)
    p.tick(1.0)
    assert p.events("b") == [TableEvent("add", "n1", "ep1", b"v1", "a")]
    assert p.events("a") == [TableEvent("add", "n1", "ep1", b"v1", "a")]  # own too
    p.events("c")
    p.dbs["a"].put("n1", "ep1", b"v2", p.now)
    p.tick(1.0)
    assert p.events("c") == [TableEvent("update", "n1", "ep1", b"v2", "a")]
    p.events("b")
    assert p.dbs["a"].delete("n1", "ep1", p.now)
    p.tick(1.0)
    assert p.events("b") == [TableEvent("delete", "n1", "ep1", b"v2", "a")]
    assert p.dbs["b"].entries("n1") == {}
    assert p.dbs["b"]._tables["n1"]["ep1"].deleted  # a tombstone, not forgotten yet


def test_higher_lamport_time_wins_lower_is_ignored() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.tick(1.0)
    b = p.dbs["b"]
    t = _ltime(b, "n1", "k")
    b.receive("", _event("n1", "k", "a", t - 1, False, b"old"), p.now)
    assert b.entries("n1")["k"] == ("a", b"v")
    b.receive("", _event("n1", "k", "a", t + 1, False, b"new"), p.now)
    assert b.entries("n1")["k"] == ("a", b"new")


def test_equal_time_tombstone_never_hides_a_live_entry() -> None:
    """moby PR #50342: a tombstone with the same Lamport time must not beat the live entry."""
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.tick(1.0)
    b = p.dbs["b"]
    t = _ltime(b, "n1", "k")
    b.receive("", _event("n1", "k", "a", t, True, b"v"), p.now)
    assert b.entries("n1") == {"k": ("a", b"v")}
    assert b.counters["drop_equal_time_tombstone"] == 1
    # The other way round: a tombstone held at time t gives way to a live entry at t.
    c = p.dbs["c"]
    c._tables["n1"]["k"].deleted = True
    c.receive("", _event("n1", "k", "a", t, False, b"v"), p.now)
    assert c.entries("n1") == {"k": ("a", b"v")}


def test_equal_time_live_values_converge_on_one_choice() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "k", b"m", p.now)
    p.tick(1.0)
    t = _ltime(p.dbs["b"], "n1", "k")
    for name, order in (("b", [b"z", b"m"]), ("c", [b"m", b"z"])):
        for v in order:
            p.dbs[name].receive("", _event("n1", "k", "a", t, False, v), p.now)
    assert p.dbs["b"].entries("n1") == p.dbs["c"].entries("n1")


def test_no_node_deletes_or_takes_over_another_nodes_entry() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.tick(1.0)
    b = p.dbs["b"]
    b.receive("", _event("n1", "k", "c", 10**6, True, b""), p.now)
    b.receive("", _event("n1", "k", "c", 10**6, False, b"evil"), p.now)
    assert b.entries("n1") == {"k": ("a", b"v")}
    assert b.counters["drop_not_owner"] == 2
    with pytest.raises(NetDBError):
        p.dbs["c"].put("n1", "k", b"mine", p.now)
    assert p.dbs["c"].delete("n1", "k", p.now) is False


def test_owner_reasserts_its_view_over_a_newer_forged_one() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.tick(1.0)
    t = _ltime(p.dbs["a"], "n1", "k")
    forged = _event("n1", "k", "a", t + 5, True, b"")
    p.dbs["b"].receive("", forged, p.now)  # b believes it...
    assert p.dbs["b"].entries("n1") == {}
    p.dbs["a"].receive("", forged, p.now)  # ...but when it reaches the owner, it outbids it
    assert p.dbs["a"].counters["own_entries_reasserted"] == 1
    p.tick(1.0)
    for n in "abc":
        assert p.dbs[n].entries("n1") == {"k": ("a", b"v")}, n


def test_events_of_networks_we_are_not_in_are_never_stored() -> None:
    """moby PR #49932: no orphan entries of a network we are not in."""
    p = _pool(["a", "b", "c"])
    p.dbs["a"].join_network("n2", p.now)
    p.pump()
    p.dbs["a"].put("n2", "k", b"v", p.now)
    p.tick(2.0)
    b = p.dbs["b"]
    b.receive("", _event("n2", "x", "c", 1, False, b"v"), p.now)
    bulk = _pack(MSG_BULK_SYNC, ["a", "n2", 99, True], [["k", "a", 9, False, b"v"]], [])
    b.receive("", bulk, p.now)
    assert "n2" not in b.stored_networks()
    assert b.entries("n2") == {}
    assert b.counters["drop_not_in_network"] >= 2
    # Delivery is network-scoped: n2's table events only ever went to n2 members (a alone).
    assert not [s for s in p.sent if s[2][0] == MSG_TABLE_EVENTS and b"n2" in s[2]]


def test_table_event_racing_a_network_leave_leaves_no_orphan() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.tick(1.0)
    late = _event("n1", "late", "a", 10**3, False, b"v")  # sent before the leave, arrives after
    p.dbs["a"].leave_network("n1", p.now)
    p.tick(1.0)
    b = p.dbs["b"]
    assert [e.kind for e in p.events("b")] == ["add", "delete"]
    assert b.entries("n1") == {}
    b.receive("", late, p.now)
    assert b.entries("n1") == {}
    assert b.counters["drop_owner_gone"] == 1
    assert p.dbs["a"].stored_networks() == set()


def test_tombstones_are_reaped_after_the_grace_period() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.tick(1.0)
    p.dbs["a"].delete("n1", "k", p.now)
    p.tick(1.0)
    b = p.dbs["b"]
    p.tick(CFG.tombstone_s - 10)
    assert "k" in b._tables["n1"]
    # Before reaping, a delayed old live copy cannot resurrect the entry.
    b.receive("", _event("n1", "k", "a", 1, False, b"v"), p.now)
    assert b.entries("n1") == {}
    p.tick(10 + 2 * CFG.reap_interval_s)
    for n in "abc":
        assert "k" not in p.dbs[n]._tables["n1"], n
    assert b.counters["tombstones_reaped"] == 1


def test_failed_member_hidden_then_resumed_within_grace() -> None:
    """moby #53141: a short disconnect must not lose the member's entries for good."""
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.tick(1.0)
    p.events("b")
    p.down.add("a")
    p.dbs["b"].on_member("failed", "a", p.now)
    assert p.events("b") == [TableEvent("delete", "n1", "k", b"v", "a")]
    assert p.dbs["b"].entries("n1") == {}
    p.tick(30.0)
    p.down.discard("a")
    p.dbs["b"].on_member("join", "a", p.now)
    p.dbs["a"].put("n1", "k", b"v", p.now)  # re-sent: must be accepted
    p.tick(1.0)
    assert p.events("b") == [TableEvent("add", "n1", "k", b"v", "a")]  # back, no churn
    assert p.dbs["b"].entries("n1") == {"k": ("a", b"v")}


def test_failed_member_purged_after_grace_and_leave_deletes() -> None:
    p = _pool()
    p.dbs["a"].put("n1", "k", b"v", p.now)
    p.dbs["c"].put("n1", "kc", b"v", p.now)
    p.tick(1.0)
    b = p.dbs["b"]
    p.down.add("a")
    b.on_member("failed", "a", p.now)
    p.tick(CFG.failed_grace_s + 2 * CFG.reap_interval_s)
    assert "k" not in b._tables["n1"]
    assert "a" not in b.network_members("n1")
    b.take_events()
    b.on_member("leave", "c", p.now)
    assert b.take_events() == [TableEvent("delete", "n1", "kc", b"v", "c")]


def test_restarted_owner_removes_what_its_previous_life_left() -> None:
    p = _pool()
    a = p.dbs["a"]
    a.put("n1", "keep", b"v", p.now)
    a.put("n1", "gone", b"v", p.now)
    for _ in range(5):
        a.put("n1", "keep", b"v", p.now)  # push the old clock well above a fresh one
    a.put("n1", "keep", b"v", p.now)
    p.tick(1.0)
    p.events("b")
    # A fresh process with the same name: no clock, no state, re-puts only "keep".
    a2 = p.dbs["a"] = NetworkDB("a", random.Random(7), p.now, CFG)
    for n in "bc":
        a2.on_member("join", n, p.now)
    a2.join_network("n1", p.now)
    a2.put("n1", "keep", b"v", p.now)
    p.pump()
    p.tick(2.0)
    for n in "abc":
        assert p.dbs[n].entries("n1") == {"keep": ("a", b"v")}, n
    assert p.events("b") == [TableEvent("delete", "n1", "gone", b"v", "a")]


# No periodic bulk sync within these tests: whatever refills a table is the join sync.
NO_PERIODIC = NetDBConfig.default(tombstone_s=60.0, failed_grace_s=120.0, bulk_sync_s=3600.0)


def _restart(p: Pool, name: str, seed: int = 7) -> NetworkDB:
    """A fresh process under the same name: no clock, no tables, no members."""
    db = p.dbs[name] = NetworkDB(name, random.Random(seed), p.now, p.config)
    return db


def _filled_pool() -> tuple[Pool, dict[str, tuple[str, bytes]]]:
    p = _pool(["a", "b", "c", "d"], config=NO_PERIODIC)
    for n in "abcd":
        p.dbs[n].put("n1", f"ep-{n}", n.encode(), p.now)
        p.dbs[n].put("n1", f"ep-{n}2", n.encode() * 2, p.now)
    p.tick(1.0)
    truth = p.dbs["b"].entries("n1")
    assert len(truth) == 8 and all(p.dbs[n].entries("n1") == truth for n in "abcd")
    return p, truth


@pytest.mark.parametrize("order", ["join_first", "members_first"])
def test_restarted_node_refills_its_table_at_once_not_at_the_periodic_sync(order: str) -> None:
    """A restarted node joins its network again: whether it knows the network's members yet
    (members_first) or learns them only afterwards (join_first), it pulls the table from
    them at once. pump() only: not a single timer runs, so no periodic sync can be it."""
    p, truth = _filled_pool()
    a = _restart(p, "a")
    if order == "join_first":
        a.join_network("n1", p.now)
        assert not a.synced("n1")
    for n in "bcd":
        a.on_member("join", n, p.now)
    p.pump()
    if order == "members_first":
        a.join_network("n1", p.now)
    a.put("n1", "ep-a", b"a", p.now)  # what the restarted node publishes again
    p.pump()
    want = {k: v for k, v in truth.items() if v[0] != "a"}
    assert {k: v for k, v in a.entries("n1").items() if v[0] != "a"} == want
    assert a.synced("n1")
    assert a.counters["initial_syncs_done"] == 1
    assert 1 <= a.counters["initial_syncs_out"] <= NO_PERIODIC.join_sync_peers
    # The others drop what a's previous life left and keep what it published again.
    p.tick(2.0)
    for n in "abcd":
        assert p.dbs[n].entries("n1").get("ep-a") == ("a", b"a"), n
        assert "ep-a2" not in p.dbs[n].entries("n1"), n


def test_restarted_node_is_answered_although_its_old_life_used_the_same_sync_ids() -> None:
    """Peers answer a (sender, network, sync id) once. A new life must not repeat its old
    life's ids, or its join sync goes unanswered (the restart's 25 s hole). Here b has no
    other reason to send a its table: a's new join record is no newer than its old one."""
    p = Pool(["a", "b"], config=NO_PERIODIC)
    p.dbs["a"].join_network("n1", p.now)
    p.pump()
    p.dbs["b"].join_network("n1", p.now)  # a, waiting for the table, asks b for it
    p.dbs["b"].put("n1", "ep-b", b"b", p.now)
    p.pump()
    assert p.dbs["a"].synced("n1")
    a = _restart(p, "a", seed=100)
    a.join_network("n1", p.now)  # before it knows anyone: the assignment came first
    a.on_member("join", "b", p.now)
    p.pump()
    assert a.synced("n1")
    assert a.entries("n1") == {"ep-b": ("b", b"b")}


def test_unanswered_join_sync_is_retried_with_other_members() -> None:
    p, truth = _filled_pool()
    a = _restart(p, "a")
    for n in "bcd":
        a.on_member("join", n, p.now)
    p.pump()  # a knows who is in n1
    p.down = {"b", "c", "d"}  # every answer is lost
    a.join_network("n1", p.now)
    p.pump()
    assert not a.synced("n1") and a.entries("n1") == {}
    retry = a.next_deadline()
    assert retry is not None and retry <= p.now + NO_PERIODIC.join_sync_retry_s + 1e-9
    p.down = set()
    p.tick(NO_PERIODIC.join_sync_retry_s + 0.2)
    assert a.synced("n1")
    assert a.counters["initial_sync_retries"] == 1
    assert {k: v for k, v in a.entries("n1").items() if v[0] != "a"} == {
        k: v for k, v in truth.items() if v[0] != "a"
    }
    # Answered: no retry timer is left (only the reap and the far periodic sync).
    assert a.next_deadline() >= p.now + 1.0  # type: ignore[operator]


def test_join_sync_asks_at_most_join_sync_peers_members() -> None:
    names = [f"m{i}" for i in range(10)]
    p = _pool(names, config=NO_PERIODIC)
    for n in names:
        p.dbs[n].put("n1", "ep-" + n, b"v", p.now)
    p.tick(1.0)
    a = _restart(p, "m0")
    for n in names[1:]:
        a.on_member("join", n, p.now)
    p.pump()
    p.sent.clear()
    a.join_network("n1", p.now)
    p.pump()
    asked = {  # m0's bulk syncs that want an answer (not its answers to others' syncs)
        d
        for src, d, pl in p.sent
        if src == "m0" and pl[0] == MSG_BULK_SYNC and msgpack.unpackb(pl[1:])[4]
    }
    assert len(asked) == NO_PERIODIC.join_sync_peers
    assert a.synced("n1") and len(a.entries("n1")) == 9


def test_gossip_goes_only_to_members_of_the_network() -> None:
    p = _pool(["a", "b", "c", "d", "e"])
    for n in "ab":
        p.dbs[n].join_network("n2", p.now)
    p.pump()
    p.tick(1.0)
    p.sent.clear()
    p.dbs["a"].put("n2", "k", b"v", p.now)
    p.tick(2.0)
    dests = {
        d
        for _, d, pl in p.sent
        if pl[0] in (MSG_TABLE_EVENTS, MSG_BULK_SYNC) and msgpack.unpackb(pl[1:])[2] == "n2"
    }
    assert "b" in dests and dests <= {"a", "b"}
    for n in "cde":
        assert "n2" not in p.dbs[n].stored_networks() and p.dbs[n].entries("n2") == {}


def test_idle_node_has_no_gossip_deadline_and_a_put_is_due_at_once() -> None:
    db = NetworkDB("a", random.Random(1), 0.0, CFG)
    db.on_member("join", "b", 0.0)
    db.join_network("n1", 0.0)
    db.receive("", _pack(MSG_NET_EVENTS, ["b"], [["b", "n1", 1, False]]), 0.0)
    assert not db.synced("n1")  # b was asked for the table (join sync)...
    db.receive("", _pack(MSG_BULK_SYNC, ["b", "n1", 1, False], [], []), 0.0)
    assert db.synced("n1")  # ...and answered: no retry timer left
    db.handle_timer(1.0)
    idle = db.next_deadline()
    assert idle is not None and idle >= 5.0 - 1e-9  # reap/bulk only, no 200 ms wake-ups
    db.put("n1", "k", b"v", 1.0)
    assert db.next_deadline() <= 1.0  # type: ignore[operator]
    db.take_outbound()
    db.handle_timer(1.0)
    assert [d for d, pl in db.take_outbound() if pl[0] == MSG_TABLE_EVENTS] == ["b"]


def test_limits_and_api_misuse() -> None:
    db = NetworkDB("a", random.Random(1), 0.0, CFG)
    with pytest.raises(NetDBError):
        db.put("n1", "k", b"v", 0.0)  # not in the network
    db.join_network("n1", 0.0)
    with pytest.raises(NetDBError):
        db.put("n1", "k", b"x" * (CFG.netdb_value_bytes_max + 1), 0.0)
    with pytest.raises(NetDBError):
        db.put("n1", "k" * (CFG.netdb_key_bytes_max + 1), b"", 0.0)
    with pytest.raises(NetDBError):
        NetDBConfig.default(fanout=0)
    many = [[f"k{i}", "b", 1, False, b""] for i in range(CFG.netdb_entries_per_message_max + 1)]
    db.receive("", _pack(MSG_TABLE_EVENTS, ["b", "n1"], many), 0.0)
    assert db.counters["drop_too_many_entries"] == 1
    db.receive("", _event("n1", "k", "b", 1, False, b"x" * 600), 0.0)
    assert db.counters["drop_bad_value"] == 1
    db.receive("", b"\xd0" + msgpack.packb([0, "b", "n1", []]), 0.0)
    assert db.counters["drop_version"] == 1
    assert db.entries("n1") == {}


def test_messages_stay_within_the_size_budget() -> None:
    p = _pool(["a", "b"])
    for i in range(300):
        p.dbs["a"].put("n1", f"endpoint-{i:04d}", b"x" * 200, p.now)
    p.tick(3.0)
    assert p.dbs["b"].entries("n1") == p.dbs["a"].entries("n1")
    assert max(len(pl) for _, _, pl in p.sent) <= CFG.netdb_message_bytes_max


_ENTRY = st.lists(
    st.one_of(st.text(max_size=5), st.integers(-2, 2**63), st.booleans(), st.binary(max_size=8)),
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from([0xD0, 0xD1, 0xD2, 0xD3, 0x01]),
    body=st.one_of(
        st.binary(max_size=64),
        st.lists(
            st.one_of(
                st.integers(-1, 3),
                st.text(max_size=4),
                st.booleans(),
                st.lists(_ENTRY, max_size=3),
                st.lists(st.lists(st.text(max_size=3), max_size=4), max_size=3),
            ),
            max_size=8,
        ).map(lambda x: msgpack.packb(x, use_bin_type=True)),
    ),
)
def test_fuzz_receive_never_raises(kind: int, body: bytes) -> None:
    db = NetworkDB("a", random.Random(1), 0.0, CFG)
    db.on_member("join", "b", 0.0)
    db.join_network("n1", 0.0)
    before = sum(db.counters.values())
    db.receive("", bytes([kind]) + body, 1.0)
    db.handle_timer(100.0)
    assert sum(db.counters.values()) > before  # counted: either handled or dropped
