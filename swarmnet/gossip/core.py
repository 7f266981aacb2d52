"""The SWIM membership core with Lifeguard, as a pure state machine (DESIGN principle 1).

Rules of this file:

1. No I/O and no clock: inputs are API calls, ``receive(src, msgs, now)`` and
   ``handle_timer(now)``; outputs are collected and taken with ``take_outbound()`` (datagrams
   of message objects, stream requests for push-pull) and ``take_events()``. The driver
   encodes, sends and re-arms one timer at ``next_deadline()``; the simulator does the same
   under a virtual clock. Randomness comes only from the injected ``rng``.
2. The protocol is memberlist's (``state.go``): a round-robin probe over a shuffled member
   list, direct ping, indirect ping via ``indirect_checks`` members with nacks, suspicion
   with Lifeguard's shrinking timeout, refutation by incarnation, dead/left, gossip of a
   transmit-limited broadcast queue piggybacked on every datagram, and periodic push-pull.
3. Timers live in one heap of ``(deadline, seq, kind, key, gen)``; a timer is cancelled or
   moved by bumping its generation, so stale heap entries are skipped, never searched for.
4. Where we differ from memberlist 0.2.2 (nothing changes on the wire), each found by the
   simulator turning 10% random loss into false deaths, and marked at the code:
   a suspicion at a higher incarnation restarts the timer instead of confirming a stale one;
   push-pull never counts as an independent confirmation; a stale accusation about us is
   answered by re-announcing our alive; in a [ping, suspect] packet the suspect is handled
   first so the refutation rides on the ack; an unconfirmed suspicion gets one last direct
   probe before it turns into a death. From Serf, not memberlist: reconnect attempts to
   failed members, so that a healed partition merges back.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from swarmnet.gossip.awareness import Awareness
from swarmnet.gossip.broadcast import (
    COMPOUND_HEADER_OVERHEAD_BYTES,
    COMPOUND_PART_OVERHEAD_BYTES,
    BroadcastQueue,
    message_size_bytes,
)
from swarmnet.gossip.config import GossipConfig, push_pull_scale, suspicion_timeout_s
from swarmnet.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
    bytes_to_ip,
    ip_to_bytes,
)
from swarmnet.gossip.suspicion import Suspicion
from swarmnet.gossip.wire import DEFAULT_VSN

if TYPE_CHECKING:
    import random  # only the type: randomness is injected, never module-level

Addr = tuple[str, int]
EventKind = Literal["join", "leave", "failed", "update", "user"]
_NACK_MIN_PROTOCOL = 4  # peers with PMax >= 4 understand nack (memberlist state.go)


@dataclass(frozen=True, slots=True)
class Datagram:
    """Messages for one UDP packet to ``addr`` (one message, or a compound of several)."""

    addr: Addr
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Open a TCP stream to ``addr``, send ``push_pull`` (our state when it was made), read
    the peer's reply and give it to ``merge_remote_state(reply.states, join, now)``."""

    addr: Addr
    push_pull: PushPull


@dataclass(frozen=True, slots=True)
class StreamPing:
    """Probe ``addr`` over TCP (memberlist's fallback): connect, send ``ping``, read one Ack
    and give it to ``receive(addr, [ack], now)`` if it comes before ``deadline_s``. Failure
    needs no report: the probe simply ends without an ack. The responder side answers with
    ``stream_ping_response(ping)``."""

    addr: Addr
    ping: Ping
    deadline_s: float


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """join/leave/failed/update of member ``name``; "user" carries a user message payload
    (``name`` is empty: memberlist user messages do not say who sent them)."""

    kind: EventKind
    name: str
    addr: Addr | None
    meta: bytes = b""
    payload: bytes = b""


@dataclass(slots=True)
class Member:
    """What we know of one member (ours to mutate; callers get copies from ``members()``)."""

    name: str
    addr: bytes
    port: int
    meta: bytes
    vsn: bytes
    incarnation: int
    state: NodeState
    state_change_s: float
    address: Addr  # (ip text, port), computed once

    def copy(self) -> Member:
        return Member(*(getattr(self, f) for f in self.__slots__))  # type: ignore[attr-defined]


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    start_s: float
    deadline_s: float  # start + probe interval scaled by our health at the start
    acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    indirect_sent: bool = False


