"""memberlist's keyring encryption (AES-GCM), byte-compatible with memberlist 0.2.2
(security.go, keyring.go; MEMBERLIST-WIRE.md sections 2.6 and 4.1).

Layouts:

- payload:  ``[vsn u8][nonce 12][AES-GCM(plaintext') || tag 16]`` where ``plaintext'`` is the
  plaintext PKCS#7-padded to a multiple of 16 for version 0 and unchanged for version 1.
- UDP packet: a payload with empty additional data (AAD).
- TCP stream: ``[0x0a][len u32 BE][payload]`` with AAD = those first 5 bytes.

Serf always *sends* version 1 (memberlist protocol 2); receivers accept 0 and 1. Encryption
uses the primary key; decryption tries every key, primary first, which is what lets a key be
rotated without a partition (install everywhere, use, then remove the old one).

Nonces come from an injected ``nonce_source`` (default ``os.urandom``) so that the simulator
can be deterministic; nothing here keeps module-level random state.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarmnet.gossip.messages import DecodeError

ENCRYPTION_VERSION_PADDED = 0  # memberlist protocol 1: PKCS#7 padding before GCM
ENCRYPTION_VERSION_PLAIN = 1  # memberlist protocol >= 2 (what serf sends): no padding
ENCRYPTION_VERSION_MAX = 1  # security.go rejects anything newer
ENCRYPTION_VERSION_SEND = ENCRYPTION_VERSION_PLAIN

KEY_SIZES = (16, 24, 32)  # AES-128/192/256 (keyring.go ValidateKey)
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_SIZE = 16  # PKCS#7 block for version 0
VERSION_SIZE = 1

# Stream framing: [ENCRYPT_MSG_TYPE][u32 length]; 10 is memberlist's encryptMsg type.
ENCRYPT_MSG_TYPE = 10
STREAM_HEADER_SIZE = 5
# memberlist refuses encrypted streams larger than maxPushStateBytes (net.go).
STREAM_ENCRYPTED_MAX = 20 * 1024 * 1024


class KeyringError(ValueError):
    """Caller misuse of the keyring: bad key size, using an unknown key, removing the primary."""


def encrypted_length(version: int, plain_len: int) -> int:
    """Bytes on the wire for a plaintext of ``plain_len`` (memberlist encryptedLength)."""
    if version >= ENCRYPTION_VERSION_PLAIN:
        return VERSION_SIZE + NONCE_SIZE + plain_len + TAG_SIZE
    padding = BLOCK_SIZE - plain_len % BLOCK_SIZE  # always 1..16: PKCS#7 pads a full block
    return VERSION_SIZE + NONCE_SIZE + plain_len + padding + TAG_SIZE


def validate_key(key: bytes) -> None:
    if len(key) not in KEY_SIZES:
        raise KeyringError(f"key size must be 16, 24 or 32 bytes, not {len(key)}")


def encrypt(version: int, key: bytes, msg: bytes, data: bytes, nonce: bytes) -> bytes:
    """memberlist encryptPayload: ``[version][nonce][GCM(msg', aad=data)]``."""
    validate_key(key)
    if version not in (ENCRYPTION_VERSION_PADDED, ENCRYPTION_VERSION_PLAIN):
        raise KeyringError(f"unsupported encryption version {version}")
    if len(nonce) != NONCE_SIZE:
        raise KeyringError("nonce must be 12 bytes")
    if version == ENCRYPTION_VERSION_PADDED:
        pad = BLOCK_SIZE - len(msg) % BLOCK_SIZE
        msg = msg + bytes([pad]) * pad
    sealed = AESGCM(key).encrypt(nonce, msg, data or None)
    return bytes([version]) + nonce + sealed


def decrypt(keys: Iterable[bytes], buf: bytes, data: bytes = b"") -> bytes:
    """memberlist decryptPayload: try every key (primary first); raise DecodeError with
    ``truncated``, ``bad_encryption_version`` or ``decrypt_failed``."""
    if not buf:
        raise DecodeError("empty")
    version = buf[0]
    if version > ENCRYPTION_VERSION_MAX:
        raise DecodeError("bad_encryption_version", str(version))
    if len(buf) < encrypted_length(version, 0):
        raise DecodeError("truncated", "shorter than the encryption overhead")
    nonce = buf[VERSION_SIZE : VERSION_SIZE + NONCE_SIZE]
    sealed = buf[VERSION_SIZE + NONCE_SIZE :]
    for key in keys:
        try:
            plain = AESGCM(key).decrypt(nonce, sealed, data or None)
        except InvalidTag:
            continue
        if version == ENCRYPTION_VERSION_PADDED:
            return _pkcs7_strip(plain)
        return plain
    raise DecodeError("decrypt_failed", "no installed key could decrypt the message")


def _pkcs7_strip(plain: bytes) -> bytes:
    # memberlist strips `last byte` bytes without checking them; the GCM tag already
    # authenticated the content, so only guard against an impossible length.
    if not plain:
        raise DecodeError("decrypt_failed", "empty padded plaintext")
    pad = plain[-1]
    if pad == 0 or pad > BLOCK_SIZE or pad > len(plain):
        raise DecodeError("decrypt_failed", "bad padding")
    return plain[:-pad]


class Keyring:
    """The installed keys, primary first (memberlist keyring.go). Not thread-safe: it lives
    on the loop thread with the core."""

    def __init__(
        self,
        keys: Sequence[bytes] = (),
        primary: bytes | None = None,
        *,
        nonce_source: Callable[[int], bytes] = os.urandom,
    ):
        self._keys: list[bytes] = []
        self._nonce_source = nonce_source
        for key in keys:
            self.install(key)
        if primary is not None:
            self.install(primary)
            self.use(primary)

    @property
    def keys(self) -> list[bytes]:
        """Installed keys, primary first (the order decryption tries them)."""
        return list(self._keys)

    @property
    def primary_key(self) -> bytes | None:
        return self._keys[0] if self._keys else None

    def __bool__(self) -> bool:
        return bool(self._keys)

    def install(self, key: bytes) -> None:
        """Add a key for decryption; the first key ever installed becomes primary."""
        validate_key(key)
        if key not in self._keys:
            self._keys.append(bytes(key))

    def use(self, key: bytes) -> None:
        """Make an installed key the primary (the one we encrypt with)."""
        if key not in self._keys:
            raise KeyringError("requested key is not in the keyring")
        self._keys.remove(key)
        self._keys.insert(0, bytes(key))

    def remove(self, key: bytes) -> None:
        """Drop a key. Removing the primary is refused, as memberlist does: switch first."""
        if self._keys and key == self._keys[0]:
            raise KeyringError("removing the primary key is not allowed")
        if key in self._keys:
            self._keys.remove(key)

    def _primary(self) -> bytes:
        if not self._keys:
            raise KeyringError("keyring is empty")
        return self._keys[0]

    def encrypt_packet(self, plain: bytes, version: int = ENCRYPTION_VERSION_SEND) -> bytes:
        """A UDP payload as memberlist sends it (empty AAD)."""
        return encrypt(version, self._primary(), plain, b"", self._nonce_source(NONCE_SIZE))

    def decrypt_packet(self, buf: bytes) -> bytes:
        return decrypt(self._keys, buf, b"")

    def encrypt_stream(self, plain: bytes, version: int = ENCRYPTION_VERSION_SEND) -> bytes:
        """``[0x0a][len u32][payload]`` with the 5-byte header as AAD (memberlist
        encryptLocalState)."""
        header = struct.pack(">BI", ENCRYPT_MSG_TYPE, encrypted_length(version, len(plain)))
        nonce = self._nonce_source(NONCE_SIZE)
        return header + encrypt(version, self._primary(), plain, header, nonce)

    def decrypt_stream(self, frame: bytes) -> bytes:
        """Decrypt a whole ``[0x0a][len][payload]`` frame (see ``stream_frame_length`` to know
        how many bytes to wait for)."""
        total = stream_frame_length(frame)
        if total is None or len(frame) < total:
            raise DecodeError("truncated", "incomplete encrypted stream frame")
        return decrypt(self._keys, frame[STREAM_HEADER_SIZE:total], frame[:STREAM_HEADER_SIZE])


def stream_frame_length(head: bytes) -> int | None:
    """Total length of an encrypted stream frame given at least its 5-byte header, None if
    fewer bytes are known. Raises DecodeError for a wrong type or an oversized frame."""
    if head and head[0] != ENCRYPT_MSG_TYPE:
        raise DecodeError("not_encrypted", "stream does not start with the encrypt type")
    if len(head) < STREAM_HEADER_SIZE:
        return None
    (length,) = struct.unpack_from(">I", head, 1)
    if length > STREAM_ENCRYPTED_MAX:
        raise DecodeError("oversized", f"encrypted stream of {length} bytes")
    return STREAM_HEADER_SIZE + length


__all__ = [
    "ENCRYPTION_VERSION_MAX",
    "ENCRYPTION_VERSION_PADDED",
    "ENCRYPTION_VERSION_PLAIN",
    "ENCRYPTION_VERSION_SEND",
    "ENCRYPT_MSG_TYPE",
    "KEY_SIZES",
    "Keyring",
    "KeyringError",
    "decrypt",
    "encrypt",
    "encrypted_length",
    "stream_frame_length",
    "validate_key",
]
