"""memberlist's wire format (memberlist 0.2.2 + go-msgpack 0.5.5, as in Debian's serf 0.9.4):
the constants, the msgpack encoding of every message, UDP packets (compound, CRC, LZW
compression, encryption) and TCP streams (push/pull and the rest). Pure: no I/O, no clock,
no random state. The byte-level reference is /work/shared/MEMBERLIST-WIRE.md.

Encoding matches go-msgpack byte for byte: structs are maps with the Go field names sorted
bytewise, strings *and* byte slices use the str family without str8 (msgpack-python's
``use_bin_type=False``), integers take their smallest form. Decoding is lenient the way Go is
(str or bin for bytes, an int array for ``Vsn``, nil for zero values, unknown keys skipped)
and strict where Go would crash (empty parts, short ``Vsn``), every failure being a
``DecodeError(reason)``.

Labels (``hasLabelMsg`` 244) only exist from memberlist 0.3.0 on; serf 0.9.4 drops them as an
unknown type, so we never send one and reject one as ``unknown_type``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Any

import msgpack

from swarmnet.gossip.keyring import ENCRYPT_MSG_TYPE, Keyring, stream_frame_length
from swarmnet.gossip.messages import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    Err,
    IndirectPing,
    Message,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
)


class MessageType(IntEnum):
    """memberlist's messageType (net.go). APPEND ONLY: values are on the wire."""

    PING = 0
    INDIRECT_PING = 1
    ACK_RESP = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6  # TCP only
    COMPOUND = 7
    USER = 8
    COMPRESS = 9
    ENCRYPT = 10  # TCP only: the encrypted stream frame (UDP encryption has no type byte)
    NACK_RESP = 11
    HAS_CRC = 12
    ERR = 13  # TCP only


# memberlist >= 0.3.0 prefixes labelled packets with this; serf 0.9.4 does not know it.
HAS_LABEL_MSG_TYPE = 244

# The memberlist protocol versions we understand (inclusive range), as memberlist's.
PROTOCOL_VERSION_MIN = 1  # 1: the original protocol (encryption version 0, padded)
# 2: Port in alive/indirect ping, unpadded encryption version 1 (what serf speaks: pcur=2)
# 3: TCP fallback pings; 4: nacks in indirect probes; 5: CRC-wrapped UDP packets
PROTOCOL_VERSION_MAX = 5
PROTOCOL_VERSION_CURRENT = 2  # serf maps every serf protocol to memberlist 2; so do we
# Serf's delegate (serf protocol) range; serf's verifyProtocol needs ours to overlap it.
DELEGATE_VERSION_MIN = 2
DELEGATE_VERSION_MAX = 5
DELEGATE_VERSION_CURRENT = 5  # the serf agent's default -protocol
# [pmin, pmax, pcur, dmin, dmax, dcur]: exactly what the serf agent sends (01 05 02 02 05 05).
DEFAULT_VSN = bytes(
    [
        PROTOCOL_VERSION_MIN,
        PROTOCOL_VERSION_MAX,
        PROTOCOL_VERSION_CURRENT,
        DELEGATE_VERSION_MIN,
        DELEGATE_VERSION_MAX,
        DELEGATE_VERSION_CURRENT,
    ]
)
VSN_LEN = 6

# Peers whose PMax is at least this get a CRC on gossip packets (memberlist net.go).
CRC_MIN_PROTOCOL = 5
COMPRESS_ALGO_LZW = 0  # the only compressionType
META_MAX_BYTES = 512  # memberlist MetaMaxSize
UDP_BUFFER_BYTES = 1400  # memberlist UDPBufferSize: what senders fit gossip into
UDP_RECEIVE_BYTES = 65536  # memberlist's receive buffer
# memberlist 0.2.2 computes numParts*2 in a uint8: 128+ parts crash it (fixed upstream 2021).
COMPOUND_PARTS_MAX = 127
COMPOUND_PART_BYTES_MAX = 0xFFFF  # part lengths are u16
# A UDP packet that decompresses beyond this is refused: a real packet was compressed only
# when that made it smaller than what fits in one datagram, so 1 MiB is far above need.
PACKET_DECOMPRESSED_MAX = 1024 * 1024
STREAM_BYTES_MAX = 20 * 1024 * 1024  # memberlist maxPushStateBytes
NESTING_MAX = 4  # compound/compress inside compound/compress; serf nests at most 2


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


