"""TLS contexts for the node channel (2377) and the checks that go with them.

Four contexts, one per situation:

- ``server_context``: a manager serving 2377. TLS 1.3 only; client certificates from this
  cluster's CA are verified by OpenSSL during the handshake (other CA, expired, tampered ->
  handshake fails). ``require_client_cert=False`` (CERT_OPTIONAL: verify *if* given) is for
  the one listener that must also admit joining nodes, which have no certificate yet; the
  request handlers then demand ``authorize_peer`` on every path except the CA fetch and the
  join (which is authenticated by the token). This is swarmkit's VerifyClientCertIfGiven.
- ``client_context``: a node calling a manager. Presents the node's certificate and checks
  that the server is a *manager* of this cluster during the handshake: its certificate must
  carry the DNS name ``swarm-manager`` (managers' certificates do, workers' do not). That is
  swarmkit's ``ServerName: ManagerRole``. The context forces that name whatever host the URL
  has (an IP address, usually), so callers pass nothing and cannot forget it; a worker's
  certificate presented as a server fails the handshake, closed.
- ``bootstrap_context``: the join call. Same server checks, pinned to the CA the token
  vouched for, no client certificate (there is none yet).
- ``ca_fetch_context``: the one unverified connection, to fetch the CA certificate before
  pinning it with ``verify_ca_against_token``. Send nothing secret over it.

Post-handshake, ``peer_identity(ssl_object)`` reads the verified peer's (node id, role,
cluster) and ``authorize_peer`` adds revocation and role checks: a server calls it on every
request (revocation must bite keep-alive connections too).

Why not check hostnames against node ids? Certificates name node ids, not hosts: a client
dialling 198.51.100.2 cannot know which node id answers there, only that it must be a
manager of its cluster, which is what the forced server name checks.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Collection

from cryptography import x509

from swarmnet.pki.ca import (
    OU_MANAGER,
    NodeCredentials,
    NodeIdentity,
    RootCA,
    identity_of,
    ou_for_role,
)
from swarmnet.pki.errors import (
    CertificateRejected,
    ExpiredCertificate,
    NoPeerCertificate,
    PKIConfigError,
    RevokedCertificate,
    RoleRejected,
    UntrustedCertificate,
)
from swarmnet.pki.revocation import RevocationList

ALL_ROLES = ("manager", "worker")


def _ca_pem(ca: RootCA | bytes) -> str:
    pem = ca.cert_pem if isinstance(ca, RootCA) else ca
    return pem.decode() if isinstance(pem, bytes) else pem


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load an in-memory certificate chain and key. Python's ssl only loads from paths, so:
    an anonymous memfd read back through /proc/self/fd (the key never touches a disk), or,
    where that is unavailable, a 0600 file in a private 0700 temporary directory, removed at
    once."""
    blob = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    try:
        try:
            fd = os.memfd_create("swarmnet-tls", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            fd = -1
        if fd >= 0:
            try:
                _write_all(fd, blob)
                with contextlib.suppress(FileNotFoundError):  # no /proc: fall through
                    ctx.load_cert_chain(f"/proc/self/fd/{fd}")
                    return
            finally:
                os.close(fd)
        with tempfile.TemporaryDirectory(prefix="swarmnet-tls-") as d:
            path = os.path.join(d, "node.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, blob)
            finally:
                os.close(fd)
            ctx.load_cert_chain(path)
    except ssl.SSLError as e:
        raise PKIConfigError(f"cannot load the node certificate and key: {e}") from None


def _base(ctx: ssl.SSLContext, ca: RootCA | bytes) -> ssl.SSLContext:
    # TLS 1.3 only: every peer is ours, and 1.3 removes the negotiation surface (no RSA key
    # exchange, no renegotiation, no CBC suites), so there is nothing older to support.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Only this cluster's CA; never the system store (a public CA must not vouch for nodes).
    ctx.load_verify_locations(cadata=_ca_pem(ca))
    return ctx


def server_context(
    ca: RootCA | bytes,
    cert_pem: bytes,
    key_pem: bytes,
    *,
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """The manager's context for serving 2377. ``cert_pem``/``key_pem`` are the manager's
    own node credentials (bytes, as ``NodeCredentials`` holds them); they must name a
    manager of this CA and be valid now, else PKIConfigError / CertificateRejected: a
    demoted or expired manager must not serve."""
    root = ca if isinstance(ca, RootCA) else RootCA(ca)
    ident = NodeCredentials(cert_pem, key_pem).identity(root)
    if ident.role != "manager":
        raise RoleRejected(f"node {ident.node_id} holds a worker certificate: it cannot serve 2377")
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), root)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # No session tickets: a resumed session skips certificate verification, so a certificate
    # that expired since the first handshake would keep working until the ticket does.
    # Connections are few and long-lived; a full handshake each is cheap.
    ctx.num_tickets = 0
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


class _PeerNameContext(ssl.SSLContext):
    """A client context that checks the server certificate against a fixed DNS name (the
    role SAN) instead of whatever host the caller dialled. asyncio's, uvloop's and aiohttp's
    TLS paths all go through ``wrap_bio``; blocking sockets through ``wrap_socket``."""

    peer_name: str = OU_MANAGER

    def wrap_bio(  # type: ignore[override]
        self, incoming, outgoing, server_side=False, server_hostname=None, session=None
    ):
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=None if server_side else self.peer_name,
            session=session,
        )

    def wrap_socket(  # type: ignore[override]
        self,
        sock,
        server_side=False,
        do_handshake_on_connect=True,
        suppress_ragged_eofs=True,
        server_hostname=None,
        session=None,
    ):
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=None if server_side else self.peer_name,
            session=session,
        )


