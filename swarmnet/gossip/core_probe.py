"""Failure detection of the SWIM core: the round-robin probe schedule, direct and indirect
pings (with nacks and the TCP fallback), Lifeguard's health feedback from their outcome,
and the relay side of indirect pings. A mixin of ``Membership`` (core.py). Pure."""

from __future__ import annotations

from swarmnet.gossip.core_base import _CoreBase
from swarmnet.gossip.core_types import Addr, Member, StreamPing, _ip_text, _Probe, _Relay
from swarmnet.gossip.messages import Ack, IndirectPing, Message, Nack, NodeState, Ping, Suspect

_NACK_MIN_PROTOCOL = 4  # peers with PMax >= 4 understand nack (memberlist state.go)


class _ProbeMixin(_CoreBase):
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
