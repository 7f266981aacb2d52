"""Membership state of the SWIM core: memberlist's aliveNode / suspectNode / deadNode
transitions with refutation and Lifeguard suspicion, the merge of a peer's push-pull state,
and the handlers of alive/suspect/dead messages. A mixin of ``Membership`` (core.py). Pure."""

from __future__ import annotations

from swarmnet.gossip.config import suspicion_timeout_s
from swarmnet.gossip.core_base import _CoreBase
from swarmnet.gossip.core_types import Addr, Member, MemberEvent, _ip_text
from swarmnet.gossip.messages import (
    Alive,
    Dead,
    Message,
    NodeState,
    Ping,
    PushNodeState,
    Suspect,
)
from swarmnet.gossip.suspicion import Suspicion


class _StateMixin(_CoreBase):
    # ---- push-pull merge and seeding -----------------------------------------------------

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

    # ---- message handlers -----------------------------------------------------------------

    def _on_suspect(self, src: Addr, msg: Suspect, now: float) -> None:
        self._suspect_node(msg, now)

    def _on_alive(self, src: Addr, msg: Alive, now: float) -> None:
        if msg.port == 0:  # memberlist: port 0 means "the receiver's bind port"
            msg = Alive(msg.incarnation, msg.node, msg.addr, self.address[1], msg.meta, msg.vsn)
        self._alive_node(msg, now)

    def _on_dead(self, src: Addr, msg: Dead, now: float) -> None:
        self._dead_node(msg, now)

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
