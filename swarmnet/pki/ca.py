"""The cluster's root CA and node certificates (revocation: revocation.py; renewal: renewal.py).

Shape follows swarmkit (``ca/certificates.go``, ``ca/config.go``): an ECDSA P-256 root valid
20 years, node certificates valid 90 days and backdated 1 hour against clock skew; a node
certificate names the node in its subject: CN = node id, OU = role (``swarm-manager`` or
``swarm-worker``), O = cluster id, with DNS SANs ``[role, node id]`` (plus ``swarm-ca`` for
managers) so that a client can pin the role of the server it talks to by TLS name checking,
as swarmkit's gRPC clients do with ``ServerName: "swarm-manager"``.

The CA trusts nothing from a CSR but its public key and the proof of possession (the CSR's
signature): node id, role and cluster come from the manager's store, never from the node.

Bytes in, bytes out (PEM everywhere), with an injectable ``now`` so tests can mint expired
certificates. The only functions that touch the disk take a directory and say so:
``RootCA.save/load`` and ``NodeCredentials.save/load``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarmnet.pki.errors import (
    ExpiredCertificate,
    InvalidCSR,
    PKIConfigError,
    UntrustedCertificate,
)

if TYPE_CHECKING:
    from swarmnet.pki.revocation import RevocationList

# ---- names on the wire (in certificates): swarmkit's, do not change -----------------------

CA_COMMON_NAME = "swarm-ca"
OU_MANAGER = "swarm-manager"
OU_WORKER = "swarm-worker"
# The store and the Docker API say "manager"/"worker"; certificates say the OU form.
_OU_BY_ROLE = {"manager": OU_MANAGER, "worker": OU_WORKER}
_ROLE_BY_OU = {v: k for k, v in _OU_BY_ROLE.items()}

# Node and cluster ids are swarmkit identity.NewID(): 25 base36 characters. Looser bound
# here (1-64 DNS-label characters) since the id also becomes a DNS SAN.
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

# File names in the certificates directory: swarmkit's (/var/lib/docker/swarm/certificates).
ROOT_CA_CERT_FILE = "swarm-root-ca.crt"
ROOT_CA_KEY_FILE = "swarm-root-ca.key"
NODE_CERT_FILE = "swarm-node.crt"
NODE_KEY_FILE = "swarm-node.key"

_DAY_S = 86_400


@dataclass(frozen=True)
class PKIConfig:
    """Validity and renewal policy. Defaults are swarmkit's (``ca/certificates.go``)."""

    ca_validity_s: int = 20 * 365 * _DAY_S
    """Root CA lifetime. swarmkit: RootCAExpiration = 630720000 s (20 years). Rotating a
    root is a cluster-wide event, so it is made rare on purpose."""

    node_cert_validity_s: int = 90 * _DAY_S
    """Node certificate lifetime. swarmkit: DefaultNodeCertExpiration = 2160 h (90 days),
    the ``--cert-expiry`` default. Short enough that a stolen key ages out, long enough that
    a node offline for a month still comes back."""

    min_node_cert_validity_s: int = 3600
    """swarmkit: MinNodeCertExpiration = 1 h. Below that, renewal (at 50-80 % of the
    lifetime) would be a constant load on the CA."""

    backdate_s: int = 3600
    """notBefore = now - this. swarmkit: CertBackdate = 1 h, so that a node whose clock is a
    little behind the CA's accepts its fresh certificate."""

    renew_lower_fraction: float = 0.5
    renew_upper_fraction: float = 0.8
    """A node renews at a random point between these fractions of its certificate's
    lifetime (swarmkit CertLower/UpperRotationRange): random so that the nodes of a cluster
    created together do not all renew in the same minute."""

    def validate(self) -> None:
        if self.min_node_cert_validity_s <= 0:
            raise PKIConfigError("minimum node certificate validity must be positive")
        if self.node_cert_validity_s < self.min_node_cert_validity_s:
            raise PKIConfigError(
                f"node certificate validity must be at least {self.min_node_cert_validity_s} s"
            )
        if self.ca_validity_s <= self.node_cert_validity_s:
            raise PKIConfigError("the CA must outlive the node certificates it signs")
        if not 0 < self.renew_lower_fraction <= self.renew_upper_fraction < 1:
            raise PKIConfigError("renewal fractions must satisfy 0 < lower <= upper < 1")
        if self.backdate_s < 0:
            raise PKIConfigError("backdate must not be negative")