# ---------------------------------------------------------------------------------------
# UDP packets


def encode_compound(parts: Sequence[bytes]) -> bytes:
    """``[7][n][len u16 BE]*n[parts]``: already-encoded messages in one packet."""
    if not 1 <= len(parts) <= COMPOUND_PARTS_MAX:
        raise ValueError(f"a compound holds 1..{COMPOUND_PARTS_MAX} parts, not {len(parts)}")
    for part in parts:
        if not part or len(part) > COMPOUND_PART_BYTES_MAX:
            raise ValueError("compound parts must be 1..65535 bytes (empty ones crash serf)")
    lengths = struct.pack(f">{len(parts)}H", *(len(p) for p in parts))
    return bytes([MessageType.COMPOUND, len(parts)]) + lengths + b"".join(parts)


def encode_compress(inner: bytes) -> bytes:
    """``[9] msgpack{Algo: 0, Buf: LZW(inner)}``."""
    if not inner:
        raise ValueError("never compress an empty message (it crashes serf)")
    body = _pack([("Algo", COMPRESS_ALGO_LZW), ("Buf", lzw_compress(inner))])
    return bytes([MessageType.COMPRESS]) + body


def add_crc(buf: bytes) -> bytes:
    """``[12][crc32 IEEE BE][buf]``."""
    if not buf:
        raise ValueError("never wrap an empty message in a CRC (it crashes serf)")
    return struct.pack(">BI", MessageType.HAS_CRC, zlib.crc32(buf)) + buf


def encode_packet(
    msgs: Sequence[Message | bytes],
    *,
    crc: bool = False,
    compress: bool = False,
    keyring: Keyring | None = None,
) -> bytes:
    """One UDP datagram, layered as memberlist sends: message or compound, then compression
    (only if it is shorter, as memberlist does), then the CRC (``crc=True`` when the peer's
    PMax >= CRC_MIN_PROTOCOL), then encryption with the keyring's primary key.
    Items may be messages or bytes from ``encode_message``."""
    parts = [m if isinstance(m, bytes) else encode_message(m) for m in msgs]
    if not parts:
        raise ValueError("a packet needs at least one message")
    buf = parts[0] if len(parts) == 1 else encode_compound(parts)
    if compress:
        packed = encode_compress(buf)
        if len(packed) < len(buf):
            buf = packed
    if crc:
        buf = add_crc(buf)
    if keyring:
        buf = keyring.encrypt_packet(buf)
    return buf


def decode_packet_parts(
    buf: bytes, *, keyring: Keyring | None = None
) -> tuple[list[Message], list[DecodeError]]:
    """Decode a UDP datagram the way memberlist handles one: every good part of a compound
    is kept even when another part is bad. Returns (messages, errors); never raises."""
    out: list[Message] = []
    errors: list[DecodeError] = []
    try:
        if not buf:
            raise DecodeError("empty")
        if keyring:
            buf = keyring.decrypt_packet(buf)
        if buf and buf[0] == MessageType.HAS_CRC:
            if len(buf) < 5:
                raise DecodeError("truncated", "short CRC header")
            (want,) = struct.unpack_from(">I", buf, 1)
            buf = buf[5:]
            if zlib.crc32(buf) != want:
                raise DecodeError("bad_crc")
        _decode_command(buf, 0, out, errors)
    except DecodeError as exc:
        errors.append(exc)
    return out, errors


def decode_packet(buf: bytes, *, keyring: Keyring | None = None) -> list[Message]:
    """Decode a UDP datagram; any bad part makes the whole packet a ``DecodeError``."""
    out, errors = decode_packet_parts(buf, keyring=keyring)
    if errors:
        raise errors[0]
    return out


