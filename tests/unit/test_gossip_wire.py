"""memberlist wire codec: golden bytes captured from Debian's serf 0.9.4 agent
(/work/shared/MEMBERLIST-WIRE.md), round trips of every message, and fuzzing of every decoder
(any bytes give messages or a DecodeError, never another exception)."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmnet.gossip import wire
from swarmnet.gossip.keyring import (
    Keyring,
    KeyringError,
    decrypt,
    encrypt,
    encrypted_length,
)
from swarmnet.gossip.messages import (
    DECODE_REASONS,
    Ack,
    Alive,
    Dead,
    DecodeError,
    Err,
    IndirectPing,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
    bytes_to_ip,
    ip_to_bytes,
)
from swarmnet.gossip.wire import DEFAULT_VSN, MessageType, StreamDecoder

h = bytes.fromhex

# --- golden vectors (MEMBERLIST-WIRE.md, all "verified" against the serf agent) ----------

KEY = h("e7db336ac2e5727046b96ca125e4e7c3aa6c5fff8d7e27f5e811d06fd3336ac2")
SERF_PING = h(
    "0085a44e6f6465a56e6f646541a55365714e6f01aa536f7572636541646472a47f000001"
    "aa536f757263654e6f6465a56e6f646542aa536f75726365506f7274cd461b"
)
USER_EVENT = b"\x08\x03\x84\xa2CC\xc3\xa5LTime\x01\xa4Name\xa6deploy\xa7Payload\xadhello-payload"
CRC_USER_EVENT = h("0cd0174c71") + USER_EVENT
COMPOUND_PING_EVENT = (
    h("07020043 0030".replace(" ", ""))
    + b"\x00\x85\xa4Node\xa5nodeB\xa5SeqNo\x02\xaaSourceAddr\xa4\x7f\x00\x00\x01"
    + b"\xaaSourceNode\xa5nodeA\xaaSourcePort\xcd\x46\x1a"
    + USER_EVENT
)
SERF_ALIVE = (
    b"\x04\x86\xa4Addr\xa4\x7f\x00\x00\x01\xabIncarnation\x01\xa4Meta\xa2\xff\x80"
    b"\xa4Node\xa5nodeB\xa4Port\xcd\x46\x1b\xa3Vsn\xa6\x01\x05\x02\x02\x05\x05"
)
ENCRYPTED_NACK = h("01530d7a599d005511b320b6265ec2d6c1bd260a56cfe2516193c6d7c4a7c47440477b4c07e4")
ENCRYPTED_TCP_ACK = h(
    "0a0000004101"
    "15d945df8632bfe1a0f0826a542f6252c292e715e3ebc56a3013bb3d93e7188cf95a82b932e2ab7e65a6"
    "6ad4b77375e5be929faf52f1a44cfbc0c9a3756a981b"
)
COMPRESSED_TCP_ACK = h("0982a4416c676f00a3427566b70005083a05254c1e366fc29001566a4a99384ede180808")
TCP_ACK = b"\x02\x82\xa7Payload\xc0\xa5SeqNo\x06"
PUSH_PULL_HEAD = (
    b"\x06\x83\xa4Join\xc3\xa5Nodes\x01\xacUserStateLen\xcd\x02\x4d"
    b"\x87\xa4Addr\xa4\x7f\x00\x00\x01\xabIncarnation\x01\xa4Meta\xa2\xff\x80\xa4Name\xa5nodeB"
    b"\xa4Port\xcd\x46\x1b\xa5State\x00\xa3Vsn\xa6\x01\x05\x02\x02\x05\x05"
)


def test_serf_ping_decodes_and_reencodes_byte_for_byte() -> None:
    [ping] = wire.decode_packet(SERF_PING)
    assert ping == Ping(1, "nodeA", b"\x7f\x00\x00\x01", 17947, "nodeB")
    assert wire.encode_message(ping) == SERF_PING
    assert len(SERF_PING) == 67


def test_serf_compound_ping_with_piggybacked_event() -> None:
    assert len(COMPOUND_PING_EVENT) == 121
    msgs = wire.decode_packet(COMPOUND_PING_EVENT)
    assert msgs == [Ping(2, "nodeB", b"\x7f\x00\x00\x01", 17946, "nodeA"), User(USER_EVENT[1:])]
    assert wire.encode_packet(msgs) == COMPOUND_PING_EVENT


def test_serf_crc_gossip() -> None:
    assert len(CRC_USER_EVENT) == 53
    assert wire.decode_packet(CRC_USER_EVENT) == [User(USER_EVENT[1:])]
    assert wire.encode_packet([User(USER_EVENT[1:])], crc=True) == CRC_USER_EVENT
    tampered = CRC_USER_EVENT[:-1] + b"X"
    with pytest.raises(DecodeError) as exc:
        wire.decode_packet(tampered)
    assert exc.value.reason == "bad_crc"


def test_serf_alive_and_default_vsn() -> None:
    [alive] = wire.decode_packet(SERF_ALIVE)
    assert alive == Alive(1, "nodeB", ip_to_bytes("127.0.0.1"), 17947, b"\xff\x80", DEFAULT_VSN)
    assert wire.encode_message(alive) == SERF_ALIVE
    assert b"\xa3Vsn\xa6\x01\x05\x02\x02\x05\x05" in SERF_ALIVE  # Vsn is a str, not an array


def test_small_golden_bodies() -> None:
    assert wire.encode_message(Nack(4)) == b"\x0b\x81\xa5SeqNo\x04"
    assert wire.encode_message(Suspect(3, "b", "a")) == (
        b"\x03\x83\xa4From\xa1a\xabIncarnation\x03\xa4Node\xa1b"
    )
    # Serf join intent as a memberlist user message: opaque bytes for the delegate.
    intent = b"\x08\x01\x82\xa5LTime\x01\xa4Node\xa5nodeB"
    assert wire.decode_packet(intent) == [User(intent[1:])]


def test_serf_encrypted_nack_packet() -> None:
    ring = Keyring([KEY])
    assert ring.decrypt_packet(ENCRYPTED_NACK) == h("0b81a55365714e6f04")
    assert wire.decode_packet(ENCRYPTED_NACK, keyring=ring) == [Nack(4)]


def test_serf_encrypted_compressed_tcp_ack() -> None:
    ring = Keyring([KEY])
    assert len(ENCRYPTED_TCP_ACK) == 70
    assert ring.decrypt_stream(ENCRYPTED_TCP_ACK) == COMPRESSED_TCP_ACK
    assert wire.decode_stream(ENCRYPTED_TCP_ACK, keyring=ring) == Ack(6, None)
    assert wire.decode_stream(COMPRESSED_TCP_ACK) == Ack(6, None)
    # LZW is deterministic: our writer reproduces Go 1.19's buffer (leading clear code).
    assert wire.encode_stream(Ack(6, None), compress=True) == COMPRESSED_TCP_ACK
    assert wire.encode_stream(Ack(6, None)) == TCP_ACK
    # The same plaintext with the capture's nonce gives serf's ciphertext exactly.
    nonce = ENCRYPTED_TCP_ACK[6:18]
    fixed = Keyring([KEY], nonce_source=lambda n: nonce)
    assert fixed.encrypt_stream(COMPRESSED_TCP_ACK) == ENCRYPTED_TCP_ACK


def test_serf_join_push_pull_header_and_state() -> None:
    user_state = b"\x02\x86" + bytes(587)  # capture's 589-byte user state, contents elided
    stream = PUSH_PULL_HEAD + user_state
    msg = wire.decode_stream(stream)
    assert msg == PushPull(
        join=True,
        states=(
            PushNodeState(
                "nodeB", h("7f000001"), 17947, b"\xff\x80", 1, NodeState.ALIVE, DEFAULT_VSN
            ),
        ),
        user_state=user_state,
    )
    assert wire.encode_stream(msg) == stream


# --- round trips -------------------------------------------------------------------------

# Node names: any text, or any bytes (Go strings are bytes) carried by surrogateescape.
text_names = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
byte_names = st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape"))
names = text_names | byte_names
addrs = st.sampled_from([b"", ip_to_bytes("127.0.0.1"), ip_to_bytes("::1")])
u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
vsns = st.binary(min_size=6, max_size=6)
packet_msgs = st.one_of(
    st.builds(Ping, u32, names, addrs, u16, names),
    st.builds(IndirectPing, u32, addrs, u16, names, st.booleans(), addrs, u16, names),
    st.builds(Ack, u32, st.none() | st.binary(max_size=80)),
    st.builds(Nack, u32),
    st.builds(Suspect, u32, names, names),
    st.builds(Alive, u32, names, addrs, u16, st.binary(max_size=40), vsns),
    st.builds(Dead, u32, names, names),
    st.builds(User, st.binary(max_size=100)),
)
states = st.builds(
    PushNodeState, names, addrs, u16, st.binary(max_size=20), u32, st.sampled_from(NodeState), vsns
)
stream_msgs = st.one_of(
    st.builds(Ping, u32, names, addrs, u16, names),
    st.builds(Ack, u32, st.none() | st.binary(max_size=80)),
    st.builds(Err, names),
    st.builds(User, st.binary(max_size=100)),
    st.builds(
        PushPull, st.booleans(), st.lists(states, max_size=5).map(tuple), st.binary(max_size=50)
    ),
)


@given(st.lists(packet_msgs, min_size=1, max_size=8), st.booleans(), st.booleans())
@settings(max_examples=300)
def test_packet_round_trip(msgs: list, crc: bool, compress: bool) -> None:
    assert wire.decode_packet(wire.encode_packet(msgs, crc=crc, compress=compress)) == msgs


@given(packet_msgs)
def test_encrypted_packet_round_trip(msg: object) -> None:
    ring = Keyring([KEY])
    buf = wire.encode_packet([msg], keyring=ring)
    assert buf[0] == 1
    assert wire.decode_packet(buf, keyring=ring) == [msg]


@given(stream_msgs, st.booleans(), st.booleans(), st.integers(1, 64))
@settings(max_examples=300)
def test_stream_round_trip_in_chunks(msg: object, compress: bool, encrypt_: bool, chunk: int):
    ring = Keyring([KEY]) if encrypt_ else None
    buf = wire.encode_stream(msg, compress=compress, keyring=ring)  # type: ignore[arg-type]
    decoder = StreamDecoder(ring)
    got = None
    for i in range(0, len(buf), chunk):
        got = decoder.feed(buf[i : i + chunk])
        if got is not None:
            assert i + chunk >= len(buf)
    assert got == msg
    assert decoder.eof() == msg and decoder.rest == b""


@given(st.binary(max_size=3000))
def test_lzw_round_trip(data: bytes) -> None:
    assert wire.lzw_decompress(wire.lzw_compress(data), 10**6) == data


def test_lzw_round_trip_past_table_reset() -> None:
    data = bytes(range(256)) * 40 + bytes((i * 7919) % 251 for i in range(60000))
    assert wire.lzw_decompress(wire.lzw_compress(data), 10**7) == data


def test_ip_helpers() -> None:
    assert bytes_to_ip(ip_to_bytes("10.1.2.3")) == "10.1.2.3"
    assert bytes_to_ip(ip_to_bytes("::ffff:10.1.2.3")) == "10.1.2.3"  # serf bound to 0.0.0.0
    assert bytes_to_ip(ip_to_bytes("fe80::1")) == "fe80::1"
    with pytest.raises(ValueError):
        bytes_to_ip(b"\x01\x02")


# --- Go leniency we mirror ---------------------------------------------------------------


def test_decoder_accepts_go_variants() -> None:
    body = {
        b"Addr": [127, 0, 0, 1],  # []byte as an int array
        b"Incarnation": 2,
        b"Meta": None,  # nil
        b"Node": "n",  # str8-capable packer
        b"Port": 7946,
        b"Vsn": list(DEFAULT_VSN),
        b"Extra": "ignored",  # unknown keys are skipped
    }
    buf = b"\x04" + msgpack.packb(body, use_bin_type=True)
    assert wire.decode_packet(buf) == [Alive(2, "n", h("7f000001"), 7946, b"", DEFAULT_VSN)]
    ping = b"\x00" + msgpack.packb({"SeqNo": 9}, use_bin_type=True)
    assert wire.decode_packet(ping) == [Ping(9, "")]  # missing keys are zero values


def test_encoder_refuses_what_crashes_serf() -> None:
    with pytest.raises(ValueError):
        wire.encode_message(Alive(1, "n", b"", 0, b"", b"\x01\x05"))
    with pytest.raises(ValueError):
        wire.encode_compound([wire.encode_message(Nack(1))] * 128)
    with pytest.raises(ValueError):
        wire.encode_compound([b""])
    with pytest.raises(ValueError):
        wire.encode_message(Ping(2**32, "n"))
    with pytest.raises(ValueError):
        wire.add_crc(b"")


def test_compress_only_when_shorter_on_udp() -> None:
    small = wire.encode_packet([Nack(1)], compress=True)
    assert small[0] == MessageType.NACK_RESP
    big = User(b"A" * 500)
    packed = wire.encode_packet([big], compress=True)
    assert packed[0] == MessageType.COMPRESS and wire.decode_packet(packed) == [big]


# --- bad input: each rejected with its reason ---------------------------------------------


def reason_of(buf: bytes, **kw: object) -> str:
    with pytest.raises(DecodeError) as exc:
        wire.decode_packet(buf, **kw)  # type: ignore[arg-type]
    assert exc.value.reason in DECODE_REASONS
    return exc.value.reason


def test_bad_packets_have_reasons() -> None:
    nack = wire.encode_message(Nack(1))
    assert reason_of(b"") == "empty"
    assert reason_of(b"\x63") == "unknown_type"
    assert reason_of(bytes([wire.HAS_LABEL_MSG_TYPE, 1, 65]) + nack) == "unknown_type"
    assert reason_of(b"\x06\x80") == "unknown_type"  # push/pull is TCP only
    assert reason_of(b"\x00\xc1") == "bad_msgpack"
    assert reason_of(nack + b"\x00") == "trailing"
    assert reason_of(b"\x00\x91\x01") == "bad_field"
    assert reason_of(b"\x0b" + msgpack.packb({"SeqNo": -1})) == "bad_field"
    assert reason_of(b"\x0b" + msgpack.packb({"SeqNo": 2**32})) == "bad_field"
    short_vsn = b"\x04" + msgpack.packb({"Node": "n", "Vsn": b"\x01\x05"})
    assert reason_of(short_vsn) == "bad_vsn"
    assert reason_of(b"\x0c\x00\x00") == "truncated"
    assert reason_of(b"\x0c" + struct.pack(">I", zlib.crc32(b""))) == "empty"
    assert reason_of(b"\x07\x02\x00\x05") == "truncated"
    assert reason_of(b"\x07\x01\x00\x00") == "empty"
    nested = nack
    for _ in range(wire.NESTING_MAX + 1):
        nested = wire.encode_compound([nested])
    assert reason_of(nested) == "too_deep"
    bad_algo = b"\x09" + msgpack.packb({"Algo": 1, "Buf": b"x"})
    assert reason_of(bad_algo) == "bad_compression"
    assert reason_of(b"\x09" + msgpack.packb({"Algo": 0, "Buf": b"\x00"})) == "bad_compression"


def test_compound_keeps_good_parts_like_memberlist() -> None:
    good = wire.encode_message(Nack(7))
    buf = wire.encode_compound([good, b"\x63", good])
    msgs, errors = wire.decode_packet_parts(buf)
    assert msgs == [Nack(7), Nack(7)] and [e.reason for e in errors] == ["unknown_type"]
    cut = wire.encode_compound([good, good])[:-2]
    msgs, errors = wire.decode_packet_parts(cut)
    assert msgs == [Nack(7)] and [e.reason for e in errors] == ["truncated"]


def test_decompression_bomb_is_oversized() -> None:
    bomb = wire.encode_compress(b"\x08" + bytes(wire.PACKET_DECOMPRESSED_MAX + 10))
    assert len(bomb) < 65536
    assert reason_of(bomb) == "oversized"


def test_wrong_key_tampered_and_plaintext_rejected() -> None:
    ring = Keyring([KEY])
    other = Keyring([bytes(16)])
    buf = wire.encode_packet([Nack(3)], keyring=ring)
    assert reason_of(buf, keyring=other) == "decrypt_failed"
    assert reason_of(buf[:-1] + bytes([buf[-1] ^ 1]), keyring=ring) == "decrypt_failed"
    assert reason_of(buf[:20], keyring=ring) == "truncated"
    assert reason_of(b"\x02" + buf[1:], keyring=ring) == "bad_encryption_version"
    # A plaintext UDP packet reads as a bogus version byte or as ciphertext: dropped either way.
    assert reason_of(wire.encode_packet([Nack(3)]), keyring=ring) == "bad_encryption_version"
    assert reason_of(SERF_PING, keyring=ring) == "decrypt_failed"
    stream = wire.encode_stream(Ack(1), keyring=ring)
    for keyring, reason in ((other, "decrypt_failed"), (None, "decrypt_failed")):
        with pytest.raises(DecodeError) as exc:
            wire.decode_stream(stream, keyring=keyring)
        assert exc.value.reason == reason
    with pytest.raises(DecodeError) as exc:
        wire.decode_stream(wire.encode_stream(Ack(1)), keyring=ring)
    assert exc.value.reason == "not_encrypted"


def test_bad_streams_have_reasons() -> None:
    def stream_reason(buf: bytes) -> str:
        with pytest.raises(DecodeError) as exc:
            wire.decode_stream(buf)
        return exc.value.reason

    full = wire.encode_stream(PushPull(True, (), b"user"))
    for cut in range(len(full)):
        assert stream_reason(full[:cut]) in ("empty", "truncated")
    huge = b"\x06" + msgpack.packb({"Join": False, "Nodes": 0, "UserStateLen": 2**30})
    assert stream_reason(huge) == "oversized"
    frame = b"\x0a" + struct.pack(">I", 2**31)
    with pytest.raises(DecodeError) as exc:
        StreamDecoder(Keyring([KEY])).feed(frame)
    assert exc.value.reason == "oversized"
    assert stream_reason(b"\x04\x80") == "unknown_type"  # alive never opens a stream
    assert stream_reason(b"\x06" + msgpack.packb({"Nodes": -1})) == "bad_field"
    assert stream_reason(b"\x02\xc1") == "bad_msgpack"
    double = wire.encode_compress(wire.encode_compress(TCP_ACK))
    assert stream_reason(double) == "unknown_type"  # memberlist decompresses once


# --- fuzz: any bytes -> messages or DecodeError, in bounded time ---------------------------

FUZZ = settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _mutations(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings with a few bytes flipped, cut or appended: reaches deep code paths
    that pure random bytes rarely do."""

    def mutate(buf: bytes, data: st.DataObject) -> bytes:
        b = bytearray(buf)
        for _ in range(data.draw(st.integers(0, 4))):
            if b:
                i = data.draw(st.integers(0, len(b) - 1))
                b[i] = data.draw(st.integers(0, 255))
        return bytes(b[: data.draw(st.integers(0, len(b)))]) + data.draw(st.binary(max_size=4))

    return st.tuples(valid, st.data()).map(lambda t: mutate(*t))


