"""The SWIM membership core with Lifeguard, as a pure state machine (DESIGN principle 1).

Rules of this core (this file and its parts core_types, core_base, core_probe, core_state
and core_gossip, which it re-exports):

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
from typing import TYPE_CHECKING

from swarmnet.gossip.awareness import Awareness
from swarmnet.gossip.broadcast import BroadcastQueue
from swarmnet.gossip.config import GossipConfig
from swarmnet.gossip.core_gossip import _GossipMixin
from swarmnet.gossip.core_probe import _ProbeMixin
from swarmnet.gossip.core_state import _StateMixin
from swarmnet.gossip.core_types import (
    Addr,
    Datagram,
    EventKind,
    Member,
    MemberEvent,
    StreamPing,
    StreamRequest,
    _Probe,
    _Relay,
)
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
    Suspect,
    User,
    ip_to_bytes,
)
from swarmnet.gossip.suspicion import Suspicion
from swarmnet.gossip.wire import DEFAULT_VSN

if TYPE_CHECKING:
    import random  # only the type: randomness is injected, never module-level

__all__ = [
    "Addr",
    "Datagram",
    "EventKind",
    "Member",
    "MemberEvent",
    "Membership",
    "StreamPing",
    "StreamRequest",
]


class Membership(_ProbeMixin, _StateMixin, _GossipMixin):
    """One gossip member: ``name`` at ``addr:port``. See the module docstring. The protocol's
    parts are mixins: probing (core_probe), state (core_state), gossip and push-pull
    (core_gossip), over the shared state and helpers of core_base."""

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

    def stream_ping_response(self, ping: Ping) -> Ack | None:
        """The answer to a ping that came over TCP (None: it names another member)."""
        if ping.node and ping.node != self.name:
            self._count("drop_ping_wrong_node")
            return None
        return Ack(ping.seq_no)

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