def _decode_command(buf: bytes, depth: int, out: list[Message], errors: list[DecodeError]) -> None:
    if not buf:
        raise DecodeError("empty")
    kind = buf[0]
    if kind == MessageType.COMPOUND:
        if depth >= NESTING_MAX:
            raise DecodeError("too_deep")
        if len(buf) < 2:
            raise DecodeError("truncated", "compound header")
        n = buf[1]
        offset = 2 + 2 * n
        if len(buf) < offset:
            raise DecodeError("truncated", "compound lengths")
        for length in struct.unpack_from(f">{n}H", buf, 2):
            if offset + length > len(buf):
                # memberlist keeps the parts it parsed and drops the rest as truncated.
                errors.append(DecodeError("truncated", "compound part"))
                return
            part = buf[offset : offset + length]
            offset += length
            try:
                _decode_command(part, depth + 1, out, errors)
            except DecodeError as exc:
                errors.append(exc)
        if offset != len(buf):
            errors.append(DecodeError("trailing", "bytes after the compound parts"))
        return
    if kind == MessageType.COMPRESS:
        if depth >= NESTING_MAX:
            raise DecodeError("too_deep")
        _decode_command(_decompress_body(buf[1:], PACKET_DECOMPRESSED_MAX), depth + 1, out, errors)
        return
    if kind == MessageType.USER:
        out.append(User(payload=bytes(buf[1:])))
        return
    if kind in (MessageType.PUSH_PULL, MessageType.ENCRYPT, MessageType.ERR, MessageType.HAS_CRC):
        raise DecodeError("unknown_type", f"type {kind} is not valid in a packet")
    if kind > MessageType.ERR:
        raise DecodeError("unknown_type", str(kind))
    out.append(_decode_body(kind, bytes(buf[1:])))


def _decompress_body(body: bytes, limit: int) -> bytes:
    f = _Fields(_unpack(body))
    if f.uint("Algo", 8) != COMPRESS_ALGO_LZW:
        raise DecodeError("bad_compression", "unknown algorithm")
    return lzw_decompress(f.bytes("Buf"), limit)


# ---------------------------------------------------------------------------------------
# LZW as Go's compress/lzw (LSB order, 8-bit literals) reads and writes it

_LZW_CLEAR = 256
_LZW_EOF = 257
_LZW_MAX_CODE = 4095  # 12-bit codes


def lzw_compress(data: bytes) -> bytes:
    """Byte-identical to Go 1.19's ``lzw.NewWriter(w, lzw.LSB, 8)``: a clear code first
    (Go >= 1.17), variable width 9..12 bits, a clear when the table is full, EOF, LSB-first."""
    out = bytearray()
    bits = nbits = 0
    width, hi, overflow = 9, _LZW_EOF, 512
    table: dict[int, int] = {}

    def emit(code: int) -> None:
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8

    def inc_hi() -> bool:
        """Advance the next free code; True when the table was full and got cleared."""
        nonlocal hi, width, overflow
        hi += 1
        if hi == overflow:
            width += 1
            overflow <<= 1
        if hi == _LZW_MAX_CODE:
            emit(_LZW_CLEAR)
            width, hi, overflow = 9, _LZW_EOF, 512
            table.clear()
            return True
        return False

    emit(_LZW_CLEAR)
    if data:
        code = data[0]
        for literal in data[1:]:
            key = code << 8 | literal
            hit = table.get(key)
            if hit is not None:
                code = hit
                continue
            emit(code)
            code = literal
            if not inc_hi():
                table[key] = hi
        emit(code)
        inc_hi()
    emit(_LZW_EOF)
    if nbits > 0:
        out.append(bits & 0xFF)
    return bytes(out)


