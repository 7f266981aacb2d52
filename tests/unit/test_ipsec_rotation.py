"""Key rotation (swarmnet.ipsec.rotation): sequences, triggers, and a model check that no
node ever sends with a key that a peer has not installed inbound, whatever the order in
which key sets and acknowledgements are delivered."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.ipsec import rotation as r
from swarmnet.ipsec.keys import Key, KeySet

H = 3600.0


def key(i: int, t: float = 0.0) -> Key:
    return Key(i, bytes([i % 256]) * 16, t)


def drive(rot: r.KeyRotation, outs: list[r.Output], now: float) -> list[KeySet]:
    """Answer GenerateKey at once; return what was published."""
    published = []
    while outs:
        o = outs.pop(0)
        if isinstance(o, r.GenerateKey):
            outs += rot.handle(r.KeyGenerated(key(o.key_id, now)), now)
        else:
            published.append(o.keyset)
    return published


def test_time_rotation_goes_through_three_phases_gated_by_acks() -> None:
    rot = r.KeyRotation.bootstrap(key(1), 0.0, r.RotationConfig(grace_s=10))
    for n in ("h1", "h2"):
        rot.handle(r.NodeJoined(n), 0.0)
    assert drive(rot, rot.handle(r.Tick(), 11 * H), 11 * H) == []
    (ks,) = drive(rot, rot.handle(r.Tick(), 12 * H), 12 * H)
    assert ks.ids == {1, 2} and ks.primary == 1 and rot.phase == r.INSTALLING
    assert rot.handle(r.Applied("h1", ks.version), 12 * H) == []  # h2 has not installed yet
    (ks,) = drive(rot, rot.handle(r.Applied("h2", ks.version), 12 * H), 12 * H)
    assert ks.ids == {1, 2} and ks.primary == 2 and rot.phase == r.SWITCHING
    for n in ("h1", "h2"):
        rot.handle(r.Applied(n, ks.version), 12 * H)
    assert rot.handle(r.Tick(), 12 * H + 5) == []  # grace not over
    (ks,) = drive(rot, rot.handle(r.Tick(), 12 * H + 10), 12 * H + 10)
    assert ks.ids == {2} and rot.phase == r.STEADY and ks.version == 4
    # next rotation is 12 h after the new key's creation
    assert drive(rot, rot.handle(r.Tick(), 23 * H), 23 * H) == []


def test_packet_counter_and_force_trigger_only_once_per_rotation() -> None:
    rot = r.KeyRotation.bootstrap(key(1), 0.0, r.RotationConfig(threshold_packets=100))
    rot.handle(r.NodeJoined("h1"), 0.0)
    assert rot.handle(r.Counters("h1", 1, 99), 1.0) == []
    outs = rot.handle(r.Counters("h1", 1, 100), 1.0)
    assert outs == [r.GenerateKey(2)] and "packets" in rot.reason
    assert rot.handle(r.Counters("h1", 1, 500), 1.0) == []  # already pending
    assert rot.handle(r.ForceRotate(), 1.0) == []
    drive(rot, outs, 1.0)
    assert rot.phase == r.INSTALLING
    assert rot.handle(r.Counters("h1", 2, 10**9), 1.0) == []  # not the primary: ignored


def test_a_node_leaving_unblocks_and_one_joining_must_ack() -> None:
    rot = r.KeyRotation.bootstrap(key(1), 0.0, r.RotationConfig(grace_s=0))
    rot.handle(r.NodeJoined("h1"), 0.0)
    rot.handle(r.NodeJoined("dead"), 0.0)
    (ks,) = drive(rot, rot.handle(r.ForceRotate(), 1.0), 1.0)
    assert rot.handle(r.Applied("h1", ks.version), 1.0) == []
    (ks2,) = drive(rot, rot.handle(r.NodeLeft("dead"), 2.0), 2.0)
    assert ks2.primary == 2
    rot.handle(r.NodeJoined("new"), 2.0)
    rot.handle(r.Applied("h1", ks2.version), 2.0)
    assert rot.handle(r.Tick(), 3.0) == []  # "new" has not applied anything
    (ks3,) = drive(rot, rot.handle(r.Applied("new", ks2.version), 3.0), 3.0)
    assert ks3.ids == {2}


def test_node_keys_ignores_old_deliveries() -> None:
    nk = r.NodeKeys()
    a, b = KeySet(1, (key(1),), 1), KeySet(2, (key(1), key(2)), 1)
    assert nk.offer(b) and not nk.offer(a) and not nk.offer(b)
    assert nk.done("h1", 2) == r.Applied("h1", 2) and nk.done("h1", 1) is None


# ---- model check ---------------------------------------------------------------------


class Model:
    """Manager + nodes + two unordered networks (key sets to nodes, acks to the manager)."""

    def __init__(self, nodes: list[str]) -> None:
        self.now = 0.0
        self.rot = r.KeyRotation.bootstrap(key(1), 0.0, r.RotationConfig(
            interval_s=100.0, grace_s=3.0, threshold_packets=50))  # fmt: skip
        self.nodes: dict[str, r.NodeKeys] = {}
        self.to_nodes: list[tuple[str, KeySet]] = []
        self.to_mgr: list[r.Applied] = []
        self.sent: dict[str, int] = {}
        for n in nodes:
            self.join(n)

    def join(self, n: str) -> None:
        self.nodes[n] = r.NodeKeys()
        self.feed(r.NodeJoined(n))
        self.to_nodes.append((n, self.rot.keyset))  # a joining node gets the current set

    def feed(self, ev: r.Event) -> None:
        outs = self.rot.handle(ev, self.now)
        while outs:
            o = outs.pop(0)
            if isinstance(o, r.GenerateKey):
                outs += self.rot.handle(r.KeyGenerated(key(o.key_id, self.now)), self.now)
            else:
                self.to_nodes += [(n, o.keyset) for n in self.nodes]

    def deliver_to_node(self, i: int) -> None:
        n, ks = self.to_nodes.pop(i % len(self.to_nodes))
        nk = self.nodes.get(n)
        if nk is not None and nk.offer(ks):
            ack = nk.done(n, ks.version)  # programmed (plan.diff: add, switch, remove)
            if ack:
                self.to_mgr.append(ack)

    def check(self) -> None:
        applied = {n: nk.received for n, nk in self.nodes.items() if nk.applied}
        for a, ka in applied.items():
            for b, kb in applied.items():
                if a != b:
                    assert ka.primary in kb.ids, (a, ka, b, kb)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_model_no_node_sends_with_a_key_a_peer_lacks(data) -> None:
    m = Model(["h1", "h2", "h3"])
    extra = 0
    rotations_seen = set()
    for _ in range(data.draw(st.integers(10, 120))):
        choice = data.draw(st.sampled_from(
            ["node", "node", "node", "mgr", "mgr", "tick", "force", "count", "join", "leave"]))  # fmt: skip
        if choice == "node" and m.to_nodes:
            m.deliver_to_node(data.draw(st.integers(0, 1000)))
        elif choice == "mgr" and m.to_mgr:
            m.feed(m.to_mgr.pop(data.draw(st.integers(0, 1000)) % len(m.to_mgr)))
        elif choice == "tick":
            m.now += data.draw(st.sampled_from([0.5, 2.0, 50.0]))
            m.feed(r.Tick())
        elif choice == "force":
            m.feed(r.ForceRotate())
        elif choice == "count":
            m.feed(r.Counters("h1", m.rot.keyset.primary, data.draw(st.integers(0, 100))))
        elif choice == "join" and extra < 2:
            extra += 1
            m.join(f"x{extra}")
        elif choice == "leave" and len(m.nodes) > 2:
            n = data.draw(st.sampled_from(sorted(m.nodes)))
            del m.nodes[n]
            m.feed(r.NodeLeft(n))
        m.check()
        rotations_seen.add(m.rot.keyset.primary)
    # liveness: once everything is delivered, rotation completes
    for _ in range(50):
        while m.to_nodes:
            m.deliver_to_node(0)
            m.check()
        while m.to_mgr:
            m.feed(m.to_mgr.pop(0))
        m.now += 5.0
        m.feed(r.Tick())
        if m.rot.phase == r.STEADY and not m.to_nodes and not m.to_mgr:
            break
    assert m.rot.phase == r.STEADY and len(m.rot.keyset.keys) == 1
    assert all(nk.applied == m.rot.keyset.version for nk in m.nodes.values())


def test_model_detects_an_unsafe_schedule() -> None:
    """The check can fail: switching before every node installed the key is caught."""
    m = Model(["h1", "h2"])
    k2 = key(2)
    m.nodes["h1"].offer(KeySet(1, (key(1),), 1)), m.nodes["h1"].done("h1", 1)
    m.nodes["h2"].offer(KeySet(1, (key(1),), 1)), m.nodes["h2"].done("h2", 1)
    m.nodes["h1"].offer(KeySet(3, (key(1), k2), 2)), m.nodes["h1"].done("h1", 3)
    try:
        m.check()
    except AssertionError:
        return
    raise AssertionError("the invariant check did not fire")