def _pinned_client(ca: RootCA | bytes, peer_role: str) -> ssl.SSLContext:
    ctx = _PeerNameContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.peer_name = ou_for_role(peer_role)
    _base(ctx, ca)
    ctx.check_hostname = True  # against peer_name: the role, see the module docstring
    return ctx


def client_context(
    ca: RootCA | bytes,
    cert_pem: bytes,
    key_pem: bytes,
    *,
    peer_role: str = "manager",
) -> ssl.SSLContext:
    """A node's context for calling managers: presents its certificate, accepts only a
    server whose certificate this CA issued for ``peer_role``. Pass it as ``ssl=`` to an
    aiohttp ``TCPConnector`` (or per request); URLs are ``https://<manager addr>:2377``."""
    ctx = _pinned_client(ca, peer_role)
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


def bootstrap_context(ca: RootCA | bytes) -> ssl.SSLContext:
    """The join call: pinned to the CA that ``verify_ca_against_token`` accepted, server must
    be a manager, no client certificate yet."""
    return _pinned_client(ca, "manager")


def ca_fetch_context() -> ssl.SSLContext:
    """UNVERIFIED. Only for fetching the CA certificate before a join; its answer is worth
    nothing until ``verify_ca_against_token`` has checked it. Never send the token, a CSR or
    anything else over a connection made with this context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def reload_credentials(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Swap the node's certificate and key in a live context after a renewal: handshakes
    from now on present the new certificate; open connections keep the old one until they
    close. Lets the manager's listening site and the worker's session live on unchanged."""
    _load_chain(ctx, cert_pem, key_pem)


# ---- after the handshake ------------------------------------------------------------------


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> NodeIdentity:
    """The verified peer's identity. In aiohttp: ``request.transport.get_extra_info(
    "ssl_object")``. Raises NoPeerCertificate when there is no TLS, no certificate, or the
    connection did not verify the certificate (a CERT_NONE context would hand us an
    unverified one: refusing here keeps that from ever becoming an identity)."""
    if ssl_object is None:
        raise NoPeerCertificate("not a TLS connection")
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        raise NoPeerCertificate("this connection does not verify peer certificates")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise NoPeerCertificate("the peer presented no certificate")
    return identity_of(x509.load_der_x509_certificate(der))


def authorize_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
    *,
    revoked: RevocationList,
    roles: Collection[str] = ALL_ROLES,
    cluster_id: str | None = None,
) -> NodeIdentity:
    """``peer_identity`` plus what OpenSSL cannot know: revocation, the role this path
    needs, and (belt and braces, the CA is per cluster) the cluster id. Call it on every
    request. Raises a CertificateRejected subclass; map it with ``http_status``."""
    ident = peer_identity(ssl_object)
    if cluster_id is not None and ident.cluster_id != cluster_id:
        raise UntrustedCertificate("certificate belongs to another cluster")
    revoked.check(ident)
    if ident.role not in roles:
        raise RoleRejected(f"node {ident.node_id} is a {ident.role}; this needs {'/'.join(roles)}")
    return ident


def http_status(err: CertificateRejected) -> int:
    """401 when the caller is not (or no longer validly) identified, 403 when it is
    identified and refused."""
    if isinstance(err, RevokedCertificate | RoleRejected):
        return 403
    if isinstance(err, NoPeerCertificate | UntrustedCertificate | ExpiredCertificate):
        return 401
    return 401


__all__ = [
    "ALL_ROLES",
    "authorize_peer",
    "bootstrap_context",
    "ca_fetch_context",
    "client_context",
    "http_status",
    "peer_identity",
    "reload_credentials",
    "server_context",
]