def lzw_decompress(data: bytes, limit: int) -> bytes:
    """Go's LZW reader; raises ``bad_compression`` for a corrupt or unterminated stream and
    ``oversized`` past ``limit`` output bytes (LZW expands up to ~4000x: a bomb guard)."""
    out = bytearray()
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b"", b""]
    table += [b""] * (_LZW_MAX_CODE + 1 - len(table))
    bits = nbits = 0
    width, hi, overflow = 9, _LZW_EOF, 512
    last = -1  # no previous code (start, after clear, or table full)
    pos = 0
    while True:
        while nbits < width:
            if pos >= len(data):
                raise DecodeError("bad_compression", "LZW stream ends without EOF")
            bits |= data[pos] << nbits
            pos += 1
            nbits += 8
        code = bits & ((1 << width) - 1)
        bits >>= width
        nbits -= width
        if code == _LZW_CLEAR:
            width, hi, overflow, last = 9, _LZW_EOF, 512, -1
            continue
        if code == _LZW_EOF:
            return bytes(out)
        if code < hi or (code == hi and last < 0):
            entry = table[code]  # code == hi here only once the 12-bit table is full
        elif code == hi:
            prev = table[last]
            entry = prev + prev[:1]
        else:
            raise DecodeError("bad_compression", "invalid LZW code")
        out += entry
        if len(out) > limit:
            raise DecodeError("oversized", "decompressed data over the limit")
        if last >= 0:
            table[hi] = table[last] + entry[:1]
        last = code
        hi += 1
        if hi >= overflow:
            if width == 12:
                last = -1
                hi -= 1
            else:
                width += 1
                overflow <<= 1


# ---------------------------------------------------------------------------------------
# TCP streams: [type][msgpack...], optionally compressed ([9]{Algo, Buf}) then encrypted
# ([10][len u32][payload], keyring.py). Push/pull: [6] header, node states, user state.


def encode_stream(msg: Message, *, compress: bool = False, keyring: Keyring | None = None) -> bytes:
    """A whole TCP message as memberlist writes it: plain, then compressed (serf always
    compresses streams, even when it grows them), then encrypted (AAD = the frame header).
    Streams carry Ping (TCP fallback probe), Ack, PushPull, User and Err."""
    if isinstance(msg, PushPull):
        header = _pack(
            [
                ("Join", bool(msg.join)),
                ("Nodes", len(msg.states)),
                ("UserStateLen", len(msg.user_state)),
            ]
        )
        plain = bytes([MessageType.PUSH_PULL]) + header
        plain += b"".join(_encode_state(s) for s in msg.states) + bytes(msg.user_state)
    elif isinstance(msg, User):
        header = _pack([("UserMsgLen", len(msg.payload))])
        plain = bytes([MessageType.USER]) + header + bytes(msg.payload)
    elif isinstance(msg, Ping | Ack | Err):
        kind, body = _encode_body(msg)
        plain = bytes([kind]) + body
    else:
        raise TypeError(f"{type(msg).__name__} is not sent on a stream")
    if compress:
        plain = encode_compress(plain)
    if keyring:
        plain = keyring.encrypt_stream(plain)
    return plain


def _encode_state(s: PushNodeState) -> bytes:
    return _pack(
        [
            ("Addr", bytes(s.addr)),
            ("Incarnation", _uint(s.incarnation, 32, "incarnation")),
            ("Meta", bytes(s.meta)),
            ("Name", s.name),
            ("Port", _uint(s.port, 16, "port")),
            ("State", int(NodeState(s.state))),
            ("Vsn", _vsn(s.vsn)),
        ]
    )


def _decode_state(body: bytes) -> PushNodeState:
    f = _Fields(_unpack(body))
    try:
        state = NodeState(f.uint("State", 63))
    except ValueError as exc:
        raise DecodeError("bad_field", "unknown node state") from exc
    return PushNodeState(
        name=f.str("Name"),
        addr=f.bytes("Addr"),
        port=f.uint("Port", 16),
        meta=f.bytes("Meta"),
        incarnation=f.uint("Incarnation", 32),
        state=state,
        vsn=f.vsn(),
    )


