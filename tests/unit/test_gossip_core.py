"""The SWIM core (swarmnet/gossip/core.py) and its pure parts, driven by hand.

aioquic style: cores are wired with a manual clock, a packet is lost by not delivering it,
and deadlines are asserted exactly. The pure functions (suspicion time, retransmit limit,
awareness, broadcast packing, config validation) are table-tested on their own.
"""

from __future__ import annotations

import ast
import heapq
import itertools
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmnet.gossip import wire
from swarmnet.gossip.awareness import Awareness
from swarmnet.gossip.broadcast import BroadcastQueue, message_size_bytes
from swarmnet.gossip.config import (
    ConfigError,
    GossipConfig,
    push_pull_scale,
    retransmit_limit,
    suspicion_timeout_s,
)
from swarmnet.gossip.core import Datagram, MemberEvent, Membership, StreamPing, StreamRequest
from swarmnet.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Nack,
    NodeState,
    Ping,
    Suspect,
    User,
)
from swarmnet.gossip.suspicion import Suspicion, remaining_suspicion_s

GOSSIP_DIR = Path(__file__).resolve().parents[2] / "swarmnet" / "gossip"

# ---- pure functions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "min_s", "max_s", "want"),
    [
        (0, 3, 0.0, 2.0, 30.0, 30.0),  # no confirmation: the full max
        (1, 3, 2.0, 2.0, 30.0, 14.0),  # 30 - log2/log4 * 28 = 16, minus 2 elapsed
        (2, 3, 3.0, 2.0, 30.0, 4.81),  # 30 - log3/log4 * 28 = 7.81 (floored to ms)
        (3, 3, 4.0, 2.0, 30.0, -2.0),  # k reached: min, already past
        (4, 3, 5.0, 2.0, 30.0, -3.0),  # beyond k never goes below min
        (0, 0, 1.0, 4.0, 24.0, 3.0),  # k = 0 (tiny cluster): min from the start
        (1, 2, 0.0, 4.0, 24.0, 11.381),  # LAN, 3+ nodes, one confirmation
        (2, 2, 0.0, 4.0, 24.0, 4.0),
    ],
)
def test_remaining_suspicion_time(n, k, elapsed, min_s, max_s, want):
    assert remaining_suspicion_s(n, k, elapsed, min_s, max_s) == pytest.approx(want, abs=1e-9)


def test_suspicion_confirmations_shrink_the_deadline_once_per_peer():
    s = Suspicion("a", k=2, min_s=4.0, max_s=24.0, start_s=100.0)
    assert s.deadline_s == 124.0
    assert not s.confirm("a", 101.0)  # the first accuser is not a confirmation
    assert s.confirm("b", 101.0)
    assert s.deadline_s == pytest.approx(111.381)
    assert not s.confirm("b", 102.0)  # the same peer twice counts once
    assert s.confirm("c", 102.0)
    assert s.deadline_s == pytest.approx(104.0)
    assert not s.confirm("d", 103.0)  # k reached: nothing more to gain
    assert Suspicion("a", k=0, min_s=4.0, max_s=24.0, start_s=0.0).deadline_s == 4.0


@pytest.mark.parametrize(
    ("mult", "n", "interval", "want"),
    [
        (4, 1, 1.0, 4.0),
        (4, 2, 1.0, 4.0),
        (4, 10, 1.0, 4.0),
        (4, 100, 1.0, 8.0),
        (4, 1000, 1.0, 12.0),
    ],
)
def test_suspicion_timeout(mult, n, interval, want):
    assert suspicion_timeout_s(mult, n, interval) == pytest.approx(want)


@pytest.mark.parametrize(
    ("n", "want"), [(1, 4), (9, 4), (10, 8), (99, 8), (100, 12), (999, 12), (1000, 16)]
)
def test_retransmit_limit(n, want):
    assert retransmit_limit(4, n) == want


def test_push_pull_scale():
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 33) == 60.0
    assert push_pull_scale(30.0, 1000) == 180.0  # ceil(log2(1000) - 5) + 1 = 6


def test_awareness_clamps_and_scales():
    a = Awareness(8)
    assert a.apply_delta(-1) == 0
    assert a.apply_delta(3) == 3
    assert a.scale(1.0) == 4.0
    assert a.apply_delta(100) == 7
    assert a.scale(0.5) == 4.0


