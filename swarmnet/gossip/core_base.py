"""The state every part of the SWIM core shares, and the helpers they all use (timers,
counters, random member choice). ``Membership`` (core.py) initialises the state; the parts
(core_probe, core_state, core_gossip) are mixins over this base, so a method keeps its name
and behaviour wherever it is defined. Pure: see the rules in core.py's docstring."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from swarmnet.gossip.core_types import (
    Addr,
    Datagram,
    Member,
    MemberEvent,
    StreamPing,
    StreamRequest,
    _Probe,
    _Relay,
)

if TYPE_CHECKING:
    import itertools
    import random

    from swarmnet.gossip.awareness import Awareness
    from swarmnet.gossip.broadcast import BroadcastQueue
    from swarmnet.gossip.config import GossipConfig
    from swarmnet.gossip.messages import Message, PushNodeState, Suspect
    from swarmnet.gossip.suspicion import Suspicion


class _CoreBase:
    """The state of one member's core (declared here, set in ``Membership.__init__``)."""

    name: str
    config: GossipConfig
    rng: random.Random
    address: Addr
    _addr_bytes: bytes
    _vsn: bytes
    awareness: Awareness
    broadcasts: BroadcastQueue
    user_broadcasts: BroadcastQueue
    counters: dict[str, int]
    _nodes: dict[str, Member]
    _state_cache: tuple[PushNodeState, ...] | None  # None: members changed
    _probe_list: list[Member]  # shuffled; new members at random offsets
    _probe_index: int
    _probe: _Probe | None
    _probe_due: bool  # a probe tick came while a probe was still running
    _acks: dict[int, _Probe | _Relay]
    _suspicions: dict[str, Suspicion]
    _failed: dict[str, tuple[Addr, float]]  # for Serf-style reconnects
    _seq: itertools.count[int]
    _leaving: bool
    _leave_done: bool
    _outbound: list[Datagram | StreamRequest | StreamPing]
    _events: list[MemberEvent]
    _timers: list[tuple[float, int, str, object, int]]
    _timer_gen: dict[tuple[str, object], int]
    _timer_seq: itertools.count[int]
    _incarnation: int

    if TYPE_CHECKING:
        # What one part calls in another (for readers and type checkers; no runtime effect).
        def _send(self, addr: Addr, msgs: list[Message]) -> None: ...  # core_gossip

        def _suspect_node(self, s: Suspect, now: float) -> None: ...  # core_state

        def merge_remote_state(  # core_state
            self, states: tuple[PushNodeState, ...], join: bool, now: float
        ) -> None: ...

    # ---- timers ---------------------------------------------------------------------------

    def _set_timer(self, kind: str, key: object, deadline: float) -> None:
        gen = next(self._timer_seq)
        self._timer_gen[(kind, key)] = gen
        heapq.heappush(self._timers, (deadline, gen, kind, key, gen))

    def _cancel_timer(self, kind: str, key: object) -> None:
        self._timer_gen.pop((kind, key), None)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

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