DEFAULT_CONFIG = PKIConfig()


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise PKIConfigError("now must be timezone-aware (UTC)")
    return now


def ou_for_role(role: str) -> str:
    """``"manager"`` or ``"swarm-manager"`` -> ``"swarm-manager"`` (same for workers)."""
    if role in _ROLE_BY_OU:
        return role
    try:
        return _OU_BY_ROLE[role]
    except KeyError:
        raise PKIConfigError(f"unknown node role {role!r}: manager or worker") from None


def role_for_ou(ou: str) -> str:
    """``"swarm-manager"`` -> ``"manager"``; raises for anything else."""
    try:
        return _ROLE_BY_OU[ou]
    except KeyError:
        raise UntrustedCertificate(f"unknown role {ou!r} in certificate") from None


def _check_id(what: str, value: str) -> None:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise PKIConfigError(f"{what} {value!r} is not a valid id (lowercase base36)")


def _one_attr(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    attrs = name.get_attributes_for_oid(oid)
    if len(attrs) != 1:
        raise UntrustedCertificate(f"certificate must carry exactly one {what}")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def _load_cert(pem: bytes) -> x509.Certificate:
    """The first certificate of a PEM bundle (a node's file is leaf + root)."""
    try:
        return x509.load_pem_x509_certificates(pem)[0]
    except (ValueError, IndexError) as e:
        raise UntrustedCertificate(f"not a PEM certificate: {e}") from None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ---- files (the only disk I/O of the package) ---------------------------------------------


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomic, durable, and never wider than ``mode`` even for an instant: the temporary
    file is created with ``mode`` (O_EXCL), not chmod-ed after the key is in it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened beyond mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _certs_dir(directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


# ---- the root CA --------------------------------------------------------------------------


@dataclass(frozen=True)
class RootCA:
    """The cluster's trust anchor. ``key_pem`` is None on nodes that only verify (workers,
    and every node before it has the key replicated): they can build TLS contexts and check
    certificates but not sign."""

    cert_pem: bytes
    key_pem: bytes | None = field(default=None, repr=False)

    @classmethod
    def generate(
        cls,
        cluster_id: str,
        *,
        config: PKIConfig = DEFAULT_CONFIG,
        now: dt.datetime | None = None,
    ) -> RootCA:
        """A new self-signed root (``swarm init``). O = cluster id, so that a node certificate
        can be matched to its cluster without trusting the node."""
        config.validate()
        _check_id("cluster id", cluster_id)
        now = _now(now)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=config.backdate_s))
            .not_valid_after(now + dt.timedelta(seconds=config.ca_validity_s))
            # path_length=0: this root signs node certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(_pem(cert), _key_pem(key))

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes | None = None) -> RootCA:
        """Parse and check: one self-signed CA certificate, and the key matches it if given."""
        ca = cls(cert_pem, key_pem)
        cert = ca.cert
        bc = _basic_constraints(cert)
        if bc is None or not bc.ca:
            raise UntrustedCertificate("the root certificate is not a CA")
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            raise UntrustedCertificate("the root certificate is not self-signed") from None
        if key_pem is not None and ca._private_key.public_key() != cert.public_key():
            raise PKIConfigError("the CA key does not match the CA certificate")
        return ca

    @cached_property
    def cert(self) -> x509.Certificate:
        return _load_cert(self.cert_pem)

    @cached_property
    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        if self.key_pem is None:
            raise PKIConfigError("this node holds the CA certificate only and cannot sign")
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIConfigError("the CA key must be an ECDSA key")
        return key

    @property
    def can_sign(self) -> bool:
        return self.key_pem is not None

    @property
    def cluster_id(self) -> str:
        return _one_attr(self.cert.subject, NameOID.ORGANIZATION_NAME, "organization (cluster)")

    @property
    def digest(self) -> str:
        """The 50-character base36 digest that goes into join tokens."""
        from swarmnet.pki.tokens import ca_digest  # tokens imports us; late import

        return ca_digest(self.cert_pem)

    def public(self) -> RootCA:
        """The same CA without its key: what is safe to hand to a joining node."""
        return RootCA(self.cert_pem)

    # -- files --

    def save(self, directory: Path) -> None:
        """Write ``swarm-root-ca.crt`` (0644) and, if held, ``swarm-root-ca.key`` (0600) into
        ``directory`` (created 0700)."""
        d = _certs_dir(directory)
        _write_file(d / ROOT_CA_CERT_FILE, self.cert_pem, 0o644)
        if self.key_pem is not None:
            _write_file(d / ROOT_CA_KEY_FILE, self.key_pem, 0o600)

    @classmethod
    def load(cls, directory: Path) -> RootCA:
        """Read what ``save`` wrote; the key is optional. Raises FileNotFoundError if there is
        no CA certificate in ``directory``."""
        d = Path(directory)
        cert_pem = (d / ROOT_CA_CERT_FILE).read_bytes()
        key_path = d / ROOT_CA_KEY_FILE
        key_pem = key_path.read_bytes() if key_path.exists() else None
        return cls.from_pem(cert_pem, key_pem)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


