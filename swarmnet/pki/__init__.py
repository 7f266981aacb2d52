"""The cluster PKI: root CA, join tokens, node certificates, revocation, TLS contexts.

Library code on ``cryptography`` and the stdlib ``ssl``; no sockets, no aiohttp. The only
disk I/O is ``RootCA.save/load`` and ``NodeCredentials.save/load``, which take a directory;
everything else takes and returns PEM bytes. See docs/security.md for the trust model.
"""

from swarmnet.pki.ca import (
    DEFAULT_CONFIG,
    NodeCredentials,
    NodeIdentity,
    PKIConfig,
    RootCA,
    issue_node_cert,
    make_csr,
    new_key_and_csr,
    new_node_key,
    verify_node_cert,
)
from swarmnet.pki.errors import (
    CAPinMismatch,
    CertificateRejected,
    ExpiredCertificate,
    InvalidCSR,
    InvalidToken,
    NoPeerCertificate,
    PKIConfigError,
    PKIError,
    RevokedCertificate,
    RoleRejected,
    UntrustedCertificate,
)
from swarmnet.pki.renewal import needs_renewal, renewal_time
from swarmnet.pki.revocation import RevocationList
from swarmnet.pki.tls import (
    authorize_peer,
    bootstrap_context,
    ca_fetch_context,
    client_context,
    http_status,
    peer_identity,
    reload_credentials,
    server_context,
)
from swarmnet.pki.tokens import (
    ca_digest,
    format_token,
    generate_token,
    new_secret,
    new_tokens,
    parse_token,
    role_for_token,
    rotate,
    tokens_equal,
    verify_ca_against_token,
)

__all__ = [
    "CAPinMismatch",
    "CertificateRejected",
    "DEFAULT_CONFIG",
    "ExpiredCertificate",
    "InvalidCSR",
    "InvalidToken",
    "NoPeerCertificate",
    "NodeCredentials",
    "NodeIdentity",
    "PKIConfig",
    "PKIConfigError",
    "PKIError",
    "RevocationList",
    "RevokedCertificate",
    "RoleRejected",
    "RootCA",
    "UntrustedCertificate",
    "authorize_peer",
    "bootstrap_context",
    "ca_digest",
    "ca_fetch_context",
    "client_context",
    "format_token",
    "generate_token",
    "http_status",
    "issue_node_cert",
    "make_csr",
    "needs_renewal",
    "new_key_and_csr",
    "new_node_key",
    "new_secret",
    "new_tokens",
    "parse_token",
    "peer_identity",
    "reload_credentials",
    "renewal_time",
    "role_for_token",
    "rotate",
    "server_context",
    "tokens_equal",
    "verify_ca_against_token",
    "verify_node_cert",
]
