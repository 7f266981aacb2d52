"""Join tokens in Docker's format, and pinning the CA with them.

``SWMTKN-1-<digest>-<secret>`` (swarmkit ``ca.GenerateJoinToken``, v1 format):

- ``digest``: the SHA-256 of the root CA certificate as a base-36 number, zero-padded to 50
  characters (ceil(log36(2^256)) = 50);
- ``secret``: 16 random bytes (128 bits) as a base-36 number, zero-padded to 25 characters
  (ceil(log36(2^128)) = 25).

One deliberate difference: swarmkit hashes the CA's PEM bytes (``digest.FromBytes(certBytes)``
in ``NewRootCA``); we hash its DER, so the digest does not change when the same certificate is
re-encoded (line endings, a trailing newline, a bundle re-read from disk). A Docker node never
joins a swarmnet cluster, so nothing depends on the PEM hash.

The digest is not secret (it names the CA); the secret is. A joining node first fetches the
CA certificate without verifying anything, checks its digest against the token
(``verify_ca_against_token``), and only then talks to the manager, pinned to that CA, and
sends the token. Sending the token before pinning would hand it to whoever answered first.

Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarmnet.pki.ca import RootCA
from swarmnet.pki.errors import CAPinMismatch, InvalidToken, PKIConfigError

TOKEN_PREFIX = "SWMTKN"
TOKEN_VERSION = "1"
DIGEST_LEN = 50  # swarmkit base36DigestLen
SECRET_LEN = 25  # swarmkit maxGeneratedSecretLength
SECRET_BYTES = 16  # swarmkit generatedSecretEntropyBytes
ROLES = ("worker", "manager")

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_TOKEN_RE = re.compile(rf"^SWMTKN-1-([0-9a-z]{{{DIGEST_LEN}}})-([0-9a-z]{{{SECRET_LEN}}})$")


def b36(n: int, width: int) -> str:
    """``n`` in base 36 (Go's big.Int.Text(36): digits then lowercase), zero-padded."""
    if n < 0:
        raise PKIConfigError("base36 of a negative number")
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_B36[r])
    s = "".join(reversed(out)) or "0"
    if len(s) > width:
        raise PKIConfigError(f"{len(s)} base36 digits do not fit in {width}")
    return s.rjust(width, "0")


def ca_digest(ca_cert_pem: bytes) -> str:
    """The token digest of a CA certificate: base36(SHA-256(DER)), 50 characters."""
    try:
        cert = x509.load_pem_x509_certificates(ca_cert_pem)[0]
    except (ValueError, IndexError) as e:
        raise CAPinMismatch(f"not a PEM certificate: {e}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return b36(int.from_bytes(hashlib.sha256(der).digest(), "big"), DIGEST_LEN)


def new_secret() -> str:
    """A fresh token secret: 128 random bits as 25 base36 characters. Rotating a token is
    replacing its secret with this; the digest stays until the CA itself changes."""
    return b36(int.from_bytes(secrets.token_bytes(SECRET_BYTES), "big"), SECRET_LEN)


@dataclass(frozen=True)
class JoinToken:
    digest: str
    secret: str = ""

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}-{TOKEN_VERSION}-{self.digest}-{self.secret}"

    def __repr__(self) -> str:  # never log a secret by accident
        return f"JoinToken(digest={self.digest!r}, secret=<{len(self.secret)} chars>)"


def format_token(digest: str, secret: str) -> str:
    """Assemble a token from a CA digest and a secret, checking both."""
    return str(parse_token(f"{TOKEN_PREFIX}-{TOKEN_VERSION}-{digest}-{secret}"))


def generate_token(ca_cert_pem: bytes) -> str:
    """A new token for the CA: its digest and a fresh secret."""
    return format_token(ca_digest(ca_cert_pem), new_secret())


