"""The msgpack encoding of memberlist's messages, byte for byte as go-msgpack 0.5.5 writes
them, and the lenient decoding of each message body (see ``swarmnet.gossip.wire``, which
re-exports ``encode_message``). Shared by the packet and stream codecs. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

from swarmnet.gossip.messages import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    Err,
    IndirectPing,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
    User,
)
from swarmnet.gossip.wire_constants import VSN_LEN, MessageType

# ---------------------------------------------------------------------------------------
# msgpack helpers


def _raw(s: str) -> bytes:
    # Go strings are bytes; names decoded with surrogateescape come back unchanged.
    return s.encode("utf-8", "surrogateescape")


def _uint(v: int, bits: int, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << bits):
        raise ValueError(f"{name}={v!r} does not fit uint{bits}")
    return v


def _vsn(v: bytes) -> bytes:
    if len(v) != VSN_LEN:
        raise ValueError(f"vsn must be {VSN_LEN} bytes (a short one crashes serf), not {len(v)}")
    return bytes(v)


def _pack(fields: Iterable[tuple[str, Any]]) -> bytes:
    """A Go struct as go-msgpack writes it: a map in bytewise key order, raw strings."""
    items = sorted((_raw(k), _raw(v) if isinstance(v, str) else v) for k, v in fields)
    return msgpack.packb(dict(items), use_bin_type=False)


def _unpack(body: bytes) -> dict[bytes, Any]:
    """Exactly one msgpack map (keys as bytes, every str/bin value as bytes)."""
    try:
        obj = msgpack.unpackb(body, raw=True)
    except msgpack.ExtraData as exc:
        raise DecodeError("trailing", "bytes after the message") from exc
    except Exception as exc:  # msgpack raises many exception types for bad input
        raise DecodeError("bad_msgpack", type(exc).__name__) from exc
    if not isinstance(obj, dict):
        raise DecodeError("bad_field", "message body is not a map")
    return obj


class _Fields:
    """Typed access to a decoded struct, with go-msgpack's leniency: missing or nil means
    the zero value; bytes accept str, bin or an array of small ints."""

    def __init__(self, d: dict[bytes, Any]):
        self.d = d

    def _get(self, key: str) -> Any:
        return self.d.get(key.encode())

    def str(self, key: str) -> str:
        v = self._get(key)
        if v is None:
            return ""
        if not isinstance(v, bytes):
            raise DecodeError("bad_field", f"{key} is not a string")
        return v.decode("utf-8", "surrogateescape")

    def bytes(self, key: str) -> bytes:
        v = self._get(key)
        return b"" if v is None else self._to_bytes(key, v)

    def opt_bytes(self, key: str) -> bytes | None:
        v = self._get(key)
        return None if v is None else self._to_bytes(key, v)

    @staticmethod
    def _to_bytes(key: str, v: Any) -> bytes:
        if isinstance(v, bytes):
            return v
        if isinstance(v, list) and all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 256 for x in v
        ):
            return bytes(v)
        raise DecodeError("bad_field", f"{key} is not bytes")

    def uint(self, key: str, bits: int) -> int:
        v = self._get(key)
        if v is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << bits):
            raise DecodeError("bad_field", f"{key} is not a uint{bits}")
        return v

    def bool(self, key: str) -> bool:
        v = self._get(key)
        if v is None:
            return False
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and not isinstance(v, bool) and v in (0, 1):
            return bool(v)  # go-msgpack accepts fixint 0/1 for a bool
        raise DecodeError("bad_field", f"{key} is not a bool")

    def vsn(self, key: str = "Vsn") -> bytes:
        v = self.bytes(key)
        if 0 < len(v) < VSN_LEN:
            raise DecodeError("bad_vsn", f"{len(v)}-byte version vector")
        return v


# ---------------------------------------------------------------------------------------
# message bodies


def _encode_body(msg: Message) -> tuple[MessageType, bytes]:
    match msg:
        case Ping():
            fields: list[tuple[str, Any]] = [
                ("Node", msg.node),
                ("SeqNo", _uint(msg.seq_no, 32, "seq_no")),
            ]
            fields += _source_fields(msg.source_addr, msg.source_port, msg.source_node)
            return MessageType.PING, _pack(fields)
        case IndirectPing():
            fields = [
                ("Nack", bool(msg.nack)),
                ("Node", msg.node),
                ("Port", _uint(msg.port, 16, "port")),
                ("SeqNo", _uint(msg.seq_no, 32, "seq_no")),
                ("Target", bytes(msg.target)),
            ]
            fields += _source_fields(msg.source_addr, msg.source_port, msg.source_node)
            return MessageType.INDIRECT_PING, _pack(fields)
        case Ack():
            payload = None if msg.payload is None else bytes(msg.payload)
            body = _pack([("Payload", payload), ("SeqNo", _uint(msg.seq_no, 32, "seq_no"))])
            return MessageType.ACK_RESP, body
        case Nack():
            return MessageType.NACK_RESP, _pack([("SeqNo", _uint(msg.seq_no, 32, "seq_no"))])
        case Suspect() | Dead():
            kind = MessageType.SUSPECT if isinstance(msg, Suspect) else MessageType.DEAD
            fields = [
                ("From", msg.from_node),
                ("Incarnation", _uint(msg.incarnation, 32, "incarnation")),
                ("Node", msg.node),
            ]
            return kind, _pack(fields)
        case Alive():
            fields = [
                ("Addr", bytes(msg.addr)),
                ("Incarnation", _uint(msg.incarnation, 32, "incarnation")),
                ("Meta", bytes(msg.meta)),
                ("Node", msg.node),
                ("Port", _uint(msg.port, 16, "port")),
                ("Vsn", _vsn(msg.vsn)),
            ]
            return MessageType.ALIVE, _pack(fields)
        case Err():
            return MessageType.ERR, _pack([("Error", msg.error)])
    raise TypeError(f"not a single-body message: {type(msg).__name__}")


def _source_fields(addr: bytes, port: int, node: str) -> list[tuple[str, Any]]:
    # omitempty in memberlist: absent when zero, so old peers see the 0.1.x shape.
    out: list[tuple[str, Any]] = []
    if addr:
        out.append(("SourceAddr", bytes(addr)))
    if node:
        out.append(("SourceNode", node))
    if port:
        out.append(("SourcePort", _uint(port, 16, "source_port")))
    return out


def _decode_body(kind: int, body: bytes) -> Message:
    f = _Fields(_unpack(body))
    if kind == MessageType.PING:
        return Ping(
            seq_no=f.uint("SeqNo", 32),
            node=f.str("Node"),
            source_addr=f.bytes("SourceAddr"),
            source_port=f.uint("SourcePort", 16),
            source_node=f.str("SourceNode"),
        )
    if kind == MessageType.INDIRECT_PING:
        return IndirectPing(
            seq_no=f.uint("SeqNo", 32),
            target=f.bytes("Target"),
            port=f.uint("Port", 16),
            node=f.str("Node"),
            nack=f.bool("Nack"),
            source_addr=f.bytes("SourceAddr"),
            source_port=f.uint("SourcePort", 16),
            source_node=f.str("SourceNode"),
        )
    if kind == MessageType.ACK_RESP:
        return Ack(seq_no=f.uint("SeqNo", 32), payload=f.opt_bytes("Payload"))
    if kind == MessageType.NACK_RESP:
        return Nack(seq_no=f.uint("SeqNo", 32))
    if kind in (MessageType.SUSPECT, MessageType.DEAD):
        cls = Suspect if kind == MessageType.SUSPECT else Dead
        return cls(
            incarnation=f.uint("Incarnation", 32), node=f.str("Node"), from_node=f.str("From")
        )
    if kind == MessageType.ALIVE:
        return Alive(
            incarnation=f.uint("Incarnation", 32),
            node=f.str("Node"),
            addr=f.bytes("Addr"),
            port=f.uint("Port", 16),
            meta=f.bytes("Meta"),
            vsn=f.vsn(),
        )
    if kind == MessageType.ERR:
        return Err(error=f.str("Error"))
    raise DecodeError("unknown_type", str(kind))


def encode_message(msg: Message) -> bytes:
    """One packet message with its type byte, as a compound part or a whole packet (the unit
    the core's broadcast queue stores). ``User`` is its type byte plus the raw payload."""
    if isinstance(msg, User):
        return bytes([MessageType.USER]) + bytes(msg.payload)
    if isinstance(msg, PushPull):
        raise TypeError("push/pull is a stream message: use encode_stream")
    kind, body = _encode_body(msg)
    return bytes([kind]) + body