class _NeedMore(Exception):
    """Internal: the stream is incomplete; at least ``n`` bytes are needed."""

    def __init__(self, n: int):
        self.n = n


# msgpack lead byte -> (header bytes, width of the length field, container multiplier).
# Lengths follow the lead byte; a multiplier > 0 means "this many child objects per unit".
def _msgpack_end(buf: bytes, pos: int) -> int:
    """End offset of the msgpack object at ``pos`` without decoding it, so that an
    incomplete stream is detected cheaply (``_NeedMore``) and a big string is skipped."""
    pending = 1
    n = len(buf)
    while pending:
        if pos >= n:
            raise _NeedMore(pos + 1)
        b = buf[pos]
        pending -= 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            pos += 1
        elif b <= 0x8F:
            pending += 2 * (b & 0x0F)
            pos += 1
        elif b <= 0x9F:
            pending += b & 0x0F
            pos += 1
        elif b <= 0xBF:
            pos += 1 + (b & 0x1F)
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            width, extra = _SIZED[b]
            if pos + 1 + width > n:
                raise _NeedMore(pos + 1 + width)
            length = int.from_bytes(buf[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width + extra + length
        elif b in _CONTAINERS:
            width, mult = _CONTAINERS[b]
            if pos + 1 + width > n:
                raise _NeedMore(pos + 1 + width)
            pending += mult * int.from_bytes(buf[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        else:
            raise DecodeError("bad_msgpack", f"invalid lead byte {b:#x}")
    if pos > n:
        raise _NeedMore(pos)
    return pos


_FIXED = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5}
_FIXED |= {0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
# bin8/16/32, ext8/16/32 (one type byte after the length), str8/16/32: (length width, extra)
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)}
_SIZED |= {0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _parse_stream(
    buf: bytes, keyring: Keyring | None, progress: list[tuple[PushNodeState, int]] | None = None
) -> tuple[Message, int]:
    if not buf:
        raise _NeedMore(1)
    if buf[0] == ENCRYPT_MSG_TYPE:
        if not keyring:
            raise DecodeError("decrypt_failed", "encrypted stream but no keyring")
        total = stream_frame_length(buf)
        if total is None or len(buf) < total:
            raise _NeedMore(total or 5)
        return _parse_complete(keyring.decrypt_stream(buf[:total]), True), total
    if keyring:
        raise DecodeError("not_encrypted", "a keyring is configured")
    return _parse_plain(buf, True, progress)


def _parse_complete(plain: bytes, compressed_ok: bool) -> Message:
    try:
        return _parse_plain(plain, compressed_ok)[0]
    except _NeedMore as exc:
        raise DecodeError("empty" if not plain else "truncated") from exc


def _parse_plain(
    buf: bytes, compressed_ok: bool, progress: list[tuple[PushNodeState, int]] | None = None
) -> tuple[Message, int]:
    """Parse one stream message from ``buf``. ``progress`` (incremental decoding only)
    keeps the push/pull node states already parsed, with their end offsets, so that a large
    plaintext push/pull arriving in many segments is parsed once, not once per segment."""
    if not buf:
        raise _NeedMore(1)
    kind = buf[0]
    if kind == MessageType.COMPRESS and compressed_ok:
        end = _msgpack_end(buf, 1)
        inner = _decompress_body(buf[1:end], STREAM_BYTES_MAX)
        return _parse_complete(inner, False), end
    if kind in (MessageType.PING, MessageType.ACK_RESP, MessageType.ERR):
        end = _msgpack_end(buf, 1)
        return _decode_body(kind, buf[1:end]), end
    if kind == MessageType.USER:
        end = _msgpack_end(buf, 1)
        size = _stream_len(_Fields(_unpack(buf[1:end])), "UserMsgLen")
        if len(buf) < end + size:
            raise _NeedMore(end + size)
        return User(payload=bytes(buf[end : end + size])), end + size
    if kind == MessageType.PUSH_PULL:
        end = _msgpack_end(buf, 1)
        header = _Fields(_unpack(buf[1:end]))
        join = header.bool("Join")
        nodes = _stream_len(header, "Nodes")
        user_len = _stream_len(header, "UserStateLen")
        done: list[tuple[PushNodeState, int]] = progress if progress is not None else []
        if done:
            end = done[-1][1]
        while len(done) < nodes:
            state_end = _msgpack_end(buf, end)
            done.append((_decode_state(buf[end:state_end]), state_end))
            end = state_end
        states = [state for state, _ in done]
        if len(buf) < end + user_len:
            raise _NeedMore(end + user_len)
        user_state = bytes(buf[end : end + user_len])
        return PushPull(join=join, states=tuple(states), user_state=user_state), end + user_len
    raise DecodeError("unknown_type", f"type {kind} does not open a stream")


def _stream_len(f: _Fields, key: str) -> int:
    # Go ints; a negative one makes memberlist panic in make(), so it is a bad field here.
    try:
        n = f.uint(key, 63)
    except DecodeError as exc:
        raise DecodeError("bad_field", f"{key} is not a length") from exc
    if n > STREAM_BYTES_MAX:
        raise DecodeError("oversized", f"{key}={n}")
    return n


class StreamDecoder:
    """Incremental decoder of one TCP exchange: memberlist never half-closes, so a
    responder must know when the initiator's message is complete. ``feed`` returns the
    message once complete (bytes after it are kept in ``rest``) and None before; it raises
    ``DecodeError`` for a bad stream. Parsing restarts only when the bytes it last asked for
    have arrived, so a large string or frame costs one parse."""

    def __init__(self, keyring: Keyring | None = None, *, max_bytes: int = STREAM_BYTES_MAX):
        self._keyring = keyring
        self._limit = max_bytes + 5  # room for the encrypted frame header
        self._buf = bytearray()
        self._need = 1
        self._progress: list[
            tuple[PushNodeState, int]
        ] = []  # push/pull node states parsed so far (plaintext only)
        self.message: Message | None = None
        self.rest = b""

    def feed(self, data: bytes) -> Message | None:
        if self.message is not None:
            self.rest += data
            return None
        self._buf += data
        if len(self._buf) > self._limit:
            raise DecodeError("oversized", "stream over the size limit")
        if len(self._buf) < self._need:
            return None
        try:
            msg, end = _parse_stream(bytes(self._buf), self._keyring, self._progress)
        except _NeedMore as more:
            if more.n > self._limit:
                raise DecodeError("oversized", f"stream needs {more.n} bytes") from None
            self._need = more.n
            return None
        self.message, self.rest = msg, bytes(self._buf[end:])
        self._buf.clear()
        return msg

    def eof(self) -> Message:
        """The peer closed: the message, or ``DecodeError`` if it never completed."""
        if self.message is None:
            raise DecodeError("truncated" if self._buf else "empty", "stream closed early")
        return self.message


def decode_stream(buf: bytes, *, keyring: Keyring | None = None) -> Message:
    """Decode a complete stream (e.g. read to EOF from a serf responder)."""
    decoder = StreamDecoder(keyring)
    decoder.feed(buf)
    return decoder.eof()


__all__ = [
    "COMPOUND_PARTS_MAX",
    "CRC_MIN_PROTOCOL",
    "DEFAULT_VSN",
    "ENCRYPT_MSG_TYPE",
    "HAS_LABEL_MSG_TYPE",
    "PROTOCOL_VERSION_CURRENT",
    "PROTOCOL_VERSION_MAX",
    "PROTOCOL_VERSION_MIN",
    "DecodeError",
    "MessageType",
    "NodeState",
    "PushNodeState",
    "StreamDecoder",
    "add_crc",
    "decode_packet",
    "decode_packet_parts",
    "decode_stream",
    "encode_compound",
    "encode_compress",
    "encode_message",
    "encode_packet",
    "encode_stream",
    "stream_frame_length",
]