packets_bytes = st.lists(packet_msgs, min_size=1, max_size=4).map(
    lambda m: wire.encode_packet(m, crc=False, compress=True)
)


@FUZZ
@given(st.binary(max_size=600) | _mutations(packets_bytes))
def test_fuzz_decode_packet(buf: bytes) -> None:
    msgs, errors = wire.decode_packet_parts(buf)
    assert all(e.reason in DECODE_REASONS for e in errors)
    try:
        wire.decode_packet(buf)
    except DecodeError as exc:
        assert exc.reason in DECODE_REASONS


@FUZZ
@given(
    st.binary(max_size=600) | _mutations(stream_msgs.map(lambda m: wire.encode_stream(m))),
    st.integers(1, 50),
)
def test_fuzz_stream_decoder(buf: bytes, chunk: int) -> None:
    decoder = StreamDecoder()
    try:
        for i in range(0, len(buf), chunk):
            decoder.feed(buf[i : i + chunk])
        decoder.eof()
    except DecodeError as exc:
        assert exc.reason in DECODE_REASONS


@FUZZ
@given(st.binary(max_size=300) | _mutations(packet_msgs.map(wire.encode_message)))
def test_fuzz_decrypt(buf: bytes) -> None:
    ring = Keyring([KEY])
    for attempt in (
        lambda: wire.decode_packet(buf, keyring=ring),
        lambda: wire.decode_stream(buf, keyring=ring),
    ):
        try:
            attempt()
        except DecodeError as exc:
            assert exc.reason in DECODE_REASONS


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_lzw(buf: bytes) -> None:
    try:
        wire.lzw_decompress(buf, 100_000)
    except DecodeError as exc:
        assert exc.reason in ("bad_compression", "oversized")


