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

This module is the codec's one import point; the code lives in parts, one per layer, so that
each stays small enough to read against the reference:

- ``wire_constants``: message types, protocol versions, size limits;
- ``wire_body``: go-msgpack encoding and lenient decoding of each message body;
- ``wire_lzw``: Go's compress/lzw, byte for byte;
- ``wire_packet``: UDP packets (compound, compression, CRC, encryption);
- ``wire_stream``: TCP streams (push/pull, the encrypted frame, the incremental decoder).

Import from here, not from the parts: their split is an implementation detail.
"""

from __future__ import annotations

from swarmnet.gossip.keyring import ENCRYPT_MSG_TYPE, stream_frame_length
from swarmnet.gossip.messages import DecodeError, NodeState, PushNodeState
from swarmnet.gossip.wire_body import encode_message
from swarmnet.gossip.wire_constants import (
    COMPOUND_PART_BYTES_MAX,
    COMPOUND_PARTS_MAX,
    COMPRESS_ALGO_LZW,
    CRC_MIN_PROTOCOL,
    DEFAULT_VSN,
    DELEGATE_VERSION_CURRENT,
    DELEGATE_VERSION_MAX,
    DELEGATE_VERSION_MIN,
    HAS_LABEL_MSG_TYPE,
    META_MAX_BYTES,
    NESTING_MAX,
    PACKET_DECOMPRESSED_MAX,
    PROTOCOL_VERSION_CURRENT,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    STREAM_BYTES_MAX,
    UDP_BUFFER_BYTES,
    UDP_RECEIVE_BYTES,
    VSN_LEN,
    MessageType,
)
from swarmnet.gossip.wire_lzw import lzw_compress, lzw_decompress
from swarmnet.gossip.wire_packet import (
    add_crc,
    decode_packet,
    decode_packet_parts,
    encode_compound,
    encode_compress,
    encode_packet,
)
from swarmnet.gossip.wire_stream import StreamDecoder, decode_stream, encode_stream

__all__ = [
    "COMPOUND_PARTS_MAX",
    "COMPOUND_PART_BYTES_MAX",
    "COMPRESS_ALGO_LZW",
    "CRC_MIN_PROTOCOL",
    "DEFAULT_VSN",
    "DELEGATE_VERSION_CURRENT",
    "DELEGATE_VERSION_MAX",
    "DELEGATE_VERSION_MIN",
    "ENCRYPT_MSG_TYPE",
    "HAS_LABEL_MSG_TYPE",
    "META_MAX_BYTES",
    "NESTING_MAX",
    "PACKET_DECOMPRESSED_MAX",
    "PROTOCOL_VERSION_CURRENT",
    "PROTOCOL_VERSION_MAX",
    "PROTOCOL_VERSION_MIN",
    "STREAM_BYTES_MAX",
    "UDP_BUFFER_BYTES",
    "UDP_RECEIVE_BYTES",
    "VSN_LEN",
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
    "lzw_compress",
    "lzw_decompress",
    "stream_frame_length",
]
