"""Key material for encrypted overlays, and how both ends of an SA agree on it (pure).

A ``Key`` is cluster-wide master material made by the managers (one schedule for every
encrypted network, as in swarmkit's ``networking:ipsec`` subsystem); a ``KeySet`` is what the
managers publish: every key a node must accept inbound, and the ``primary`` it sends with.

Per-SA material and SPIs are *derived*, so both ends compute the same values from what they
already know (the key set and the two VTEP addresses) and no message is exchanged per SA:

- ``sa_key(key, src, dst)`` = HKDF-SHA256(master, info = "swarmnet esp key" | src | dst |
  key_id), as long as the AES key plus the 4-byte rfc4106 salt. Every direction of every pair
  gets its own AES-GCM key and salt, so GCM nonces (salt | per-SA IV) can never repeat across
  SAs even though all SAs come from one master (Docker uses the same key for every SA).
- ``spi(key, src, dst)`` = 0x100 + (first 4 bytes of HMAC-SHA256(master, "swarmnet esp spi" |
  src | dst | key_id) as a big-endian uint32) mod (2^32 - 0x100). SPIs 0-255 are reserved
  (RFC 4303), hence the offset. Addresses enter as their packed bytes (4 for IPv4, 16 for
  IPv6) so "10.0.0.1" and "10.0.0.01" cannot differ. The SPI of (src, dst, key) is the same
  on both hosts; a receiver's SPIs are (peers x keys) values out of 2^32 - 256, so for 1,000
  peers and 2 keys a collision has a probability of about 5e-4: ``plan`` detects it (both
  ends compute the same collision) and raises ``SpiCollision``; the fix is a rotation (new key
  -> new SPIs), which the caller triggers. Nothing is silently shared.

The sender's **epoch** (a uint64, default 0) also enters both derivations. Why: every SA has
a replay window (see plan.py), so an SA that a sender deletes and re-creates with the same
SPI restarts its sequence numbers at 1 while the receiver remembers the old high mark and
drops everything as replays (seen in the VM lab: a restored SA carried nothing). A node
that lost or must rebuild its outbound SAs (agent restart with flushed XFRM, a corrupted
SA) therefore takes a new epoch, publishes it with its VTEP record, and every peer derives
new SPIs for it; SAs are never re-created under an old (key, epoch).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass, field

SALT_LEN = 4  # rfc4106: the key carries a 4-byte salt after the AES key
AES_LENGTHS = (16, 32)  # AES-128 (swarmkit's choice) or AES-256
SPI_MIN = 0x100
TAG_IPSEC = "networking:ipsec"


class KeyError_(ValueError):
    """Malformed key material or key set (a programming or storage error, never ignored)."""


class SpiCollision(Exception):
    """Two SAs towards the same receiver derived the same SPI; rotate to a new key."""

    def __init__(self, dst: str, spi: int, a: tuple, b: tuple):
        self.dst, self.spi, self.a, self.b = dst, spi, a, b
        super().__init__(f"SPI {spi:#010x} towards {dst} derived twice: {a} and {b}")


@dataclass(frozen=True)
class Key:
    """Master material. ``key_id`` is a generation number, unique and increasing (it enters
    every derivation, so a re-used material still gives new SAs); ``tag`` names the purpose."""

    key_id: int
    material: bytes = field(repr=False)  # never in a log line
    created_at: float = 0.0  # manager's wall clock, seconds; drives time-based rotation
    tag: str = TAG_IPSEC

    def __post_init__(self) -> None:
        if not 0 <= self.key_id < 1 << 32:
            raise KeyError_(f"key_id {self.key_id} is not a uint32")
        if len(self.material) not in AES_LENGTHS:
            raise KeyError_(f"key material must be {AES_LENGTHS} bytes, not {len(self.material)}")

    @property
    def aes_len(self) -> int:
        return len(self.material)

    def to_dict(self) -> dict:
        """For the Raft store and the mTLS node channel (never gossip)."""
        return {
            "key_id": self.key_id,
            "key": self.material.hex(),
            "created_at": self.created_at,
            "tag": self.tag,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Key:
        return cls(int(d["key_id"]), bytes.fromhex(d["key"]), float(d["created_at"]), d["tag"])


def generate_key(key_id: int, now: float, aes_len: int = 16) -> Key:
    """A fresh key from the OS CSPRNG (the only impure line here, and it touches no kernel
    object: callers that need determinism build ``Key`` themselves)."""
    if aes_len not in AES_LENGTHS:
        raise KeyError_(f"AES key length must be one of {AES_LENGTHS}")
    return Key(key_id, os.urandom(aes_len), now)


@dataclass(frozen=True)
class KeySet:
    """What managers publish (version increases with every change). Nodes install inbound
    SAs for every key and send with ``primary``; ``primary`` is always one of ``keys``."""

    version: int
    keys: tuple[Key, ...]
    primary: int  # a key_id

    def __post_init__(self) -> None:
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise KeyError_(f"duplicate key ids in {ids}")
        if self.primary not in ids:
            raise KeyError_(f"primary {self.primary} is not one of the keys {ids}")

    def key(self, key_id: int) -> Key:
        for k in self.keys:
            if k.key_id == key_id:
                return k
        raise KeyError_(f"no key {key_id}")

    @property
    def primary_key(self) -> Key:
        return self.key(self.primary)

    @property
    def ids(self) -> frozenset[int]:
        return frozenset(k.key_id for k in self.keys)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "keys": [k.to_dict() for k in self.keys],
            "primary": self.primary,
        }

    @classmethod
    def from_dict(cls, d: dict) -> KeySet:
        return cls(int(d["version"]), tuple(Key.from_dict(k) for k in d["keys"]), d["primary"])


def _addr(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def _info(label: bytes, key: Key, src: str, dst: str, epoch: int) -> bytes:
    return label + b"\0" + _addr(src) + _addr(dst) + struct.pack(">IQ", key.key_id, epoch)


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with an empty salt (the master is already uniformly random)."""
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def sa_key(key: Key, src: str, dst: str, epoch: int = 0) -> bytes:
    """AES key + 4-byte salt for the SA src -> dst under ``key`` (what ``ip xfrm`` gets);
    ``epoch`` is the sender's SA epoch (module docstring)."""
    info = _info(b"swarmnet esp key", key, src, dst, epoch)
    return _hkdf(key.material, info, key.aes_len + SALT_LEN)


def spi(key: Key, src: str, dst: str, epoch: int = 0) -> int:
    """The SPI of the SA src -> dst under ``key``; see the module docstring."""
    mac = hmac.new(key.material, _info(b"swarmnet esp spi", key, src, dst, epoch), hashlib.sha256)
    return SPI_MIN + int.from_bytes(mac.digest()[:4], "big") % ((1 << 32) - SPI_MIN)
