"""memberlist's UDP packets: compound, compression, CRC and encryption layered around the
message bodies of ``wire_body``, and their decoding the way memberlist handles a datagram.
Re-exported by ``swarmnet.gossip.wire``. Pure."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from swarmnet.gossip.keyring import Keyring
from swarmnet.gossip.messages import DecodeError, Message, User
from swarmnet.gossip.wire_body import _decode_body, _Fields, _pack, _unpack, encode_message
from swarmnet.gossip.wire_constants import (
    COMPOUND_PART_BYTES_MAX,
    COMPOUND_PARTS_MAX,
    COMPRESS_ALGO_LZW,
    NESTING_MAX,
    PACKET_DECOMPRESSED_MAX,
    MessageType,
)
from swarmnet.gossip.wire_lzw import lzw_compress, lzw_decompress


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
