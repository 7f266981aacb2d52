"""The data of the SWIM core (``swarmnet.gossip.core``, which re-exports the public ones):
its outputs to the driver (``Datagram``, ``StreamRequest``, ``StreamPing``, ``MemberEvent``),
its member records and its in-flight probe and relay records. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from swarmnet.gossip.messages import Message, NodeState, Ping, PushPull, bytes_to_ip

Addr = tuple[str, int]
EventKind = Literal["join", "leave", "failed", "update", "user"]


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
