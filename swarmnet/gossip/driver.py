"""The thin asyncio driver of the gossip core (STYLE.md item 3, aioquic's ``transmit()``).

``GossipNode`` owns one sans-I/O ``Membership`` core, one transport and the keyring. It holds
no protocol logic: after *every* input (a datagram, a stream, a timer, an API call) it runs
``_pump``, which

1. flushes ``take_outbound()``: a ``Datagram`` is encoded (CRC for peers whose PMax >= 5, as
   memberlist does; encrypted with the keyring's primary key) and sent; a ``StreamRequest``
   becomes a TCP push-pull whose reply is merged; a ``StreamPing`` a TCP ping with the probe's
   deadline, whose ack is fed back with ``receive``;
2. hands ``take_events()`` to an ``asyncio.Queue`` (bounded) and the optional callback;
3. re-arms ONE ``loop.call_at(next_deadline())``.

The core's clock is ``loop.time()`` (monotonic), so the same core runs unchanged under the
simulator's virtual clock. The same core object is never touched from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

from swarmnet.gossip.config import GossipConfig
from swarmnet.gossip.core import (
    Addr,
    Datagram,
    Member,
    MemberEvent,
    Membership,
    StreamPing,
    StreamRequest,
)
from swarmnet.gossip.keyring import Keyring, KeyringError
from swarmnet.gossip.messages import Ack, Message, Ping, PushPull, User
from swarmnet.gossip.transport import AsyncioTransport, StreamFailed, Transport
from swarmnet.gossip.wire import CRC_MIN_PROTOCOL, encode_packet

log = logging.getLogger(__name__)

EVENTS_MAX = 4096
"""Events kept for a slow consumer of ``events``; beyond it the oldest are dropped (and
counted): a consumer that far behind must resync from ``members()`` anyway."""

LEAVE_BROADCAST_TIMEOUT_S = 5.0
"""How long ``leave`` waits for the dead-about-us broadcast to be sent its full retransmit
count (serf's BroadcastTimeout, 5 s)."""

LEAVE_PROPAGATE_S = 1.0
"""Keep answering probes this long after the leave went out, so that members probing us
meanwhile do not suspect us before the leave reaches them (serf's LeavePropagateDelay)."""


class GossipNode:
    """One gossip member on real sockets. ``await start()`` before anything else."""

    def __init__(
        self,
        name: str,
        bind: Addr,
        *,
        advertise: Addr | None = None,
        config: GossipConfig | None = None,
        keyring: Keyring | None = None,
        meta: bytes = b"",
        rng: random.Random | None = None,
        on_event: Callable[[MemberEvent], None] | None = None,
        compress_streams: bool = False,
        transport_factory: Callable[..., Any] | None = None,
    ):
        self.name = name
        self.bind = bind
        self._advertise = advertise
        self.config = (config or GossipConfig.lan()).validate()
        self.keyring = keyring if keyring is not None else Keyring()
        self.meta = meta
        self.rng = rng or random.Random()
        self.on_event = on_event
        self.events: asyncio.Queue[MemberEvent] = asyncio.Queue(EVENTS_MAX)
        self.counters: dict[str, int] = {}
        self._compress_streams = compress_streams
        self._transport_factory = transport_factory or AsyncioTransport.bind
        self.transport: Transport | None = None
        self.core: Membership | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task] = set()
        self._pmax: dict[Addr, int] = {}  # advertised protocol max per member address
        self._pumping = False
        self._pump_again = False
        self._leave_done: asyncio.Event | None = None
        self._closed = False

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport = await self._transport_factory(
            self.bind[0],
            self.bind[1],
            self.keyring,
            self._on_packet,
            self._on_stream,
            stream_timeout_s=self.config.stream_timeout_s,
            compress_streams=self._compress_streams,
        )
        bound = self.transport.local_addr
        adv = self._advertise or bound
        if adv[1] == 0:
            adv = (adv[0], bound[1])
        self.core = Membership(
            self.name, adv[0], adv[1], self.config, self.rng, self._now(), meta=self.meta
        )
        self._pump()

    @property
    def address(self) -> Addr:
        """The advertised ``(ip, port)``: what other members dial."""
        assert self.core is not None, "start() first"
        return self.core.address

    async def join(self, addrs: Iterable[Addr]) -> int:
        """Join push-pull with each address at once; returns how many answered. Serf's
        reply is merged as it arrives, so members appear before every join has ended."""
        core = self._core()
        state = core.push_pull_state(join=True)
        results = await asyncio.gather(*(self._push_pull(a, state) for a in addrs))
        return sum(results)

    async def leave(
        self,
        timeout_s: float = LEAVE_BROADCAST_TIMEOUT_S,
        propagate_s: float = LEAVE_PROPAGATE_S,
    ) -> bool:
        """Announce a graceful leave and wait until it has been gossiped (True) or
        ``timeout_s`` passed (False); then keep answering probes for ``propagate_s``."""
        core = self._core()
        self._leave_done = asyncio.Event()
        core.leave(self._now())
        self._pump()
        done = core.leave_complete
        if not done:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._leave_done.wait()
                    done = True
        if propagate_s > 0:
            await asyncio.sleep(propagate_s)
        return done

    async def close(self) -> None:
        """Stop at once (no leave: others will detect us as failed)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self.transport is not None:
            await self.transport.close()

    # ---- passthroughs ---------------------------------------------------------------------

    def members(self, include_dead: bool = False) -> list[Member]:
        return self._core().members(include_dead)

    def broadcast_user(self, payload: bytes) -> None:
        """Gossip a user message (memberlist userMsg) to every member."""
        self._core().broadcast_user(payload)
        self._pump()

    def send_user(self, addr: Addr, payload: bytes) -> None:
        self._core().send_user(addr, payload)
        self._pump()

    def install_key(self, key: bytes) -> None:
        """Accept ``key`` for decryption from now on (step 1 of a rotation)."""
        self.keyring.install(key)

    def use_key(self, key: bytes) -> None:
        """Encrypt with ``key`` from now on (step 2, once every member has installed it)."""
        self.keyring.use(key)

    def remove_key(self, key: bytes) -> None:
        """Stop accepting ``key`` (step 3). Removing the primary raises ``KeyringError``."""
        self.keyring.remove(key)

    def metrics(self) -> dict[str, int]:
        """Core counters, transport drops and driver counters in one flat dict."""
        out: dict[str, int] = {}
        for part in (
            self.core.counters if self.core else {},
            self.transport.metrics if self.transport else {},
            self.counters,
        ):
            for k, v in part.items():
                out[k] = out.get(k, 0) + v
        return out

    # ---- inputs ---------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _core(self) -> Membership:
        assert self.core is not None, "start() first"
        return self.core

    def _on_packet(self, msgs: list[Message], src: Addr) -> None:
        if self.core is None or self._closed:
            return
        self.core.receive(src, msgs, self._now())
        self._pump()

    def _on_stream(self, msg: Message, peer: Addr) -> Message | None:
        core = self.core
        if core is None or self._closed:
            return None
        reply: Message | None = None
        if isinstance(msg, Ping):
            reply = core.stream_ping_response(msg)
        elif isinstance(msg, PushPull):
            reply = core.push_pull_response(msg, self._now())
        elif isinstance(msg, User):
            core.receive(peer, [msg], self._now())
        else:
            self._count("stream_unexpected_" + type(msg).__name__.lower())
        self._pump()
        return reply

    def _on_timer(self) -> None:
        self._timer = None
        at, self._timer_at = self._timer_at, None
        if self.core is None or self._closed:
            return
        # asyncio may run a timer up to its clock resolution early; never hand the core a
        # time before the deadline it asked for, or it would re-arm the same one forever.
        now = max(self._now(), at or 0.0)
        try:
            self._handle_timer(now)
        except Exception:
            # A bug of ours; a node that stops re-arming its timer would fall silent and be
            # declared dead, so count it, log it and keep going.
            self._count("handler_errors")
            log.exception("gossip core timer failed")
        self._pump()

    # ---- outputs --------------------------------------------------------------------------

    def _pump(self) -> None:
        """Flush outbound, deliver events, re-arm the timer. Re-entrant calls (an event
        callback that calls back into the node) just ask the running pump for one more
        round, so output is never reordered."""
        if self._closed or self.core is None:
            return
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._flush()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False
        self._arm()

    def _flush(self) -> None:
        core = self._core()
        for out in core.take_outbound():
            if isinstance(out, Datagram):
                self._send_datagram(out)
            elif isinstance(out, StreamRequest):
                self._spawn(self._push_pull(out.addr, out.push_pull))
            elif isinstance(out, StreamPing):
                self._spawn(self._stream_ping(out))
        for ev in core.take_events():
            if ev.kind in ("join", "update") and ev.addr is not None:
                m = core.member(ev.name)
                if m is not None and len(m.vsn) >= 2:
                    self._pmax[m.address] = m.vsn[1]
            self._deliver(ev)
        if core.leave_complete and self._leave_done is not None:
            self._leave_done.set()

    def _deliver(self, ev: MemberEvent) -> None:
        if self.events.full():
            self.events.get_nowait()
            self._count("events_dropped")
        self.events.put_nowait(ev)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:
                self._count("event_callback_errors")
                log.exception("gossip event callback failed")

    def _handle_timer(self, now: float) -> None:
        """Subclasses that host another state machine on the same timer extend this."""
        self._core().handle_timer(now)

    def _next_deadline(self) -> float | None:
        """ONE timer for everything the node hosts: subclasses take the min with theirs."""
        return self._core().next_deadline()

    def _arm(self) -> None:
        deadline = self._next_deadline()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            assert self._loop is not None
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _send_datagram(self, d: Datagram) -> None:
        assert self.transport is not None
        crc = self._pmax.get(d.addr, 0) >= CRC_MIN_PROTOCOL
        try:
            buf = encode_packet(d.messages, crc=crc, keyring=self.keyring)
        except (ValueError, TypeError, KeyringError):
            # The core built something the codec refuses (a bug of ours, never a peer's).
            self._count("encode_errors")
            log.exception("gossip datagram to %s could not be encoded", d.addr)
            return
        self.transport.send_packet(buf, d.addr)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._count("handler_errors")
            log.error("gossip stream task failed", exc_info=task.exception())

    async def _push_pull(self, addr: Addr, state: PushPull) -> bool:
        assert self.transport is not None
        self._count("push_pulls_out")
        try:
            reply = await self.transport.exchange(addr, state, self.config.stream_timeout_s)
        except StreamFailed as exc:
            self._count("push_pull_failed")
            log.debug("push-pull with %s failed: %s", addr, exc)
            return False
        if not isinstance(reply, PushPull) or self._closed or self.core is None:
            self._count("push_pull_bad_reply")
            return False
        self.core.merge_remote_state(reply.states, state.join, self._now())
        self._pump()
        return True

    async def _stream_ping(self, sp: StreamPing) -> None:
        assert self.transport is not None
        timeout = sp.deadline_s - self._now()
        if timeout <= 0:
            return
        try:
            reply = await self.transport.exchange(sp.addr, sp.ping, timeout)
        except StreamFailed:
            self._count("stream_ping_failed")
            return
        if (
            isinstance(reply, Ack)
            and reply.seq_no == sp.ping.seq_no
            and not self._closed
            and self.core is not None
        ):
            self.core.receive(sp.addr, [reply], self._now())
            self._pump()

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


__all__ = ["EVENTS_MAX", "GossipNode"]
