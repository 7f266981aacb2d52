"""memberlist's message vocabulary as frozen dataclasses (memberlist 0.2.2 as built into
Debian's serf 0.9.4; see /work/shared/MEMBERLIST-WIRE.md section 3).

Conventions (shared by the SWIM core, the codec in ``wire.py`` and the tests):

- One class per memberlist message; field names are memberlist's Go field names in
  snake_case (``SeqNo`` -> ``seq_no``, ``SourceAddr`` -> ``source_addr``). ``From`` is a Python
  keyword, so it is ``from_node``.
- **Addresses are ``bytes``: the raw 4-byte (IPv4) or 16-byte (IPv6 or IPv4-mapped) IP**, the
  exact bytes memberlist puts on the wire (Go ``net.IP``). Convert with ``ip_to_bytes`` /
  ``bytes_to_ip`` below. Ports are plain ``int`` (uint16 on the wire).
- Node names, error texts: ``str``. Go strings are arbitrary bytes; names that are not UTF-8
  are decoded with ``surrogateescape`` so they round-trip byte for byte.
- Opaque payloads (``meta``, ``payload``, ``vsn``, user messages): ``bytes``.
- ``vsn`` is the 6-byte version vector ``[pmin, pmax, pcur, dmin, dmax, dcur]``; serf sends
  ``01 05 02 02 05 05`` (``wire.DEFAULT_VSN``). The encoder refuses any length other than 6:
  a shorter one crashes serf (MEMBERLIST-WIRE.md section 8).
- ``Ack.payload is None`` means Go's nil slice (msgpack nil); ``b""`` is an empty slice.
  Serf ignores an empty or nil ack payload, so the core may send either.
- Numbers are not range-checked here; the encoder raises ``ValueError`` for values that do
  not fit the Go type, the decoder raises ``DecodeError("bad_field")``.
- Compound, CRC, compression and encryption are framing, not messages: they exist only in
  ``wire.py`` / ``keyring.py``.

This module does no I/O and imports nothing from the rest of swarmnet, so the core, the
simulator and the codec can all depend on it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum


class DecodeError(Exception):
    """A packet or stream that we drop. ``reason`` is a short metric label, one of
    ``DECODE_REASONS``; the core counts drops per reason and never lets this escape its loop."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# Every reason DecodeError may carry: a fixed set, so it can be a metric label.
DECODE_REASONS = frozenset(
    {
        "empty",  # zero-length packet or compound part (memberlist 0.2.2 panics on these)
        "truncated",  # shorter than its own headers / lengths say
        "trailing",  # bytes after the last msgpack object of a message
        "bad_crc",  # hasCrc wrapper whose CRC32 does not match
        "unknown_type",  # message type byte we do not know (or not allowed in this place)
        "bad_msgpack",  # body is not one valid msgpack object
        "bad_field",  # msgpack is valid but a field has the wrong type or range
        "bad_vsn",  # version vector of length 1..5 (would crash memberlist)
        "bad_compression",  # unknown Algo or corrupt LZW stream
        "oversized",  # over a size limit (decompressed size, stream length)
        "too_deep",  # compound/compress nested deeper than we allow
        "not_encrypted",  # a keyring is configured but the packet/stream is plaintext
        "bad_encryption_version",  # encryption version byte other than 0 or 1
        "decrypt_failed",  # no installed key authenticates the ciphertext
    }
)