@dataclass(slots=True)
class _Relay:
    """An indirect ping we run for ``requester``: answer its ``seq`` with ack (or nack)."""

    requester: Addr
    seq: int
    nack: bool


_ip_cache: dict[bytes, str] = {}


def _ip_text(raw: bytes) -> str:
    ip = _ip_cache.get(raw)
    if ip is None:
        if len(_ip_cache) > 65536:
            _ip_cache.clear()
        ip = _ip_cache[raw] = bytes_to_ip(raw)
    return ip


class Membership:
    """One gossip member: ``name`` at ``addr:port``. See the module docstring."""

    def __init__(
        self,
        name: str,
        addr: str,
        port: int,
        config: GossipConfig,
        rng: random.Random,
        now: float,
        meta: bytes = b"",
        vsn: bytes = DEFAULT_VSN,
    ):
        self.name = name
        self.config = config.validate()
        self.rng = rng
        self.address: Addr = (addr, port)
        self._addr_bytes = ip_to_bytes(addr)
        self._vsn = vsn
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue(config.retransmit_mult, config.broadcast_queue_max)
        self.user_broadcasts = BroadcastQueue(config.retransmit_mult, config.broadcast_queue_max)
        self.counters: dict[str, int] = {}
        self._nodes: dict[str, Member] = {}
        self._state_cache: tuple[PushNodeState, ...] | None = None  # None: members changed
        self._probe_list: list[Member] = []  # shuffled; new members at random offsets
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._probe_due = False  # a probe tick came while a probe was still running
        self._acks: dict[int, _Probe | _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._failed: dict[str, tuple[Addr, float]] = {}  # for Serf-style reconnects
        self._seq = itertools.count(1)
        self._leaving = False
        self._leave_done = False
        self._outbound: list[Datagram | StreamRequest | StreamPing] = []
        self._events: list[MemberEvent] = []
        self._timers: list[tuple[float, int, str, object, int]] = []
        self._timer_gen: dict[tuple[str, object], int] = {}
        self._timer_seq = itertools.count()
        self._incarnation = 1
        self._alive_node(Alive(1, name, self._addr_bytes, port, meta, vsn), now, bootstrap=True)
        # Random stagger, as memberlist's triggerFunc does, so that members started together
        # do not probe and gossip in lockstep.
        self._set_timer("probe", None, now + rng.random() * config.probe_interval_s)
        self._set_timer("gossip", None, now + rng.random() * config.gossip_interval_s)
        if config.push_pull_interval_s > 0:
            self._set_timer("push_pull", None, now + rng.random() * config.push_pull_interval_s)
        if config.reconnect_interval_s > 0:
            self._set_timer("reconnect", None, now + rng.random() * config.reconnect_interval_s)

    # ---- the driver's interface -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Absolute time of the earliest pending timer (None if there is none)."""
        timers, gens = self._timers, self._timer_gen
        while timers:
            _, _, kind, key, gen = timers[0]
            if gens.get((kind, key)) == gen:
                return timers[0][0]
            heapq.heappop(timers)
        return None

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now``."""
        timers, gens = self._timers, self._timer_gen
        while timers and timers[0][0] <= now:
            _, _, kind, key, gen = heapq.heappop(timers)
            if gens.get((kind, key)) != gen:
                continue
            del gens[(kind, key)]
            getattr(self, "_on_" + kind)(key, now)

    def take_outbound(self) -> list[Datagram | StreamRequest | StreamPing]:
        out, self._outbound = self._outbound, []
        return out

    def take_events(self) -> list[MemberEvent]:
        out, self._events = self._events, []
        return out

    def receive(self, src: Addr, msgs: list[Message] | tuple[Message, ...], now: float) -> None:
        """Handle the messages of one datagram from ``src`` (already decoded)."""
        self._count("packets_in")
        if len(msgs) > 1 and isinstance(msgs[0], Ping):
            # memberlist's probe of a suspect is [ping, suspect]. Take the accusation first,
            # so that our refutation rides on the ack to the prober (Lifeguard's buddy
            # system) instead of waiting for random gossip to reach it.
            msgs = [*msgs[1:], msgs[0]]
        for msg in msgs:
            handler = _HANDLERS.get(type(msg))
            if handler is None:
                self._count("drop_unexpected_" + type(msg).__name__.lower())
                continue
            handler(self, src, msg, now)

    # ---- API ------------------------------------------------------------------------------

    def join(self, addrs: list[Addr], now: float) -> None:
        """Start a join push-pull with each address (the driver reports the replies)."""
        state = self.push_pull_state(join=True)
        for addr in addrs:
            self._outbound.append(StreamRequest(addr, state))

    def push_pull_state(self, join: bool = False) -> PushPull:
        """Our full state, every member in every state (what memberlist sends)."""
        if self._state_cache is None:
            self._state_cache = tuple(
                PushNodeState(m.name, m.addr, m.port, m.meta, m.incarnation, m.state, m.vsn)
                for m in self._nodes.values()
            )
        return PushPull(join=join, states=self._state_cache)

    def stream_ping_response(self, ping: Ping) -> Ack | None:
        """The answer to a ping that came over TCP (None: it names another member)."""
        if ping.node and ping.node != self.name:
            self._count("drop_ping_wrong_node")
            return None
        return Ack(ping.seq_no)

    def push_pull_response(self, remote: PushPull, now: float) -> PushPull:
        """The responder's side of a stream: our state (taken before merging, as memberlist
        replies first), then merge the initiator's."""
        reply = self.push_pull_state(join=remote.join)
        self.merge_remote_state(remote.states, remote.join, now)
        return reply

    def merge_remote_state(self, states: tuple[PushNodeState, ...], join: bool, now: float) -> None:
        """Merge a peer's push-pull states (memberlist ``mergeState``): alive is an alive
        message, left a graceful dead, and dead or suspect only a suspicion: we verify it
        ourselves rather than trust a possibly stale list."""
        self._count("push_pulls_merged")
        nodes = self._nodes
        for st in states:
            if st.state == NodeState.ALIVE:
                m = nodes.get(st.name)
                if (
                    m is not None
                    and st.incarnation <= m.incarnation
                    and st.name != self.name
                    and st.addr == m.addr
                    and st.port == m.port
                ):
                    continue  # nothing new: the common case, kept cheap for big clusters
                self._alive_node(
                    Alive(st.incarnation, st.name, st.addr, st.port, st.meta, st.vsn), now
                )
            elif st.state == NodeState.LEFT:
                self._dead_node(Dead(st.incarnation, st.name, st.name), now)
            elif st.name not in self._suspicions:
                # A push-pull is hearsay, not a probe: it may start a suspicion (memberlist),
                # but never counts as an independent Lifeguard confirmation of one we hold
                # (memberlist lets it, and the simulator showed push-pulls during a
                # suspicion faking the confirmations that shrink the timeout).
                self._suspect_node(Suspect(st.incarnation, st.name, self.name), now)

    def seed_members(self, states: list[PushNodeState], now: float) -> None:
        """Learn alive members without gossiping or reporting them: for simulations and tests
        that start from an already converged cluster."""
        for st in states:
            if st.name not in self._nodes and st.state == NodeState.ALIVE:
                self._add_member(st.name, st.addr, st.port, st.meta, st.vsn, now)
                m = self._nodes[st.name]
                m.incarnation, m.state = st.incarnation, NodeState.ALIVE
        self._state_cache = None

    def leave(self, now: float) -> None:
        """Announce a graceful leave (dead about ourselves, From = ourselves). Keep driving
        the core until ``leave_complete`` so the announcement goes out; probing stops."""
        me = self._nodes[self.name]
        self._leaving = True
        if not any(m.state == NodeState.ALIVE for m in self._nodes.values() if m is not me):
            self._leave_done = True
        self._dead_node(Dead(me.incarnation, self.name, self.name), now)
        self._cancel_timer("probe", None)
        self._cancel_timer("push_pull", None)
        self._cancel_timer("reconnect", None)

    def update_meta(self, meta: bytes, now: float) -> None:
        """New metadata (serf's tags): a new incarnation, announced as an alive."""
        me = self._nodes[self.name]
        self._incarnation += 1
        self._alive_node(
            Alive(self._incarnation, me.name, me.addr, me.port, meta, me.vsn), now, bootstrap=True
        )

    @property
    def leave_complete(self) -> bool:
        """True once our leave broadcast has been sent its full retransmit count."""
        return self._leave_done

    def broadcast_user(self, payload: bytes) -> None:
        """Gossip a user message to everyone, piggybacked like membership broadcasts."""
        self.user_broadcasts.queue(User(payload))

    def send_user(self, addr: Addr, payload: bytes) -> None:
        self._send(addr, [User(payload)])

    def members(self, include_dead: bool = False) -> list[Member]:
        """Copies of the members (alive and suspect; dead and left too if asked)."""
        return [
            m.copy()
            for m in self._nodes.values()
            if include_dead or m.state in (NodeState.ALIVE, NodeState.SUSPECT)
        ]

    def member(self, name: str) -> Member | None:
        m = self._nodes.get(name)
        return m.copy() if m else None

    @property
    def incarnation(self) -> int:
        return self._nodes[self.name].incarnation

    @property
    def health_score(self) -> int:
        return self.awareness.score

    def num_nodes(self) -> int:
        """memberlist's estNumNodes: every member we still list, dead ones included."""
        return len(self._nodes)

    # ---- timers ---------------------------------------------------------------------------

    def _set_timer(self, kind: str, key: object, deadline: float) -> None:
        gen = next(self._timer_seq)
        self._timer_gen[(kind, key)] = gen
        heapq.heappush(self._timers, (deadline, gen, kind, key, gen))

    def _cancel_timer(self, kind: str, key: object) -> None:
        self._timer_gen.pop((kind, key), None)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ---- probing (failure detection) ------------------------------------------------------

    def _on_probe(self, _key: object, now: float) -> None:
        if self._probe is not None:
            self._probe_due = True  # memberlist's ticker: the probe runs over, skip a tick
            return
        self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        self._set_timer("probe", None, now + self.config.probe_interval_s)
        target = self._next_probe_target(now)
        if target is None:
            return
        seq = next(self._seq) & 0xFFFFFFFF
        deadline = now + self.awareness.scale(self.config.probe_interval_s)
        probe = _Probe(seq, target.name, now, deadline)
        self._probe = probe
        self._acks[seq] = probe
        self._count("probes")
        msgs: list[Message] = [Ping(seq, target.name, self._addr_bytes, self.address[1], self.name)]
        if target.state != NodeState.ALIVE:
            # Tell a suspect it is suspected, so it can refute at once (memberlist does).
            msgs.append(Suspect(target.incarnation, target.name, self.name))
        self._send(target.address, msgs)
        self._set_timer("probe_indirect", seq, now + self.config.probe_timeout_s)
        self._set_timer("probe_end", seq, deadline)

    def _next_probe_target(self, now: float) -> Member | None:
        # Examine at most two lists' worth of members, so that after a wrap (which reaps and
        # reshuffles) every member is looked at once, and an all-dead list ends the search.
        for _ in range(2 * len(self._probe_list) + 1):
            if self._probe_index >= len(self._probe_list):
                self._reset_probe_list(now)
                self._probe_index = 0
                if not self._probe_list:
                    return None
            m = self._probe_list[self._probe_index]
            self._probe_index += 1
            if m.name != self.name and m.state in (NodeState.ALIVE, NodeState.SUSPECT):
                return m
        return None

    def _reset_probe_list(self, now: float) -> None:
        """At each wrap: forget members dead or left for longer than gossip_to_the_dead_s
        (their tombstones did their job) and reshuffle (memberlist ``resetNodes``)."""
        horizon = now - self.config.gossip_to_the_dead_s
        keep = []
        for m in self._probe_list:
            if m.state in (NodeState.DEAD, NodeState.LEFT) and m.state_change_s < horizon:
                del self._nodes[m.name]
                self._state_cache = None
                self._count("members_reaped")
            else:
                keep.append(m)
        self.rng.shuffle(keep)
        self._probe_list = keep

    def _on_probe_indirect(self, seq: object, now: float) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        target = self._nodes.get(probe.target)
        if target is None:
            return
        peers = self._random_members(
            self.config.indirect_checks,
            lambda m: m.state == NodeState.ALIVE and m.name not in (self.name, probe.target),
        )
        probe.indirect_sent = True
        if self.config.tcp_fallback_ping and len(target.vsn) >= 2 and target.vsn[1] >= 3:
            self._count("tcp_fallback_pings")
            ping = Ping(probe.seq, target.name, self._addr_bytes, self.address[1], self.name)
            self._outbound.append(StreamPing(target.address, ping, probe.deadline_s))
        for peer in peers:
            nack = len(peer.vsn) >= 2 and peer.vsn[1] >= _NACK_MIN_PROTOCOL
            probe.expected_nacks += nack
            self._count("indirect_probes")
            self._send(
                peer.address,
                [
                    IndirectPing(
                        probe.seq,
                        target.addr,
                        target.port,
                        target.name,
                        nack,
                        self._addr_bytes,
                        self.address[1],
                        self.name,
                    )
                ],
            )

    def _on_probe_end(self, seq: object, now: float) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq:
            return
        self._finish_probe(probe, now)

    def _finish_probe(self, probe: _Probe, now: float) -> None:
        self._probe = None
        self._acks.pop(probe.seq, None)
        self._cancel_timer("probe_indirect", probe.seq)
        self._cancel_timer("probe_end", probe.seq)
        if probe.acked:
            self.awareness.apply_delta(-1)
        else:
            # Lifeguard: nacks that never came mean the trouble is likely ours.
            if probe.expected_nacks > 0:
                self.awareness.apply_delta(max(0, probe.expected_nacks - probe.nacks))
            else:
                self.awareness.apply_delta(1)
            self._count("probe_failures")
            target = self._nodes.get(probe.target)
            if target is not None:
                self._suspect_node(Suspect(target.incarnation, target.name, self.name), now)
        if self._probe_due:
            self._probe_due = False
            self._start_probe(now)

    def _random_members(self, k: int, ok) -> list[Member]:  # noqa: ANN001 - a predicate
        """Up to ``k`` distinct members passing ``ok``, chosen at random (memberlist's
        kRandomNodes: 3n random draws at most, O(k) for a big healthy cluster)."""
        lst = self._probe_list
        n = len(lst)
        out: list[Member] = []
        seen: set[int] = set()
        for _ in range(3 * n):
            if len(out) >= k:
                break
            i = self.rng.randrange(n)
            if i in seen:
                continue
            seen.add(i)
            m = lst[i]
            if ok(m):
                out.append(m)
        return out

    # ---- gossip and push-pull -------------------------------------------------------------

    def _on_gossip(self, _key: object, now: float) -> None:
        self._set_timer("gossip", None, now + self.config.gossip_interval_s)
        if not self.broadcasts and not self.user_broadcasts:
            return
        horizon = now - self.config.gossip_to_the_dead_s
        targets = self._random_members(
            self.config.gossip_nodes,
            lambda m: (
                m.name != self.name
                and (m.state in (NodeState.ALIVE, NodeState.SUSPECT) or m.state_change_s >= horizon)
            ),
        )
        for m in targets:
            self._send(m.address, [])

    def _on_push_pull(self, _key: object, now: float) -> None:
        n = len(self._nodes)
        self._set_timer(
            "push_pull", None, now + push_pull_scale(self.config.push_pull_interval_s, n)
        )
        peers = self._random_members(
            1, lambda m: m.state == NodeState.ALIVE and m.name != self.name
        )
        if peers:
            self._count("push_pulls_started")
            self._outbound.append(StreamRequest(peers[0].address, self.push_pull_state()))

    def _on_reconnect(self, _key: object, now: float) -> None:
        """Serf's reconnect: with probability failed/alive, a join push-pull with one failed
        member, so that a healed partition merges back."""
        self._set_timer("reconnect", None, now + self.config.reconnect_interval_s)
        horizon = now - self.config.reconnect_timeout_s
        for name in [n for n, (_, since) in self._failed.items() if since < horizon]:
            del self._failed[name]
        if not self._failed:
            return
        alive = sum(1 for m in self._nodes.values() if m.state == NodeState.ALIVE)
        if self.rng.random() > len(self._failed) / max(1, alive):
            return
        names = list(self._failed)
        addr, _ = self._failed[names[self.rng.randrange(len(names))]]
        self._count("reconnect_attempts")
        self._outbound.append(StreamRequest(addr, self.push_pull_state(join=True)))

    def _send(self, addr: Addr, msgs: list[Message]) -> None:
        """Queue one datagram, filling the rest of the budget with broadcasts."""
        cfg = self.config
        avail = cfg.packet_bytes_max - cfg.packet_reserved_bytes - COMPOUND_HEADER_OVERHEAD_BYTES
        for msg in msgs:
            avail -= message_size_bytes(msg) + COMPOUND_PART_OVERHEAD_BYTES
        n = len(self._nodes)
        if self.broadcasts:
            extra = self.broadcasts.take(COMPOUND_PART_OVERHEAD_BYTES, avail, n)
            if extra:
                msgs = msgs + extra
                avail -= sum(message_size_bytes(m) + COMPOUND_PART_OVERHEAD_BYTES for m in extra)
        if self.user_broadcasts:
            msgs = msgs + self.user_broadcasts.take(COMPOUND_PART_OVERHEAD_BYTES, avail, n)
        if msgs:
            self._count("datagrams_out")
            self._outbound.append(Datagram(addr, tuple(msgs)))

    # ---- message handlers -----------------------------------------------------------------

    def _reply_addr(self, src: Addr, source_addr: bytes, source_port: int) -> Addr:
        if source_addr and source_port:
            return (_ip_text(source_addr), source_port)
        return src

    def _on_ping(self, src: Addr, msg: Ping, now: float) -> None:
        if msg.node and msg.node != self.name:
            self._count("drop_ping_wrong_node")
            return
        self._send(self._reply_addr(src, msg.source_addr, msg.source_port), [Ack(msg.seq_no)])

    def _on_indirect_ping(self, src: Addr, msg: IndirectPing, now: float) -> None:
        if len(self._acks) >= self.config.pending_acks_max:
            self._count("drop_pending_acks_max")
            return
        seq = next(self._seq) & 0xFFFFFFFF
        requester = self._reply_addr(src, msg.source_addr, msg.source_port)
        self._acks[seq] = _Relay(requester, msg.seq_no, msg.nack)
        self._count("indirect_pings_relayed")
        target = (_ip_text(msg.target), msg.port)
        self._send(target, [Ping(seq, msg.node, self._addr_bytes, self.address[1], self.name)])
        # memberlist gives a relayed probe ProbeTimeout, then nacks (if asked) and forgets.
        self._set_timer("relay", seq, now + self.config.probe_timeout_s)

    def _on_relay(self, seq: object, now: float) -> None:
        relay = self._acks.pop(seq, None)  # type: ignore[call-overload]
        if isinstance(relay, _Relay) and relay.nack:
            self._send(relay.requester, [Nack(relay.seq)])

    def _on_ack(self, src: Addr, msg: Ack, now: float) -> None:
        handler = self._acks.get(msg.seq_no)
        if handler is None:
            self._count("ack_unmatched")  # late: the probe or relay already ended
        elif isinstance(handler, _Relay):
            del self._acks[msg.seq_no]
            self._cancel_timer("relay", msg.seq_no)
            self._send(handler.requester, [Ack(handler.seq)])
        else:
            handler.acked = True
            self._finish_probe(handler, now)

    def _on_nack(self, src: Addr, msg: Nack, now: float) -> None:
        handler = self._acks.get(msg.seq_no)
        if isinstance(handler, _Probe):
            handler.nacks += 1

    def _on_suspect(self, src: Addr, msg: Suspect, now: float) -> None:
        self._suspect_node(msg, now)

    def _on_alive(self, src: Addr, msg: Alive, now: float) -> None:
        if msg.port == 0:  # memberlist: port 0 means "the receiver's bind port"
            msg = Alive(msg.incarnation, msg.node, msg.addr, self.address[1], msg.meta, msg.vsn)
        self._alive_node(msg, now)

    def _on_dead(self, src: Addr, msg: Dead, now: float) -> None:
        self._dead_node(msg, now)

    def _on_user(self, src: Addr, msg: User, now: float) -> None:
        self._count("user_in")
        self._events.append(MemberEvent("user", "", src, payload=msg.payload))

    # ---- state transitions (memberlist aliveNode / suspectNode / deadNode) ------------------

    def _add_member(
        self, name: str, addr: bytes, port: int, meta: bytes, vsn: bytes, now: float
    ) -> Member:
        # New members start Dead at incarnation 0, so the alive that created them is a
        # Dead -> Alive transition and reports a join (memberlist does the same).
        m = Member(name, addr, port, meta, vsn, 0, NodeState.DEAD, now, (_ip_text(addr), port))
        self._nodes[name] = m
        self._state_cache = None
        # Insert at a random offset so probing stays a random round robin.
        lst = self._probe_list
        lst.append(m)
        i = self.rng.randrange(len(lst))
        lst[i], lst[-1] = lst[-1], lst[i]
        return m

    def _alive_node(self, a: Alive, now: float, bootstrap: bool = False) -> None:
        is_local = a.node == self.name
        if is_local and self._leaving:
            return  # a stale alive must not undo our leave
        if len(a.vsn) >= 3 and (a.vsn[0] == 0 or a.vsn[1] == 0 or a.vsn[0] > a.vsn[1]):
            self._count("drop_alive_bad_vsn")
            return
        m = self._nodes.get(a.node)
        updates_node = False
        if m is None:
            if not a.addr or len(a.addr) not in (4, 16):
                self._count("drop_alive_bad_addr")
                return
            m = self._add_member(a.node, a.addr, a.port, a.meta, a.vsn, now)
        elif m.addr != a.addr or m.port != a.port:
            reclaim = self.config.dead_node_reclaim_s
            if m.state == NodeState.LEFT or (
                m.state == NodeState.DEAD and reclaim > 0 and now - m.state_change_s > reclaim
            ):
                updates_node = True
            else:
                self._count("alive_conflicting_address")
                return
        if a.incarnation <= m.incarnation and not is_local and not updates_node:
            return
        if a.incarnation < m.incarnation and is_local:
            return
        self._clear_suspicion(a.node)
        old_state, old_meta = m.state, m.meta
        self._state_cache = None
        if is_local and not bootstrap:
            if a.incarnation == m.incarnation and a.meta == m.meta and a.vsn == m.vsn:
                return
            self._refute(m, a.incarnation)
        else:
            self.broadcasts.queue(a, a.node)
            m.incarnation, m.meta, m.vsn = a.incarnation, a.meta, a.vsn
            if updates_node:
                m.addr, m.port, m.address = a.addr, a.port, (_ip_text(a.addr), a.port)
            if m.state != NodeState.ALIVE:
                m.state, m.state_change_s = NodeState.ALIVE, now
        if old_state in (NodeState.DEAD, NodeState.LEFT):
            self._failed.pop(m.name, None)
            self._events.append(MemberEvent("join", m.name, m.address, m.meta))
        elif old_meta != m.meta:
            self._events.append(MemberEvent("update", m.name, m.address, m.meta))

    def _refute(self, me: Member, accused: int) -> None:
        """Someone thinks we are suspect or dead at ``accused``: outbid it and say so."""
        inc = max(self._incarnation + 1, accused + 1)
        self._incarnation = me.incarnation = inc
        self._state_cache = None
        self.awareness.apply_delta(1)  # Lifeguard: being suspected hints we are slow
        self._count("refutes")
        self.broadcasts.queue(Alive(inc, me.name, me.addr, me.port, me.meta, me.vsn), me.name)

    def _stale_accusation(self, me: Member) -> None:
        """A suspect/dead about us older than our incarnation: its sender missed our
        refutation. Say it again at the same incarnation (memberlist stays silent); the next
        datagram, often the ack to the prober that carried the accusation, takes it along."""
        self._count("stale_accusations")
        self.broadcasts.queue(
            Alive(me.incarnation, me.name, me.addr, me.port, me.meta, me.vsn), me.name
        )

    def _suspect_node(self, s: Suspect, now: float) -> None:
        m = self._nodes.get(s.node)
        if m is None:
            return
        if s.incarnation < m.incarnation:
            if s.node == self.name and not self._leaving:
                self._stale_accusation(m)
            return
        susp = self._suspicions.get(s.node)
        renewed = False
        if susp is not None:
            if s.incarnation <= m.incarnation:
                if susp.confirm(s.from_node, now):
                    self._count("suspicion_confirmations")
                    self.broadcasts.queue(s, s.node)
                    self._set_timer("suspicion", s.node, susp.deadline_s)
                return
            # A suspicion at a higher incarnation proves the member refuted ours and we missed
            # the refutation: start a new suspicion instead of letting the new accuser
            # "confirm" the stale one (memberlist would, and under 10% loss that turned a
            # missed refutation into a false death in our simulator).
            self._clear_suspicion(s.node)
            self._count("suspicions_renewed")
            renewed = True
        if m.state != NodeState.ALIVE and not renewed:
            return
        if s.node == self.name:
            self._refute(m, s.incarnation)
            return
        self.broadcasts.queue(s, s.node)
        self._count("suspects")
        m.incarnation, m.state, m.state_change_s = s.incarnation, NodeState.SUSPECT, now
        self._state_cache = None
        cfg = self.config
        n = len(self._nodes)
        k = cfg.suspicion_mult - 2
        if n - 2 < k:
            k = 0  # too few members to ever get k independent confirmations
        min_s = suspicion_timeout_s(cfg.suspicion_mult, n, cfg.probe_interval_s)
        susp = Suspicion(s.from_node, k, min_s, cfg.suspicion_max_timeout_mult * min_s, now)
        self._suspicions[s.node] = susp
        self._set_timer("suspicion", s.node, susp.deadline_s)

    def _on_suspicion(self, name: object, now: float) -> None:
        susp = self._suspicions.get(name)  # type: ignore[call-overload]
        m = self._nodes.get(name)  # type: ignore[call-overload]
        if susp is None or m is None or m.state != NodeState.SUSPECT:
            self._suspicions.pop(name, None)  # type: ignore[call-overload]
            return
        if susp.n < susp.k and not susp.verified and name != self.name:
            # Last chance (our addition to memberlist): nobody confirmed this suspicion, so
            # we may simply have missed the refutation. Ping the member ourselves, with the
            # accusation; a live one answers with its alive piggybacked on the ack, which
            # clears the suspicion. Two copies, since a lost one would cost a false death.
            # A dead member costs one more probe interval; a confirmed suspicion none.
            susp.verified = True
            self._count("suspicion_verifications")
            seq = next(self._seq) & 0xFFFFFFFF
            msgs: list[Message] = [
                Ping(seq, m.name, self._addr_bytes, self.address[1], self.name),
                Suspect(m.incarnation, m.name, self.name),
            ]
            self._send(m.address, msgs)
            self._send(m.address, msgs)
            self._set_timer("suspicion", name, now + self.config.probe_interval_s)
            return
        del self._suspicions[name]  # type: ignore[arg-type]
        self._count("suspicion_timeouts")
        self._dead_node(Dead(m.incarnation, m.name, self.name), now)

    def _clear_suspicion(self, name: str) -> None:
        if self._suspicions.pop(name, None) is not None:
            self._cancel_timer("suspicion", name)

    def _dead_node(self, d: Dead, now: float) -> None:
        m = self._nodes.get(d.node)
        if m is None:
            return
        if d.incarnation < m.incarnation:
            if d.node == self.name and not self._leaving:
                self._stale_accusation(m)
            return
        self._clear_suspicion(d.node)
        if m.state in (NodeState.DEAD, NodeState.LEFT):
            return
        if d.node == self.name:
            if not self._leaving:
                self._refute(m, d.incarnation)
                return
            self.broadcasts.queue(d, d.node, on_done=self._on_leave_sent)
        else:
            self.broadcasts.queue(d, d.node)
        m.incarnation = d.incarnation
        self._state_cache = None
        left = d.node == d.from_node
        m.state, m.state_change_s = (NodeState.LEFT if left else NodeState.DEAD), now
        self._count("members_left" if left else "members_failed")
        if not left and d.node != self.name:
            self._failed[m.name] = (m.address, now)
        else:
            self._failed.pop(m.name, None)
        self._events.append(MemberEvent("leave" if left else "failed", m.name, m.address, m.meta))

    def _on_leave_sent(self) -> None:
        self._leave_done = True


_HANDLERS = {
    Ping: Membership._on_ping,
    IndirectPing: Membership._on_indirect_ping,
    Ack: Membership._on_ack,
    Nack: Membership._on_nack,
    Suspect: Membership._on_suspect,
    Alive: Membership._on_alive,
    Dead: Membership._on_dead,
    User: Membership._on_user,
}