def test_config_profiles_and_validation():
    lan = GossipConfig.lan()
    assert (lan.probe_interval_s, lan.probe_timeout_s, lan.indirect_checks) == (1.0, 0.5, 3)
    assert (lan.suspicion_mult, lan.suspicion_max_timeout_mult, lan.retransmit_mult) == (4, 6, 4)
    assert (lan.gossip_interval_s, lan.gossip_nodes, lan.push_pull_interval_s) == (0.2, 3, 30.0)
    assert (lan.awareness_max_multiplier, lan.gossip_to_the_dead_s) == (8, 30.0)
    assert (lan.packet_bytes_max, lan.bind_port) == (1400, 7946)
    assert GossipConfig.wan().probe_interval_s == 5.0
    assert GossipConfig.local().probe_timeout_s == 0.2
    with pytest.raises(ConfigError, match="probe timeout must be < probe interval"):
        GossipConfig.lan(probe_timeout_s=1.0)
    with pytest.raises(ConfigError):
        GossipConfig.lan(packet_bytes_max=200)


# ---- broadcast queue --------------------------------------------------------------------


def alive(node: str, inc: int = 1, meta: bytes = b"") -> Alive:
    return Alive(inc, node, bytes([10, 0, 0, 1]), 7946, meta, wire.DEFAULT_VSN)


def test_broadcast_invalidated_by_name_and_limited_by_retransmits():
    q = BroadcastQueue(retransmit_mult=1, queue_max=100)
    q.queue(alive("a", 1), "a")
    q.queue(alive("a", 2), "a")  # replaces the older news about "a"
    q.queue(User(b"u1"))
    q.queue(User(b"u1"))  # unnamed: both stay
    assert [m.incarnation for m in q.pending() if isinstance(m, Alive)] == [2]
    assert len(q) == 3
    # n = 5 nodes: the limit is 1 * ceil(log10(6)) = 1 transmission each.
    assert len(q.take(2, 1400, 5)) == 3
    assert len(q) == 0 and q.take(2, 1400, 5) == []


def test_broadcast_packing_respects_the_budget_and_prefers_fresh_items():
    q = BroadcastQueue(retransmit_mult=4, queue_max=100)
    for i in range(40):
        q.queue(alive(f"node-{i:02d}"), f"node-{i:02d}")
    size = message_size_bytes(alive("node-00"))
    first = q.take(2, 10 * (size + 2), 40)
    assert len(first) == 10  # exactly what fits
    second = q.take(2, 10 * (size + 2), 40)
    assert not set(m.node for m in first) & set(m.node for m in second)  # untransmitted first
    done = []
    q.queue(User(b"x" * 2000), on_done=lambda: done.append(1))
    assert User(b"x" * 2000) not in q.take(2, 1400, 40)  # never fits: skipped, not sent
    q.clear()
    assert done == [1] and len(q) == 0


def test_broadcast_queue_max_drops_the_most_transmitted():
    q = BroadcastQueue(retransmit_mult=4, queue_max=16)
    for i in range(20):
        q.queue(User(bytes([i])))
    assert len(q) == 16 and q.dropped == 4


@pytest.mark.parametrize(
    "msg",
    [
        alive("n" * 40, 2**32 - 1, b"m" * 300),
        alive("x"),
        Suspect(2**31, "target-node", "from-node"),
        Dead(7, "a", "a"),
        Ping(2**32 - 1, "target", bytes(16), 65535, "source"),
        IndirectPing(5, bytes(4), 7946, "t", True, bytes(4), 7946, "s"),
        Ack(3),
        Ack(3, b"\x01" + b"c" * 90),
        Nack(2**32 - 1),
        User(b"payload"),
    ],
)
def test_size_estimate_never_below_the_real_encoding(msg):
    real = len(wire.encode_message(msg))
    assert real <= message_size_bytes(msg) <= real + 16


# ---- the core, wired by hand ------------------------------------------------------------


