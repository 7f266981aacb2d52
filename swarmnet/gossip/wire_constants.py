"""memberlist's wire constants (memberlist 0.2.2, as in Debian's serf 0.9.4): message type
bytes, protocol versions and the size limits every codec part shares. Re-exported by
``swarmnet.gossip.wire``; the byte-level reference is /work/shared/MEMBERLIST-WIRE.md."""

from __future__ import annotations

from enum import IntEnum


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
