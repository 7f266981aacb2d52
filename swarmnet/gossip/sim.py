"""A deterministic simulator for the gossip core: N real ``Membership`` cores in one process,
a virtual clock and a simulated network (DESIGN principle 1; TigerBeetle's VOPR in spirit).

Everything that could vary between runs comes from one seed: packet loss, delays, each core's
rng. Events are processed in (time, sequence) order from one heap, so a seed replays the exact
same run, event log included. A failing test prints ``reproduce: SWARMNET_SEED=<n>``.

The network model (``SimNetwork``):

- a datagram is lost with probability ``loss`` (or a per-link override), else delivered after
  ``delay_min_s + Exp(delay_mean_s - delay_min_s)``;
- push-pull streams are reliable (TCP) but take a delay each way, and fail across a cut;
- ``kill`` stops a member dead (no timers, no replies), ``isolate``/``partition`` cut it off,
  ``heal`` restores every link;
- ``codec=True`` sends every datagram through ``wire.encode_packet``/``decode_packet`` to
  catch drift between the core's objects and the codec.

To keep 1,000 nodes cheap, each core has at most one live heap entry (its next deadline); a
core with nothing to gossip does no work in its gossip tick.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import random
import sys
from collections.abc import Callable, Iterator

from swarmnet.gossip.config import GossipConfig
from swarmnet.gossip.core import Addr, Datagram, MemberEvent, Membership, StreamPing
from swarmnet.gossip.messages import NodeState, PushNodeState, PushPull

EventHook = Callable[[float, str, MemberEvent], None]


def seed_from_env(default: int) -> int:
    """The seed to run: ``SWARMNET_SEED`` if set (to replay a failure), else ``default``."""
    return int(os.environ.get("SWARMNET_SEED", default))


@contextlib.contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Print how to replay the run if the body fails."""
    try:
        yield
    except BaseException:
        print(f"reproduce: SWARMNET_SEED={seed}", file=sys.stderr)
        print(f"reproduce: SWARMNET_SEED={seed}")
        raise