def test_core_modules_do_no_io():
    """DESIGN principle 1: no asyncio, socket, time or module-level random in the core."""
    forbidden = {"asyncio", "socket", "time", "random", "selectors", "threading"}
    for name in ("core.py", "suspicion.py", "awareness.py", "broadcast.py", "config.py"):
        tree = ast.parse((GOSSIP_DIR / name).read_text())
        for node in tree.body:  # module level only: TYPE_CHECKING imports sit in an `if`
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not mods & forbidden, (name, mods & forbidden)


def exact_cfg() -> GossipConfig:
    """LAN timing with gossip and push-pull out of the way, so that the only timers are the
    probe's: deadlines can then be asserted exactly."""
    return GossipConfig.lan(gossip_interval_s=1000.0, push_pull_interval_s=0.0)


def make(name: str, last_octet: int, seed: int, cfg: GossipConfig | None = None) -> Membership:
    return Membership(
        name, f"198.51.100.{last_octet}", 7946, cfg or GossipConfig.lan(), random.Random(seed), 0.0
    )


def join_by_hand(a: Membership, b: Membership, now: float) -> None:
    """a joins b: the push-pull a driver would carry over TCP."""
    a.join([b.address], now)
    (req,) = a.take_outbound()
    assert isinstance(req, StreamRequest) and req.addr == b.address and req.push_pull.join
    reply = b.push_pull_response(req.push_pull, now)
    a.merge_remote_state(reply.states, reply.join, now)


class Wires:
    """A tiny hand-driven network: fixed delay, drop by predicate, events recorded."""

    def __init__(self, *cores: Membership, delay_s: float = 0.001):
        self.cores = {c.address: c for c in cores}
        self.delay_s = delay_s
        self.now = 0.0
        self.drop: Callable[[Membership, Membership, Datagram], bool] = lambda s, d, g: False
        self.down: set[str] = set()
        self.events: list[tuple[float, str, MemberEvent]] = []
        self._flight: list[tuple[float, int, Membership, tuple, tuple]] = []
        self._seq = itertools.count()
        for c in cores:
            self.flush(c)

    def flush(self, c: Membership) -> None:
        for out in c.take_outbound():
            dest = self.cores.get(out.addr)
            if dest is None or dest.name in self.down:
                continue
            if isinstance(out, StreamRequest):
                reply = dest.push_pull_response(out.push_pull, self.now)
                self.flush(dest)
                c.merge_remote_state(reply.states, reply.join, self.now)
            elif isinstance(out, StreamPing):
                # TCP: the drop predicate models a dead path, so it fails TCP too.
                ack = dest.stream_ping_response(out.ping)
                if ack is not None and not self.drop(c, dest, Datagram(out.addr, (out.ping,))):
                    t = self.now + 2 * self.delay_s
                    heapq.heappush(self._flight, (t, next(self._seq), c, dest.address, (ack,)))
            elif not self.drop(c, dest, out):
                t = self.now + self.delay_s
                heapq.heappush(self._flight, (t, next(self._seq), dest, c.address, out.messages))
        self.events += [(self.now, c.name, ev) for ev in c.take_events()]

    def run_until(self, t_end: float) -> None:
        while True:
            live = [c for c in self.cores.values() if c.name not in self.down]
            timers = [(c.next_deadline(), i) for i, c in enumerate(live)]
            timers = [(t, i) for t, i in timers if t is not None]
            t_timer = min(timers)[0] if timers else math.inf
            t_pkt = self._flight[0][0] if self._flight else math.inf
            t = min(t_timer, t_pkt)
            if t > t_end:
                self.now = t_end
                return
            self.now = t
            if t_pkt <= t_timer:
                _, _, dest, src, msgs = heapq.heappop(self._flight)
                if dest.name not in self.down:
                    dest.receive(src, msgs, t)
                    self.flush(dest)
            else:
                c = live[min(timers)[1]]
                c.handle_timer(t)
                self.flush(c)
            self.flush_all()

    def flush_all(self) -> None:
        for c in self.cores.values():
            if c.name not in self.down:
                self.flush(c)

    def kinds(self, observer: str, about: str) -> list[str]:
        return [e.kind for _, who, e in self.events if who == observer and e.name == about]