# ---- node keys, CSRs and certificates -----------------------------------------------------


def new_node_key() -> bytes:
    """A fresh ECDSA P-256 private key (PKCS#8 PEM, unencrypted). It never leaves the node."""
    return _key_pem(ec.generate_private_key(ec.SECP256R1()))


def make_csr(key_pem: bytes) -> bytes:
    """A CSR for ``key_pem``. Its subject is empty on purpose: the joining node does not know
    its node id yet (the manager assigns it), and the CA would ignore any subject anyway."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIConfigError("node keys must be ECDSA")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def new_key_and_csr() -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM): what a node makes before ``swarm join`` or a renewal."""
    key = new_node_key()
    return key, make_csr(key)


def _csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    if not isinstance(csr_pem, bytes | str) or len(csr_pem) > 16_384:
        raise InvalidCSR("the CSR must be a PEM string of at most 16 KiB")
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise InvalidCSR(f"not a PEM certificate signing request: {e}") from None
    if not csr.is_signature_valid:
        raise InvalidCSR("the CSR's signature does not verify (no proof of key possession)")
    pub = csr.public_key()
    # Only the curves OpenSSL and our peers handle everywhere; no RSA, no exotic curves.
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name not in (
        "secp256r1",
        "secp384r1",
    ):
        raise InvalidCSR("node keys must be ECDSA P-256 or P-384")
    return pub


def issue_node_cert(
    ca: RootCA,
    csr_pem: bytes,
    node_id: str,
    role: str,
    cluster_id: str,
    validity_s: int | None = None,
    *,
    config: PKIConfig = DEFAULT_CONFIG,
    now: dt.datetime | None = None,
) -> bytes:
    """Sign the CSR's key for ``node_id`` in ``role`` ("manager"/"worker", or the OU form).

    Returns the node's certificate chain as PEM: the leaf, then the root (swarmkit's
    AppendFirstRootPEM), which is what the node stores as ``swarm-node.crt`` and presents in
    TLS. ``validity_s`` defaults to the config's node validity and is clamped to the CA's
    own expiry. Raises InvalidCSR for a bad CSR, PKIConfigError for caller mistakes.
    """
    config.validate()
    _check_id("node id", node_id)
    _check_id("cluster id", cluster_id)
    ou = ou_for_role(role)
    if cluster_id != ca.cluster_id:
        raise PKIConfigError(f"this CA belongs to cluster {ca.cluster_id}, not {cluster_id}")
    validity_s = config.node_cert_validity_s if validity_s is None else int(validity_s)
    if validity_s < config.min_node_cert_validity_s:
        raise PKIConfigError(
            f"node certificate validity must be at least {config.min_node_cert_validity_s} s"
        )
    pub = _csr_public_key(csr_pem)
    key = ca._private_key
    now = _now(now)
    not_after = min(now + dt.timedelta(seconds=validity_s), ca.cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.DNSName(ou), x509.DNSName(node_id)]
    if ou == OU_MANAGER:
        sans.append(x509.DNSName(CA_COMMON_NAME))  # managers also act as the CA
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=config.backdate_s))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Every node is a TLS client; managers are also servers. One certificate for both,
        # like swarmkit, so a promotion only needs a new role, not a second key.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return _pem(cert) + _pem(ca.cert)