class NodeState(IntEnum):
    """memberlist's nodeStateType (state.go). APPEND ONLY: values are on the wire (push/pull)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3  # new in memberlist 0.2.x: a graceful leave (dead with From == Node)


@dataclass(frozen=True, slots=True)
class Ping:
    """pingMsg (0). ``node`` is the *target's* name (empty = anyone); a receiver with another
    name ignores it. The ack goes to ``source_addr:source_port`` when both are set, else to
    the UDP source. The ``source_*`` fields are omitempty on the wire."""

    seq_no: int
    node: str
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """indirectPingMsg (1): "please ping ``target:port`` (named ``node``) for me". ``nack``
    asks for a Nack if the target does not answer within the probe timeout."""

    seq_no: int
    target: bytes
    port: int
    node: str
    nack: bool = False
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    """ackRespMsg (2). Matched by ``seq_no`` only. Serf puts a Vivaldi coordinate
    (``0x01`` + msgpack) in ``payload``; None = Go nil (what TCP and indirect acks carry)."""

    seq_no: int
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Nack:
    """nackRespMsg (11): the indirect prober could not reach the target in time."""

    seq_no: int


@dataclass(frozen=True, slots=True)
class Suspect:
    """suspectMsg (3): ``from_node`` suspects ``node`` at ``incarnation``."""

    incarnation: int
    node: str
    from_node: str


@dataclass(frozen=True, slots=True)
class Alive:
    """aliveMsg (4): join/refute/update announcement. ``port == 0`` means "my bind port"."""

    incarnation: int
    node: str
    addr: bytes
    port: int
    meta: bytes = b""
    vsn: bytes = b""


@dataclass(frozen=True, slots=True)
class Dead:
    """deadMsg (5). ``from_node == node`` is a graceful leave (state Left), else a death."""

    incarnation: int
    node: str
    from_node: str


@dataclass(frozen=True, slots=True)
class PushNodeState:
    """One node of a push/pull (note: Go calls the name ``Name`` here, ``Node`` in Alive).
    Every state sent to serf needs a 6-byte ``vsn``, dead and left nodes included."""

    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    state: NodeState
    vsn: bytes


@dataclass(frozen=True, slots=True)
class PushPullHeader:
    """The msgpack header of a push/pull stream: how many node states and user-state bytes
    follow. Exposed for completeness; the codec builds it from ``PushPull``."""

    nodes: int
    user_state_len: int
    join: bool


@dataclass(frozen=True, slots=True)
class PushPull:
    """pushPullMsg (6), TCP only: the whole state exchange (header, node states, then the
    delegate's opaque user state; serf's starts with byte 0x02). The responder echoes
    ``join`` from the initiator."""

    join: bool
    states: tuple[PushNodeState, ...] = ()
    user_state: bytes = b""


@dataclass(frozen=True, slots=True)
class User:
    """userMsg (8): opaque bytes for the delegate (serf: ``[serf type u8][msgpack]``). On UDP
    it is the rest of the packet; on TCP it is framed by a userMsgHeader."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Err:
    """errMsg (13), TCP only: the responder could not read our stream."""

    error: str


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull | User | Err

# Messages that may travel in a UDP packet (alone or in a compound).
PACKET_MESSAGES = (Ping, IndirectPing, Ack, Nack, Suspect, Alive, Dead, User)
# Messages that may open a TCP stream.
STREAM_MESSAGES = (Ping, Ack, PushPull, User, Err)


def ip_to_bytes(ip: str) -> bytes:
    """'127.0.0.1' -> 4 bytes, '::1' -> 16 bytes (what memberlist puts in Addr/Target)."""
    return ipaddress.ip_address(ip).packed


def bytes_to_ip(raw: bytes) -> str:
    """4 or 16 raw bytes -> text. An IPv4-mapped IPv6 address (serf bound to 0.0.0.0
    advertises one) is returned as plain IPv4. Raises ValueError for other lengths."""
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if len(raw) == 16:
        addr = ipaddress.IPv6Address(raw)
        return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    raise ValueError(f"an IP is 4 or 16 bytes, not {len(raw)}")


__all__ = [
    "DECODE_REASONS",
    "PACKET_MESSAGES",
    "STREAM_MESSAGES",
    "Ack",
    "Alive",
    "Dead",
    "DecodeError",
    "Err",
    "IndirectPing",
    "Message",
    "Nack",
    "NodeState",
    "Ping",
    "PushNodeState",
    "PushPull",
    "PushPullHeader",
    "Suspect",
    "User",
    "bytes_to_ip",
    "ip_to_bytes",
]