def test_join_by_push_pull_reports_both_sides():
    a, b = make("a", 1, 1), make("b", 2, 2)
    join_by_hand(a, b, 0.0)
    assert [e.kind for e in a.take_events() if e.name == "b"] == ["join"]
    assert [e.kind for e in b.take_events() if e.name == "a"] == ["join"]
    for c in (a, b):
        assert sorted((m.name, m.state) for m in c.members()) == [
            ("a", NodeState.ALIVE),
            ("b", NodeState.ALIVE),
        ]


def test_silent_member_fails_at_exact_lifeguard_deadlines():
    """Two nodes: b never answers. Ping at t, indirect phase at t + 0.5 (nobody to ask),
    suspect at t + 1.0 (probe interval), dead at + 4.0 (k = 0 below 3 nodes, min = 4 s)."""
    a, b = make("a", 1, 1, exact_cfg()), make("b", 2, 2, exact_cfg())
    join_by_hand(a, b, 0.0)
    a.take_outbound()
    a.take_events()
    t = a.next_deadline()
    assert t is not None and 0.0 <= t < 1.0  # random stagger within one probe interval
    a.handle_timer(t)
    (dg,) = a.take_outbound()  # lost: never delivered
    ping = dg.messages[0]
    assert dg.addr == b.address and isinstance(ping, Ping) and ping.node == "b"
    assert a.next_deadline() == pytest.approx(t + 0.5)
    a.handle_timer(t + 0.5)
    # No third member to ask for an indirect probe; only the TCP fallback, due by the end of
    # the probe interval (it is lost too: never answered).
    (fallback,) = a.take_outbound()
    assert isinstance(fallback, StreamPing) and fallback.addr == b.address
    assert fallback.deadline_s == pytest.approx(t + 1.0) and fallback.ping.seq_no == ping.seq_no
    assert a.next_deadline() == pytest.approx(t + 1.0)
    a.handle_timer(t + 1.0)
    assert a.member("b").state == NodeState.SUSPECT
    assert a.health_score == 1  # a failed probe without nacks counts against ourselves
    assert a.counters["suspects"] == 1
    # The next probe goes to the suspect with the accusation, so it can refute.
    (dg,) = a.take_outbound()
    assert [type(m) for m in dg.messages][:2] == [Ping, Suspect]
    # Dead exactly min = 4 s after suspicion (no failed event before).
    while (d := a.next_deadline()) < t + 5.0 - 1e-9:
        a.handle_timer(d)
        assert not [e for e in a.take_events() if e.kind == "failed"]
    assert d == pytest.approx(t + 5.0)
    a.handle_timer(d)
    assert [e.kind for e in a.take_events()] == ["failed"]
    assert a.member("b").state == NodeState.DEAD


def test_suspected_member_refutes_with_a_higher_incarnation():
    a, b = make("a", 1, 1), make("b", 2, 2)
    join_by_hand(a, b, 0.0)
    b.take_outbound()
    b.receive(a.address, [Suspect(1, "b", "a")], 1.0)
    assert b.incarnation == 2 and b.health_score == 1 and b.counters["refutes"] == 1
    b.send_user(a.address, b"hello")  # any datagram carries the refutation
    (dg,) = b.take_outbound()
    refute = [m for m in dg.messages if isinstance(m, Alive) and m.node == "b"]
    assert refute == [Alive(2, "b", b._addr_bytes, 7946, b"", wire.DEFAULT_VSN)]
    a.receive(b.address, [Suspect(1, "b", "a")], 1.0)
    assert a.member("b").state == NodeState.SUSPECT
    a.receive(b.address, dg.messages, 1.1)
    assert a.member("b").state == NodeState.ALIVE and a.member("b").incarnation == 2
    assert [e.payload for e in a.take_events() if e.kind == "user"] == [b"hello"]
    # The suspicion timer (due at 1.0 + 4 s) is gone. (Later, a's own probes of b, which we
    # do not deliver, start a new suspicion; it cannot expire before 1.0 + 1 + 4 s.)
    while (d := a.next_deadline()) <= 5.5:
        a.handle_timer(d)
    assert not [e for e in a.take_events() if e.kind == "failed"]
    # A dead message about ourselves is refuted too, and a stale one is ignored.
    b.receive(a.address, [Dead(2, "b", "a")], 2.0)
    assert b.incarnation == 3 and b.member("b").state == NodeState.ALIVE
    b.receive(a.address, [Dead(1, "b", "a")], 2.0)
    assert b.incarnation == 3