# --- keyring -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
@pytest.mark.parametrize("version", [0, 1])
def test_encrypt_versions_and_overhead(size: int, version: int) -> None:
    key = bytes(range(size))
    for n in (0, 1, 15, 16, 17, 100):
        msg = bytes(n)
        out = encrypt(version, key, msg, b"aad", bytes(12))
        assert len(out) == encrypted_length(version, n)
        assert decrypt([bytes(size), key], out, b"aad") == msg
        with pytest.raises(DecodeError):
            decrypt([key], out, b"other aad")
    assert encrypted_length(1, 0) == 29 and encrypted_length(0, 0) == 45


def test_keyring_rotation() -> None:
    k1, k2, k3 = bytes([1]) * 16, bytes([2]) * 24, bytes([3]) * 32
    ring = Keyring([k1])
    old = ring.encrypt_packet(b"hello")
    ring.install(k2)
    assert ring.primary_key == k1
    ring.use(k2)
    assert ring.keys == [k2, k1]
    assert ring.decrypt_packet(old) == b"hello"  # old key still decrypts during rotation
    new = ring.encrypt_packet(b"world")
    assert Keyring([k2]).decrypt_packet(new) == b"world"
    with pytest.raises(KeyringError):
        ring.remove(k2)
    ring.remove(k1)
    with pytest.raises(DecodeError):
        ring.decrypt_packet(old)
    with pytest.raises(KeyringError):
        ring.use(k3)
    with pytest.raises(KeyringError):
        ring.install(b"short")
    assert Keyring([k1, k3], primary=k3).keys == [k3, k1]
    with pytest.raises(KeyringError):
        Keyring().encrypt_packet(b"x")
