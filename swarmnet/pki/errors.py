"""PKI errors, split by blame (STYLE 12): what the caller got wrong, what a peer presented
that we refuse. Each carries a sentence fit for an API error body or a log line; none ever
carries secret material (a token secret, a key)."""

from __future__ import annotations


class PKIError(Exception):
    """Base of every error this package raises."""


class PKIConfigError(PKIError, ValueError):
    """A caller-side misuse: bad validity, unknown role, a CA without its key asked to sign."""


class InvalidToken(PKIError):
    """A join token that is malformed (not ``SWMTKN-1-<50 base36>-<25 base36>``)."""


class CAPinMismatch(PKIError):
    """The CA certificate a manager offered does not hash to the digest in the join token:
    either the token belongs to another swarm (or a CA since rotated) or someone is in the
    middle. The joining node must stop and send nothing secret."""


class InvalidCSR(PKIError):
    """A certificate signing request that is malformed, badly signed or has a refused key."""


class CertificateRejected(PKIError):
    """A node certificate we refuse to trust. Subclasses say why."""


class UntrustedCertificate(CertificateRejected):
    """Not signed by this cluster's CA (another swarm, a forgery, a tampered certificate)."""


class ExpiredCertificate(CertificateRejected):
    """Outside its validity window (expired, or not yet valid: check the clocks)."""


class RevokedCertificate(CertificateRejected):
    """Its node was removed (``node rm``) or its serial was revoked."""


class RoleRejected(CertificateRejected):
    """Valid, but the role in it is not allowed here (a worker calling a manager-only path,
    a worker certificate serving as a manager)."""


class NoPeerCertificate(CertificateRejected):
    """The peer presented no certificate, or the connection did not verify the one it did."""


__all__ = [
    "CAPinMismatch",
    "CertificateRejected",
    "ExpiredCertificate",
    "InvalidCSR",
    "InvalidToken",
    "NoPeerCertificate",
    "PKIConfigError",
    "PKIError",
    "RevokedCertificate",
    "RoleRejected",
    "UntrustedCertificate",
]