def three(seed: int = 7) -> tuple[Wires, Membership, Membership, Membership]:
    a, b, c = make("a", 1, seed), make("b", 2, seed + 1), make("c", 3, seed + 2)
    join_by_hand(b, a, 0.0)
    join_by_hand(c, a, 0.0)
    return Wires(a, b, c), a, b, c


def test_indirect_probe_rescues_a_member_behind_one_bad_path():
    w, a, b, c = three()
    w.run_until(5.0)  # gossip spreads the full membership
    assert all(len(x.members()) == 3 for x in (a, b, c))
    # Every datagram between a and b is lost, in both directions; c's paths work.
    w.drop = lambda s, d, g: {s.name, d.name} == {"a", "b"}
    w.run_until(60.0)
    assert a.counters["indirect_probes"] > 0 and c.counters["indirect_pings_relayed"] > 0
    assert a.member("b").state == NodeState.ALIVE and b.member("a").state == NodeState.ALIVE
    assert not [e for _, _, e in w.events if e.kind == "failed"]
    # Nacks arrived for nothing (c reached b), and acks came back: a stays healthy.
    assert a.health_score <= 1


def test_dead_member_detected_by_all_with_nacks_keeping_prober_healthy():
    w, a, b, c = three(11)
    w.run_until(5.0)
    w.down.add("b")
    t_kill = w.now
    w.run_until(t_kill + 60.0)
    # min = 4 s, max = 24 s at 3 nodes (k = 1); a probe round is 2 members.
    bound_s = 2 * 1.0 + 1.0 + 24.0 + 1.0
    for who in ("a", "c"):
        fails = [t for t, o, e in w.events if o == who and e.name == "b" and e.kind == "failed"]
        assert len(fails) == 1 and fails[0] - t_kill <= bound_s
    # The live peer sent nacks, so the probers did not blame themselves.
    assert a.counters.get("probe_failures", 0) > 0
    assert a.health_score == 0 and c.health_score == 0


def test_isolated_prober_blames_itself_when_nacks_do_not_come():
    w, a, b, c = three(3)
    w.run_until(5.0)
    w.drop = lambda s, d, g: "a" in (s.name, d.name)  # a is cut off from everyone
    w.run_until(12.0)
    assert a.health_score >= 2  # each failed probe: +1 per missing nack


def test_graceful_leave_is_a_leave_not_a_failure():
    w, a, b, c = three(5)
    w.run_until(5.0)
    b.leave(w.now)
    w.flush(b)
    w.run_until(w.now + 5.0)
    assert b.leave_complete
    assert w.kinds("a", "b")[-1] == "leave" and w.kinds("c", "b")[-1] == "leave"
    assert a.member("b").state == NodeState.LEFT
    w.down.add("b")
    w.run_until(w.now + 60.0)
    assert "failed" not in w.kinds("a", "b") + w.kinds("c", "b")
    # Forgotten after gossip_to_the_dead_s, at the next wrap of the probe list.
    assert a.member("b") is None


def test_user_broadcast_reaches_every_member_and_meta_update_is_an_update():
    w, a, b, c = three(9)
    w.run_until(2.0)
    a.broadcast_user(b"\x02event")
    c.update_meta(b"tags", w.now)
    w.flush_all()
    w.run_until(4.0)
    for who in ("b", "c"):
        assert [e.payload for _, o, e in w.events if o == who and e.kind == "user"][:1] == [
            b"\x02event"
        ]
    assert "update" in w.kinds("a", "c") and a.member("c").meta == b"tags"


def test_ping_for_another_name_is_ignored_and_counted():
    a = make("a", 1, 1)
    a.take_outbound()
    a.receive(("198.51.100.9", 7946), [Ping(5, "zzz")], 0.0)
    assert a.take_outbound() == [] and a.counters["drop_ping_wrong_node"] == 1
    a.receive(("198.51.100.9", 7946), [Ping(6, "", bytes([198, 51, 100, 8]), 8000, "x")], 0.0)
    (dg,) = a.take_outbound()
    assert dg.addr == ("198.51.100.8", 8000) and dg.messages[0] == Ack(6)