@dataclass(frozen=True)
class NodeIdentity:
    """Who a verified certificate names. ``role`` is "manager" or "worker" (the store's and
    the Docker API's vocabulary); the certificate itself says swarm-manager/swarm-worker."""

    node_id: str
    role: str
    cluster_id: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


def identity_of(cert: x509.Certificate) -> NodeIdentity:
    """Read the identity out of a certificate WITHOUT checking who signed it. Only for
    certificates already verified (by OpenSSL in a handshake, or by verify_node_cert)."""
    node_id = _one_attr(cert.subject, NameOID.COMMON_NAME, "common name (node id)")
    ou = _one_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "organizational unit (role)")
    cluster_id = _one_attr(cert.subject, NameOID.ORGANIZATION_NAME, "organization (cluster)")
    if not _ID_RE.match(node_id) or not _ID_RE.match(cluster_id):
        raise UntrustedCertificate("certificate names a malformed node or cluster id")
    return NodeIdentity(
        node_id=node_id,
        role=role_for_ou(ou),
        cluster_id=cluster_id,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def verify_node_cert(
    ca: RootCA,
    cert_pem: bytes,
    *,
    now: dt.datetime | None = None,
    revoked: RevocationList | None = None,
) -> NodeIdentity:
    """Check a node certificate (or a chain whose first element is the leaf) against this CA:
    signature, validity window, not a CA, role and cluster. Returns its identity.

    Raises UntrustedCertificate (other CA, tampered, malformed), ExpiredCertificate,
    RevokedCertificate (when ``revoked`` is given and names it)."""
    cert = _load_cert(cert_pem)
    if cert.issuer != ca.cert.subject:
        raise UntrustedCertificate("certificate was not issued by this swarm's CA")
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise UntrustedCertificate(
            "certificate signature does not verify against this CA"
        ) from None
    bc = _basic_constraints(cert)
    if bc is None or bc.ca:
        raise UntrustedCertificate("a node certificate must not be a CA")
    now = _now(now)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ExpiredCertificate(
            f"certificate valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, now is {now:%Y-%m-%dT%H:%M:%SZ}"
        )
    ident = identity_of(cert)
    if ident.cluster_id != ca.cluster_id:
        raise UntrustedCertificate("certificate belongs to another cluster")
    if revoked is not None:
        revoked.check(ident)
    return ident


# ---- a node's own credentials -------------------------------------------------------------


@dataclass(frozen=True)
class NodeCredentials:
    """A node's certificate chain (leaf + root, PEM) and its private key (PEM)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def identity(self, ca: RootCA, *, now: dt.datetime | None = None) -> NodeIdentity:
        """Verify our own certificate (a node checks what a manager handed it before
        storing it: swarmkit's "trust, but verify") and that the key matches it."""
        ident = verify_node_cert(ca, self.cert_pem, now=now)
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if key.public_key() != _load_cert(self.cert_pem).public_key():
            raise PKIConfigError("the node key does not match the node certificate")
        return ident

    def save(self, directory: Path) -> None:
        """Write ``swarm-node.crt`` (0644) and ``swarm-node.key`` (0600) into ``directory``.
        Key first: a crash in between leaves the old certificate with the new key, which
        fails loudly at load (mismatch) rather than silently using a stale pair."""
        d = _certs_dir(directory)
        _write_file(d / NODE_KEY_FILE, self.key_pem, 0o600)
        _write_file(d / NODE_CERT_FILE, self.cert_pem, 0o644)

    @classmethod
    def load(cls, directory: Path) -> NodeCredentials:
        d = Path(directory)
        return cls((d / NODE_CERT_FILE).read_bytes(), (d / NODE_KEY_FILE).read_bytes())


__all__ = [
    "CA_COMMON_NAME",
    "DEFAULT_CONFIG",
    "NODE_CERT_FILE",
    "NODE_KEY_FILE",
    "OU_MANAGER",
    "OU_WORKER",
    "PKIConfig",
    "ROOT_CA_CERT_FILE",
    "ROOT_CA_KEY_FILE",
    "NodeCredentials",
    "NodeIdentity",
    "RootCA",
    "identity_of",
    "issue_node_cert",
    "make_csr",
    "new_key_and_csr",
    "new_node_key",
    "ou_for_role",
    "role_for_ou",
    "verify_node_cert",
]
