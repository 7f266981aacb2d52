"""Dissemination in the SWIM core: datagram assembly with piggybacked broadcasts, the
gossip round, periodic push-pull (our state out, the peer's merged by core_state), Serf's
reconnects to failed members, and user messages. A mixin of ``Membership`` (core.py). Pure."""

from __future__ import annotations

from swarmnet.gossip.broadcast import (
    COMPOUND_HEADER_OVERHEAD_BYTES,
    COMPOUND_PART_OVERHEAD_BYTES,
    message_size_bytes,
)
from swarmnet.gossip.config import push_pull_scale
from swarmnet.gossip.core_base import _CoreBase
from swarmnet.gossip.core_types import Addr, Datagram, MemberEvent, StreamRequest
from swarmnet.gossip.messages import Message, NodeState, PushNodeState, PushPull, User


class _GossipMixin(_CoreBase):
    # ---- our push-pull state --------------------------------------------------------------

    def push_pull_state(self, join: bool = False) -> PushPull:
        """Our full state, every member in every state (what memberlist sends)."""
        if self._state_cache is None:
            self._state_cache = tuple(
                PushNodeState(m.name, m.addr, m.port, m.meta, m.incarnation, m.state, m.vsn)
                for m in self._nodes.values()
            )
        return PushPull(join=join, states=self._state_cache)

    def push_pull_response(self, remote: PushPull, now: float) -> PushPull:
        """The responder's side of a stream: our state (taken before merging, as memberlist
        replies first), then merge the initiator's."""
        reply = self.push_pull_state(join=remote.join)
        self.merge_remote_state(remote.states, remote.join, now)
        return reply

    # ---- gossip, push-pull and reconnect rounds, datagram assembly -------------------------

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

    def _on_user(self, src: Addr, msg: User, now: float) -> None:
        self._count("user_in")
        self._events.append(MemberEvent("user", "", src, payload=msg.payload))