def parse_token(token: object) -> JoinToken:
    """Parse and validate. Surrounding whitespace is dropped (a copy-paste habit) and the
    token is lower-cased (base36 is case-insensitive, as Go's SetString(..., 36) is).
    Raises InvalidToken; its message never repeats the token."""
    if not isinstance(token, str):
        raise InvalidToken("invalid join token: it must be a string")
    t = token.strip()
    if t.startswith(f"{TOKEN_PREFIX}-2-"):
        raise InvalidToken("invalid join token: SWMTKN-2 (FIPS) tokens are not supported")
    if len(t) > 128:
        raise InvalidToken("invalid join token: too long")
    prefix, rest = t[:9], t[9:].lower()
    m = _TOKEN_RE.match(prefix + rest)
    if m is None:
        raise InvalidToken(
            "invalid join token: it must look like SWMTKN-1-<50 base36 characters>-"
            "<25 base36 characters>"
        )
    return JoinToken(m.group(1), m.group(2))


def _eq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def tokens_equal(presented: str, expected: str) -> bool:
    """Constant-time comparison of two tokens (after normalising the presented one)."""
    try:
        p = parse_token(presented)
    except InvalidToken:
        return False
    return _eq(str(p), expected)


def role_for_token(presented: object, tokens: Mapping[str, str]) -> str:
    """The role ("worker"/"manager") whose token this is, for a join.

    ``tokens`` maps role -> full token (``{"worker": "SWMTKN-1-...", "manager": ...}``).
    Every candidate is compared in constant time and none is skipped, so the time taken
    does not tell which part of a guess was right. Raises InvalidToken, or CAPinMismatch
    when the token is well-formed but names another CA (another swarm, or a CA since
    rotated): that sentence helps an operator and gives away nothing (digests are public).
    """
    p = parse_token(presented)
    found = None
    digest_ok = False
    for role in sorted(tokens):
        e = parse_token(tokens[role])
        d = _eq(p.digest, e.digest)
        s = _eq(p.secret, e.secret)
        digest_ok |= d
        if d and s:
            found = role
    if found is not None:
        return found
    if not digest_ok:
        raise CAPinMismatch(
            "invalid join token: it was made for another swarm's CA (or the CA was rotated)"
        )
    raise InvalidToken("invalid join token: it does not match this swarm's tokens")


def rotate(tokens: Mapping[str, str], role: str) -> dict[str, str]:
    """``swarm join-token --rotate``: a new secret for one role, same digest. Nodes that
    joined with the old token keep working (they hold certificates, not tokens)."""
    if role not in ROLES:
        raise PKIConfigError(f"unknown role {role!r}: worker or manager")
    out = dict(tokens)
    out[role] = format_token(parse_token(tokens[role]).digest, new_secret())
    return out


def new_tokens(ca_cert_pem: bytes) -> dict[str, str]:
    """Both tokens for a new cluster (``swarm init``)."""
    digest = ca_digest(ca_cert_pem)
    return {role: format_token(digest, new_secret()) for role in ROLES}


def verify_ca_against_token(ca_cert_pem: bytes, token: object) -> bytes:
    """Bootstrap pinning: accept ``ca_cert_pem`` (fetched over an unverified connection)
    only if its digest is the one in ``token``. Returns the CA certificate as PEM (only the
    first certificate of what was received, re-encoded, so nothing extra rides along).
    Raises InvalidToken or CAPinMismatch; on either, send the manager nothing."""
    want = parse_token(token).digest
    try:
        cert = x509.load_pem_x509_certificates(ca_cert_pem)[0]
    except (ValueError, IndexError, TypeError):
        raise CAPinMismatch("the manager did not send a PEM CA certificate") from None
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if not _eq(ca_digest(pem), want):
        raise CAPinMismatch(
            "the manager's CA certificate does not match the join token's digest: wrong "
            "swarm, a rotated CA, or someone in the middle; nothing was sent"
        )
    # The digest proves it is the CA the token names; from_pem checks it is a CA at all.
    RootCA.from_pem(pem)
    return pem


__all__ = [
    "DIGEST_LEN",
    "ROLES",
    "SECRET_LEN",
    "JoinToken",
    "b36",
    "ca_digest",
    "format_token",
    "generate_token",
    "new_secret",
    "new_tokens",
    "parse_token",
    "role_for_token",
    "rotate",
    "tokens_equal",
    "verify_ca_against_token",
]