class SimNetwork:
    """N gossip cores on a simulated lossy network under a virtual clock."""

    def __init__(
        self,
        seed: int,
        config: GossipConfig | None = None,
        *,
        delay_min_s: float = 0.0002,
        delay_mean_s: float = 0.001,
        loss: float = 0.0,
        codec: bool = False,
        start_s: float = 0.0,
    ):
        assert 0 <= delay_min_s <= delay_mean_s, (delay_min_s, delay_mean_s)
        assert 0.0 <= loss <= 1.0, loss
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or GossipConfig.lan()
        self.delay_min_s = delay_min_s
        self.delay_mean_s = delay_mean_s
        self.loss = loss
        self.codec = codec
        self.now = start_s
        self.cores: dict[str, Membership] = {}
        self.log: list[tuple[float, str, MemberEvent]] = []
        self.on_event: EventHook | None = None
        self.stats: dict[str, int] = {
            "datagrams": 0,
            "delivered": 0,
            "lost": 0,
            "cut": 0,
            "streams": 0,
            "events": 0,
        }
        self._by_addr: dict[Addr, str] = {}
        self._down: set[str] = set()
        self._group: dict[str, int] = {}
        self._link_loss: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._armed: dict[str, float] = {}
        self._ids = itertools.count(1)

    # ---- building the cluster -----------------------------------------------------------

    def add_node(self, name: str, meta: bytes = b"", addr: str | None = None) -> Membership:
        if addr is None:
            i = next(self._ids)
            addr = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        core = Membership(
            name,
            addr,
            self.config.bind_port,
            self.config,
            random.Random(self.rng.getrandbits(64)),
            self.now,
            meta=meta,
        )
        self.cores[name] = core
        self._by_addr[core.address] = name
        self._after_input(name)
        return core

    def join(self, name: str, *others: str) -> None:
        """``name`` joins through the named members (push-pull over a simulated stream)."""
        self.cores[name].join([self.cores[o].address for o in others], self.now)
        self._after_input(name)

    def bootstrap_full_mesh(self) -> None:
        """Start from a converged cluster: every core knows every other, quietly (no join
        events, no join broadcasts). O(n^2), for benchmarks at 1,000 nodes."""
        states = [
            PushNodeState(c.name, c._addr_bytes, c.address[1], b"", 1, NodeState.ALIVE, c._vsn)
            for c in self.cores.values()
        ]
        for name, core in self.cores.items():
            core.seed_members(states, self.now)
            core.broadcasts.clear()
            core.take_events()
            self._after_input(name)

    # ---- faults ---------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """The member stops dead: no timers, no replies (SIGKILL)."""
        self._down.add(name)
        self._armed.pop(name, None)

    def isolate(self, name: str) -> None:
        self._group[name] = -1 - len(self._group)

    def partition(self, *groups: list[str]) -> None:
        """Members in different groups cannot reach each other; unlisted ones form group 0."""
        for gid, group in enumerate(groups, start=1):
            for name in group:
                self._group[name] = gid

    def heal(self) -> None:
        self._group.clear()

    def set_link_loss(self, a: str, b: str, loss: float) -> None:
        """Loss probability on the link between ``a`` and ``b`` (both directions)."""
        self._link_loss[(a, b)] = self._link_loss[(b, a)] = loss

    def reachable(self, a: str, b: str) -> bool:
        return (
            a not in self._down
            and b not in self._down
            and self._group.get(a, 0) == self._group.get(b, 0)
        )

    # ---- running --------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until(
        self, t_end: float, stop: Callable[[], bool] | None = None, check_every_s: float = 0.01
    ) -> bool:
        """Process events up to ``t_end``, or until ``stop()`` is true; ``stop`` is checked
        at most once per ``check_every_s`` of virtual time (a full-view check is O(n^2)).
        Returns True if stopped by ``stop``."""
        heap = self._heap
        next_check = self.now
        while heap and heap[0][0] <= t_end:
            t, _, kind, data = heapq.heappop(heap)
            assert t >= self.now, ("virtual time went backwards", t, self.now)
            self.now = t
            getattr(self, "_do_" + kind)(data)
            if stop is not None and t >= next_check:
                next_check = t + check_every_s
                if stop():
                    return True
        self.now = max(self.now, t_end)
        return stop is not None and stop()

    def _push(self, t: float, kind: str, data: object) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, data))

    def _delay(self) -> float:
        spread = self.delay_mean_s - self.delay_min_s
        return self.delay_min_s + (self.rng.expovariate(1.0 / spread) if spread > 0 else 0.0)

    def _after_input(self, name: str) -> None:
        """Collect a core's output after any input, and re-arm its one timer."""
        core = self.cores[name]
        for out in core.take_outbound():
            if isinstance(out, Datagram):
                self._send_datagram(name, out)
            elif isinstance(out, StreamPing):
                self._stream_ping(name, out)
            else:
                self.stats["streams"] += 1
                dest = self._by_addr.get(out.addr)
                if dest is not None and self.reachable(name, dest):
                    self._push(self.now + self._delay(), "stream", (dest, name, out.push_pull))
        for ev in core.take_events():
            self.stats["events"] += 1
            self.log.append((self.now, name, ev))
            if self.on_event is not None:
                self.on_event(self.now, name, ev)
        if name in self._down:
            return
        deadline = core.next_deadline()
        if deadline is not None:
            deadline = max(deadline, self.now)  # a deadline in the past (Lifeguard) is due now
            if self._armed.get(name) != deadline:
                self._armed[name] = deadline
                self._push(deadline, "timer", name)

    def _send_datagram(self, src: str, dg: Datagram) -> None:
        self.stats["datagrams"] += 1
        dest = self._by_addr.get(dg.addr)
        if dest is None or not self.reachable(src, dest):
            self.stats["cut"] += 1
            return
        loss = self._link_loss.get((src, dest), self.loss)
        if loss and self.rng.random() < loss:
            self.stats["lost"] += 1
            return
        msgs = dg.messages
        if self.codec:
            from swarmnet.gossip import wire  # only when asked: the codec is slower

            msgs = tuple(wire.decode_packet(wire.encode_packet(list(msgs))))
        self._push(self.now + self._delay(), "dgram", (dest, self.cores[src].address, msgs))

    def _stream_ping(self, src: str, sp: StreamPing) -> None:
        """TCP ping: a lost SYN or SYN-ACK costs Linux's 1 s initial RTO, past any probe
        deadline, so it fails; a lost data segment costs the 200 ms minimum RTO."""
        self.stats["stream_pings"] = self.stats.get("stream_pings", 0) + 1
        dest = self._by_addr.get(sp.addr)
        if dest is None or not self.reachable(src, dest):
            return
        loss = self._link_loss.get((src, dest), self.loss)
        if loss and (self.rng.random() < loss or self.rng.random() < loss):
            return
        t = self.now + 2 * self._delay()  # handshake
        for _ in range(2):  # the ping, then the ack
            t += self._delay()
            while loss and self.rng.random() < loss:
                t += 0.2
        ack = self.cores[dest].stream_ping_response(sp.ping)
        if ack is not None and t <= sp.deadline_s:
            self._push(t, "dgram", (src, sp.addr, (ack,)))

    def _do_timer(self, name: str) -> None:
        if self._armed.get(name) != self.now or name in self._down:
            return  # stale: the core's deadline moved since this entry was pushed
        del self._armed[name]
        self.cores[name].handle_timer(self.now)
        self._after_input(name)

    def _do_dgram(self, data: tuple[str, Addr, tuple]) -> None:
        dest, src_addr, msgs = data
        src = self._by_addr.get(src_addr, "")
        if dest in self._down or not self.reachable(src, dest):
            self.stats["cut"] += 1
            return
        self.stats["delivered"] += 1
        self.cores[dest].receive(src_addr, msgs, self.now)
        self._after_input(dest)

    def _do_stream(self, data: tuple[str, str, PushPull]) -> None:
        dest, initiator, pp = data
        if not self.reachable(initiator, dest):
            return
        reply = self.cores[dest].push_pull_response(pp, self.now)
        self._after_input(dest)
        self._push(self.now + self._delay(), "stream_reply", (initiator, dest, reply))

    def _do_stream_reply(self, data: tuple[str, str, PushPull]) -> None:
        initiator, dest, reply = data
        if not self.reachable(initiator, dest):
            return
        self.cores[initiator].merge_remote_state(reply.states, reply.join, self.now)
        self._after_input(initiator)

    # ---- checks ---------------------------------------------------------------------------

    def up(self) -> list[str]:
        return [n for n in self.cores if n not in self._down]

    def view(self, name: str) -> dict[str, NodeState]:
        """What ``name`` believes: member -> state."""
        return {m.name: m.state for m in self.cores[name].members(include_dead=True)}

    def converged(self) -> bool:
        """Every running member sees every running member alive and every other one
        dead or left (or forgotten)."""
        up = self.up()
        up_set = set(up)
        for name in up:
            view = self.view(name)
            for other in up:
                if view.get(other) != NodeState.ALIVE:
                    return False
            for other, state in view.items():
                if other not in up_set and state in (NodeState.ALIVE, NodeState.SUSPECT):
                    return False
        return True

    def event_log(self) -> list[tuple[float, str, str, str]]:
        """The log as plain tuples, for comparing runs."""
        return [(t, who, ev.kind, ev.name) for t, who, ev in self.log]
