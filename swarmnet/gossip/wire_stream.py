"""memberlist's TCP streams: push/pull and the other stream messages, their optional
compression and encryption frame, and an incremental decoder that knows when the peer's
message is complete (memberlist never half-closes). Re-exported by
``swarmnet.gossip.wire``. Pure."""

from __future__ import annotations

from swarmnet.gossip.keyring import ENCRYPT_MSG_TYPE, Keyring, stream_frame_length
from swarmnet.gossip.messages import (
    Ack,
    DecodeError,
    Err,
    Message,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    User,
)
from swarmnet.gossip.wire_body import (
    _decode_body,
    _encode_body,
    _Fields,
    _pack,
    _uint,
    _unpack,
    _vsn,
)
from swarmnet.gossip.wire_constants import STREAM_BYTES_MAX, MessageType
from swarmnet.gossip.wire_packet import _decompress_body, encode_compress

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
