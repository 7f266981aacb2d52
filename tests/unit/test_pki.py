"""The cluster PKI: tokens, CA, node certificates, revocation, and real TLS handshakes.

The TLS tests run a real aiohttp server on 127.0.0.1 (an ephemeral port, loopback only)
with the manager's context, and real aiohttp clients with the node contexts, wired the way
docs/security.md tells the manager/worker owners to wire them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import random
import re
import socket
import ssl
import stat
import threading
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from swarmnet import pki
from swarmnet.pki import tls as pki_tls
from swarmnet.pki.ca import (
    NODE_CERT_FILE,
    NODE_KEY_FILE,
    ROOT_CA_CERT_FILE,
    ROOT_CA_KEY_FILE,
    PKIConfig,
)

CLUSTER = "c1uster0000000000000000001"
NOW = dt.datetime.now(dt.UTC)
TOKEN_RE = re.compile(r"^SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}$")


@pytest.fixture(scope="module")
def ca() -> pki.RootCA:
    return pki.RootCA.generate(CLUSTER)


@pytest.fixture(scope="module")
def other_ca() -> pki.RootCA:
    return pki.RootCA.generate(CLUSTER)  # same cluster id, different key: must not matter


def creds(ca: pki.RootCA, node_id: str, role: str, **kw) -> pki.NodeCredentials:
    key, csr = pki.new_key_and_csr()
    return pki.NodeCredentials(pki.issue_node_cert(ca, csr, node_id, role, CLUSTER, **kw), key)


def leaf(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


# ---- tokens -------------------------------------------------------------------------------


def test_token_format_matches_docker(ca):
    tokens = pki.new_tokens(ca.cert_pem)
    assert set(tokens) == {"worker", "manager"}
    for t in tokens.values():
        assert TOKEN_RE.match(t), t
    w, m = (pki.parse_token(tokens[r]) for r in ("worker", "manager"))
    assert w.digest == m.digest == ca.digest
    assert w.secret != m.secret
    # 128 bits of entropy, as swarmkit: the secret is a number below 2^128.
    assert int(w.secret, 36) < 2**128


def test_digest_is_base36_sha256_of_der_and_stable(ca, tmp_path):
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    # Python's int(..., 36) is an independent decoder of our encoder.
    assert int(ca.digest, 36) == int(hashlib.sha256(der).hexdigest(), 16)
    assert len(ca.digest) == 50
    # Re-encodings of the same certificate keep the digest (why DER and not PEM bytes).
    assert pki.ca_digest(ca.cert_pem.replace(b"\n", b"\r\n") + b"\n\n") == ca.digest
    ca.save(tmp_path)
    assert pki.RootCA.load(tmp_path).digest == ca.digest
    assert pki.RootCA.generate(CLUSTER).digest != ca.digest


def test_b36_padding_and_edges():
    from swarmnet.pki.tokens import b36

    assert b36(0, 3) == "000"
    assert b36(35, 1) == "z"
    assert b36(36, 4) == "0010"
    assert b36(2**256 - 1, 50) == b36(2**256 - 1, 50).lstrip("0").rjust(50, "0")
    with pytest.raises(pki.PKIConfigError):
        b36(36, 1)


def test_parse_normalises_whitespace_and_case(ca):
    t = pki.generate_token(ca.cert_pem)
    head, rest = t[:9], t[9:]
    assert str(pki.parse_token(f"  {head}{rest.upper()}\n")) == t


@pytest.mark.parametrize(
    "bad",
    [
        None,
        42,
        "",
        "SWMTKN-1-abc-def",
        "SWMTKN-2-1-" + "a" * 50 + "-" + "b" * 25,
        "SWMTKN-1-" + "a" * 49 + "-" + "b" * 25,
        "SWMTKN-1-" + "a" * 50 + "-" + "b" * 24,
        "SWMTKN-1-" + "a" * 50 + "-" + "b" * 25 + "-x",
        "SWMTKN-1-" + "a" * 50 + "-" + "b" * 24 + "_",
        "swmtkn-1-" + "a" * 50 + "-" + "b" * 25,
        "SWMTKN-1-" + "a" * 50 + "-" + "b" * 25 + "a" * 200,
    ],
)
def test_parse_rejects_malformed(bad):
    with pytest.raises(pki.InvalidToken) as ei:
        pki.parse_token(bad)
    if isinstance(bad, str) and len(bad) > 20:
        assert bad[-25:] not in str(ei.value)  # never echo a secret


@given(st.text(max_size=120))
def test_parse_never_crashes(s):
    try:
        pki.parse_token(s)
    except pki.InvalidToken:
        pass


def test_role_for_token_and_rotation(ca, other_ca):
    tokens = pki.new_tokens(ca.cert_pem)
    assert pki.role_for_token(tokens["worker"], tokens) == "worker"
    assert pki.role_for_token(tokens["manager"], tokens) == "manager"
    wrong_secret = pki.format_token(ca.digest, pki.new_secret())
    with pytest.raises(pki.InvalidToken, match="does not match"):
        pki.role_for_token(wrong_secret, tokens)
    with pytest.raises(pki.CAPinMismatch):
        pki.role_for_token(pki.new_tokens(other_ca.cert_pem)["worker"], tokens)
    rotated = pki.rotate(tokens, "worker")
    assert rotated["manager"] == tokens["manager"]
    assert rotated["worker"] != tokens["worker"]
    assert pki.parse_token(rotated["worker"]).digest == ca.digest
    with pytest.raises(pki.InvalidToken):
        pki.role_for_token(tokens["worker"], rotated)  # the old worker token is dead
    assert pki.role_for_token(rotated["worker"], rotated) == "worker"
    with pytest.raises(pki.PKIConfigError):
        pki.rotate(tokens, "admin")


def test_tokens_equal_and_repr_hides_secret(ca):
    t = pki.generate_token(ca.cert_pem)
    assert pki.tokens_equal(" " + t, t)
    assert not pki.tokens_equal(t[:-1] + ("0" if t[-1] != "0" else "1"), t)
    assert not pki.tokens_equal("garbage", t)
    assert pki.parse_token(t).secret not in repr(pki.parse_token(t))


def test_verify_ca_against_token(ca, other_ca):
    token = pki.generate_token(ca.cert_pem)
    assert pki.verify_ca_against_token(ca.cert_pem, token) == ca.cert.public_bytes(
        serialization.Encoding.PEM
    )
    with pytest.raises(pki.CAPinMismatch):
        pki.verify_ca_against_token(other_ca.cert_pem, token)
    with pytest.raises(pki.CAPinMismatch):
        pki.verify_ca_against_token(b"not a certificate", token)
    with pytest.raises(pki.InvalidToken):
        pki.verify_ca_against_token(ca.cert_pem, "SWMTKN-1-nope")


def test_pinning_refuses_a_non_ca_even_with_matching_digest(ca):
    c = creds(ca, "node1", "worker")
    token = pki.format_token(pki.ca_digest(c.cert_pem), pki.new_secret())
    with pytest.raises(pki.UntrustedCertificate):
        pki.verify_ca_against_token(c.cert_pem, token)


# ---- the CA -------------------------------------------------------------------------------


def test_ca_shape(ca):
    cert = ca.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=20 * 365) < life <= dt.timedelta(days=20 * 365, hours=1)
    assert ca.cluster_id == CLUSTER and ca.can_sign
    assert not ca.public().can_sign and ca.public().cert_pem == ca.cert_pem


def test_ca_files_and_permissions(ca, tmp_path):
    d = tmp_path / "certificates"
    ca.save(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / ROOT_CA_KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d / ROOT_CA_CERT_FILE).st_mode) == 0o644
    loaded = pki.RootCA.load(d)
    assert loaded == ca
    assert sorted(os.listdir(d)) == [ROOT_CA_CERT_FILE, ROOT_CA_KEY_FILE]  # no temp litter
    (d / ROOT_CA_KEY_FILE).unlink()
    worker_view = pki.RootCA.load(d)
    assert not worker_view.can_sign
    _, csr = pki.new_key_and_csr()
    with pytest.raises(pki.PKIConfigError, match="cannot sign"):
        pki.issue_node_cert(worker_view, csr, "n1", "worker", CLUSTER)
    with pytest.raises(FileNotFoundError):
        pki.RootCA.load(tmp_path / "nothing")


def test_ca_key_mismatch_refused(ca, other_ca):
    with pytest.raises(pki.PKIConfigError, match="does not match"):
        pki.RootCA.from_pem(ca.cert_pem, other_ca.key_pem)


def test_config_validation():
    with pytest.raises(pki.PKIConfigError):
        PKIConfig(node_cert_validity_s=60).validate()
    with pytest.raises(pki.PKIConfigError):
        PKIConfig(renew_lower_fraction=0.9, renew_upper_fraction=0.5).validate()
    with pytest.raises(pki.PKIConfigError):
        PKIConfig(ca_validity_s=86_400).validate()
    PKIConfig().validate()


# ---- node certificates --------------------------------------------------------------------


@pytest.mark.parametrize("role", ["manager", "worker", "swarm-manager"])
def test_issue_puts_identity_and_role_in_cert(ca, role):
    c = creds(ca, "node0000000000000000000001", role)
    chain = x509.load_pem_x509_certificates(c.cert_pem)
    assert len(chain) == 2 and chain[1] == ca.cert  # leaf + root, like swarmkit
    cert = chain[0]
    ou = "swarm-manager" if "manager" in role else "swarm-worker"
    subj = {a.oid: a.value for a in cert.subject}
    assert subj == {
        NameOID.COMMON_NAME: "node0000000000000000000001",
        NameOID.ORGANIZATIONAL_UNIT_NAME: ou,
        NameOID.ORGANIZATION_NAME: CLUSTER,
    }
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = sans.get_values_for_type(x509.DNSName)
    assert names[:2] == [ou, "node0000000000000000000001"]
    assert ("swarm-ca" in names) == (ou == "swarm-manager")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == dt.timedelta(days=90, hours=1)  # 90 days + 1 h backdate
    ident = c.identity(ca)
    assert (ident.node_id, ident.role, ident.cluster_id) == (
        "node0000000000000000000001",
        "manager" if "manager" in role else "worker",
        CLUSTER,
    )
    assert ident.serial == cert.serial_number


def test_csr_subject_is_ignored(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    evil = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "someone-else"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "swarm-manager"),
        ]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(evil)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    ident = pki.verify_node_cert(ca, pki.issue_node_cert(ca, csr, "n1", "worker", CLUSTER))
    assert (ident.node_id, ident.role) == ("n1", "worker")


def test_bad_csrs_refused(ca):
    with pytest.raises(pki.InvalidCSR):
        pki.issue_node_cert(ca, b"garbage", "n1", "worker", CLUSTER)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(pki.InvalidCSR, match="ECDSA"):
        pki.issue_node_cert(ca, rsa_csr, "n1", "worker", CLUSTER)
    # A CSR whose signature does not match its key: no proof of possession.
    _, csr = pki.new_key_and_csr()
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.InvalidCSR):
        pki.issue_node_cert(ca, forged, "n1", "worker", CLUSTER)


def test_issue_argument_checks(ca):
    _, csr = pki.new_key_and_csr()
    with pytest.raises(pki.PKIConfigError, match="cluster"):
        pki.issue_node_cert(ca, csr, "n1", "worker", "anotherclusterid")
    with pytest.raises(pki.PKIConfigError, match="at least"):
        pki.issue_node_cert(ca, csr, "n1", "worker", CLUSTER, validity_s=60)
    with pytest.raises(pki.PKIConfigError, match="role"):
        pki.issue_node_cert(ca, csr, "n1", "admin", CLUSTER)
    with pytest.raises(pki.PKIConfigError, match="node id"):
        pki.issue_node_cert(ca, csr, "../etc", "worker", CLUSTER)


def test_custom_validity_and_clamp_to_ca_expiry():
    c = creds(pki.RootCA.generate(CLUSTER), "n1", "worker", validity_s=7200)
    cert = leaf(c.cert_pem)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=3)
    # A CA with 10 days left cannot issue a 90-day certificate past its own end.
    old = pki.RootCA.generate(CLUSTER, now=NOW - dt.timedelta(days=20 * 365 - 10))
    c = creds(old, "n1", "worker")
    assert leaf(c.cert_pem).not_valid_after_utc == old.cert.not_valid_after_utc


def test_verify_rejects_other_ca_tampered_expired_revoked(ca, other_ca):
    good = creds(ca, "n1", "worker")
    assert pki.verify_node_cert(ca, good.cert_pem).node_id == "n1"
    with pytest.raises(pki.UntrustedCertificate):
        pki.verify_node_cert(ca, creds(other_ca, "n1", "worker").cert_pem)
    # Tamper: swap the role in the signed bytes (same length), keep the signature.
    der = leaf(good.cert_pem).public_bytes(serialization.Encoding.DER)
    assert der.count(b"swarm-worker") >= 1
    forged = der.replace(b"swarm-worker", b"swarm-manag3")
    forged_pem = x509.load_der_x509_certificate(forged).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.UntrustedCertificate):
        pki.verify_node_cert(ca, forged_pem)
    old = creds(ca, "n2", "worker", now=NOW - dt.timedelta(days=100))
    with pytest.raises(pki.ExpiredCertificate):
        pki.verify_node_cert(ca, old.cert_pem)
    future = creds(ca, "n3", "worker", now=NOW + dt.timedelta(days=1))
    with pytest.raises(pki.ExpiredCertificate):
        pki.verify_node_cert(ca, future.cert_pem)
    with pytest.raises(pki.UntrustedCertificate, match="CA"):
        pki.verify_node_cert(ca, ca.cert_pem)  # the root itself is not a node
    revoked = pki.RevocationList().with_nodes(["n1"])
    with pytest.raises(pki.RevokedCertificate):
        pki.verify_node_cert(ca, good.cert_pem, revoked=revoked)
    by_serial = pki.RevocationList().with_serials([leaf(good.cert_pem).serial_number])
    with pytest.raises(pki.RevokedCertificate):
        pki.verify_node_cert(ca, good.cert_pem, revoked=by_serial)


def test_node_credentials_files_and_key_match(ca, tmp_path):
    c = creds(ca, "n1", "manager")
    c.save(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / NODE_KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / NODE_CERT_FILE).st_mode) == 0o644
    assert pki.NodeCredentials.load(tmp_path) == c
    mismatched = pki.NodeCredentials(c.cert_pem, pki.new_node_key())
    with pytest.raises(pki.PKIConfigError, match="does not match"):
        mismatched.identity(ca)


def test_renewal(ca):
    c = creds(ca, "n1", "worker")
    cert = leaf(c.cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    life = end - start
    assert not pki.needs_renewal(c.cert_pem, now=start + life * 0.5)
    assert pki.needs_renewal(c.cert_pem, now=start + life * 0.81)
    assert pki.needs_renewal(c.cert_pem, now=end + dt.timedelta(seconds=1))
    assert pki.needs_renewal(c.cert_pem, now=start - dt.timedelta(seconds=1))
    rng = random.Random(7)
    times = [pki.renewal_time(c.cert_pem, rng=rng) for _ in range(50)]
    assert all(start + life * 0.5 <= t <= start + life * 0.8 for t in times)
    assert len(set(times)) > 1  # spread, not one instant for the whole cluster


def test_revocation_list_json_roundtrip():
    r = pki.RevocationList().with_nodes(["a", "b"]).with_serials([2**158 + 1, 5])
    back = pki.RevocationList.from_json(r.to_json())
    assert back == r
    assert all(isinstance(s, str) for s in r.to_json()["serials"])
    assert back.prune([5]).serials == frozenset({2**158 + 1})
    assert pki.RevocationList.from_json(None) == pki.RevocationList()


# ---- TLS: blocking sockets (peer_identity, the forced server name) ------------------------


def _handshake(server_ctx, client_ctx):
    """Handshake over a socketpair; returns (server identity or exception, client error)."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    out: dict = {}

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                out["server"] = pki.peer_identity(s)
                s.sendall(b"ok")
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out["server"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="198.51.100.1") as c:
            out["client_peer"] = pki.peer_identity(c)
            out["client_read"] = c.recv(2)
    except Exception as e:  # noqa: BLE001
        out["client"] = e
    finally:
        t.join(10)
        a.close()
        b.close()
    return out


def test_socketpair_mutual_tls_and_identities(ca):
    mgr = creds(ca, "mgr1", "manager")
    wrk = creds(ca, "wrk1", "worker")
    out = _handshake(
        pki.server_context(ca, mgr.cert_pem, mgr.key_pem),
        pki.client_context(ca, wrk.cert_pem, wrk.key_pem),
    )
    assert "client" not in out, out
    assert out["client_read"] == b"ok"
    assert (out["server"].node_id, out["server"].role) == ("wrk1", "worker")
    assert (out["client_peer"].node_id, out["client_peer"].role) == ("mgr1", "manager")


def test_client_refuses_a_worker_posing_as_manager(ca):
    wrk = creds(ca, "wrk1", "worker")
    other = creds(ca, "wrk2", "worker")
    with pytest.raises(pki.RoleRejected):
        pki.server_context(ca, wrk.cert_pem, wrk.key_pem)  # the library refuses outright
    # Built by hand, as an attacker holding a worker key would:
    rogue = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki_tls._load_chain(rogue, wrk.cert_pem, wrk.key_pem)
    out = _handshake(rogue, pki.client_context(ca, other.cert_pem, other.key_pem))
    assert isinstance(out.get("client"), ssl.SSLCertVerificationError), out


def test_peer_identity_refuses_unverified_connections(ca):
    mgr = creds(ca, "mgr1", "manager")
    out = _handshake(
        pki.server_context(ca, mgr.cert_pem, mgr.key_pem, require_client_cert=False),
        pki.ca_fetch_context(),
    )
    assert isinstance(out["client"], pki.NoPeerCertificate)  # CERT_NONE: never an identity
    assert isinstance(out["server"], pki.NoPeerCertificate | OSError)
    with pytest.raises(pki.NoPeerCertificate):
        pki.peer_identity(None)


def test_reload_credentials_after_renewal(ca):
    mgr = creds(ca, "mgr1", "manager")
    old = creds(ca, "wrk1", "worker")
    client = pki.client_context(ca, old.cert_pem, old.key_pem)
    server = pki.server_context(ca, mgr.cert_pem, mgr.key_pem)
    assert _handshake(server, client)["server"].serial == leaf(old.cert_pem).serial_number
    new = creds(ca, "wrk1", "worker")
    pki.reload_credentials(client, new.cert_pem, new.key_pem)
    assert _handshake(server, client)["server"].serial == leaf(new.cert_pem).serial_number


def test_server_context_refuses_expired_own_cert(ca):
    old = creds(ca, "mgr1", "manager", now=NOW - dt.timedelta(days=100))
    with pytest.raises(pki.ExpiredCertificate):
        pki.server_context(ca, old.cert_pem, old.key_pem)


# ---- TLS: aiohttp, wired as the node channel will be --------------------------------------

PUBLIC_PATHS = {"/cluster/ca", "/cluster/join"}
PEER = web.RequestKey("peer", pki.NodeIdentity)


@asynccontextmanager
async def node_channel(ca: pki.RootCA, mgr: pki.NodeCredentials, *, require_client_cert: bool):
    """A tiny 2377: the CA fetch and the join are public, everything else needs mTLS."""
    state = {"revoked": pki.RevocationList(), "joins": 0, "tokens": pki.new_tokens(ca.cert_pem)}

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path not in PUBLIC_PATHS:
            try:
                request[PEER] = pki.authorize_peer(
                    request.transport.get_extra_info("ssl_object"),
                    revoked=state["revoked"],
                    cluster_id=ca.cluster_id,
                )
            except pki.CertificateRejected as e:
                return web.json_response({"message": str(e)}, status=pki.http_status(e))
        return await handler(request)

    async def h_ca(request):
        return web.Response(body=ca.public().cert_pem, content_type="application/x-pem-file")

    async def h_join(request):
        state["joins"] += 1
        body = await request.json()
        try:
            role = pki.role_for_token(body["token"], state["tokens"])
            cert = pki.issue_node_cert(ca, body["csr"].encode(), "joined1", role, ca.cluster_id)
        except (pki.InvalidToken, pki.CAPinMismatch, pki.InvalidCSR) as e:
            return web.json_response({"message": str(e)}, status=400)
        return web.json_response(
            {
                "node_id": "joined1",
                "role": role,
                "certificate": cert.decode(),
                "ca": ca.cert_pem.decode(),
            }
        )

    async def h_whoami(request):
        p = request[PEER]
        return web.json_response({"node_id": p.node_id, "role": p.role})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/cluster/ca", h_ca)
    app.router.add_post("/cluster/join", h_join)
    app.router.add_get("/cluster/whoami", h_whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = pki.server_context(ca, mgr.cert_pem, mgr.key_pem, require_client_cert=require_client_cert)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    state["url"] = f"https://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def session(ctx: ssl.SSLContext) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=10)
    )


@pytest.fixture(scope="module")
def mgr(ca):
    return creds(ca, "mgr1", "manager")


@pytest.mark.parametrize("required", [True, False])
async def test_aiohttp_mutual_tls(ca, mgr, required):
    wrk = creds(ca, "wrk1", "worker")
    async with node_channel(ca, mgr, require_client_cert=required) as ch:
        async with session(pki.client_context(ca, wrk.cert_pem, wrk.key_pem)) as s:
            async with s.get(ch["url"] + "/cluster/whoami") as r:
                assert r.status == 200
                assert await r.json() == {"node_id": "wrk1", "role": "worker"}


async def test_aiohttp_client_without_cert_refused(ca, mgr):
    # CERT_REQUIRED: refused in the handshake.
    async with node_channel(ca, mgr, require_client_cert=True) as ch:
        async with session(pki.bootstrap_context(ca)) as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get(ch["url"] + "/cluster/whoami") as r:
                    await r.read()
    # CERT_OPTIONAL (the listener that also admits joins): refused per request, 401.
    async with node_channel(ca, mgr, require_client_cert=False) as ch:
        async with session(pki.bootstrap_context(ca)) as s:
            async with s.get(ch["url"] + "/cluster/whoami") as r:
                assert r.status == 401
            async with s.get(ch["url"] + "/cluster/ca") as r:
                assert r.status == 200


@pytest.mark.parametrize("required", [True, False])
async def test_aiohttp_other_ca_and_expired_refused_in_handshake(ca, other_ca, mgr, required):
    foreign = creds(other_ca, "wrk9", "worker")
    expired = creds(ca, "wrk8", "worker", now=NOW - dt.timedelta(days=100))
    async with node_channel(ca, mgr, require_client_cert=required) as ch:
        for c in (foreign, expired):
            # The client trusts the right CA; only its own certificate is wrong.
            ctx = pki.client_context(ca, c.cert_pem, c.key_pem)
            async with session(ctx) as s:
                with pytest.raises(aiohttp.ClientError):
                    async with s.get(ch["url"] + "/cluster/whoami") as r:
                        await r.read()


async def test_aiohttp_client_refuses_server_of_other_ca(ca, other_ca):
    rogue_mgr = creds(other_ca, "mgr9", "manager")
    wrk = creds(ca, "wrk1", "worker")
    async with node_channel(other_ca, rogue_mgr, require_client_cert=False) as ch:
        async with session(pki.client_context(ca, wrk.cert_pem, wrk.key_pem)) as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with s.get(ch["url"] + "/cluster/whoami") as r:
                    await r.read()


async def test_aiohttp_revoked_node_refused_on_a_live_connection(ca, mgr):
    wrk = creds(ca, "wrk1", "worker")
    async with node_channel(ca, mgr, require_client_cert=True) as ch:
        async with session(pki.client_context(ca, wrk.cert_pem, wrk.key_pem)) as s:
            async with s.get(ch["url"] + "/cluster/whoami") as r:
                assert r.status == 200
            ch["revoked"] = ch["revoked"].with_nodes(["wrk1"])  # node rm
            # Same session, same keep-alive connection: the per-request check bites.
            async with s.get(ch["url"] + "/cluster/whoami") as r:
                assert r.status == 403
                assert "removed" in (await r.json())["message"]


async def test_aiohttp_bootstrap_join_flow(ca, mgr, tmp_path):
    async with node_channel(ca, mgr, require_client_cert=False) as ch:
        token = ch["tokens"]["worker"]
        # 1. Unverified fetch of the CA, 2. pin it with the token's digest.
        async with session(pki.ca_fetch_context()) as s:
            async with s.get(ch["url"] + "/cluster/ca") as r:
                fetched = await r.read()
        pinned = pki.verify_ca_against_token(fetched, token)
        # 3. Join over the pinned connection: token + CSR out, certificate back.
        key, csr = pki.new_key_and_csr()
        async with session(pki.bootstrap_context(pinned)) as s:
            async with s.post(
                ch["url"] + "/cluster/join", json={"token": token, "csr": csr.decode()}
            ) as r:
                assert r.status == 200
                body = await r.json()
        assert body["ca"].encode() == pinned
        me = pki.NodeCredentials(body["certificate"].encode(), key)
        ident = me.identity(pki.RootCA(pinned))
        assert (ident.node_id, ident.role) == ("joined1", "worker")
        me.save(tmp_path)
        # 4. From now on: mutual TLS with the new certificate.
        async with session(pki.client_context(pinned, me.cert_pem, me.key_pem)) as s:
            async with s.get(ch["url"] + "/cluster/whoami") as r:
                assert await r.json() == {"node_id": "joined1", "role": "worker"}


async def test_aiohttp_bootstrap_wrong_digest_sends_nothing(ca, other_ca, mgr):
    async with node_channel(ca, mgr, require_client_cert=False) as ch:
        token = pki.new_tokens(other_ca.cert_pem)["worker"]  # a token of another swarm
        async with session(pki.ca_fetch_context()) as s:
            async with s.get(ch["url"] + "/cluster/ca") as r:
                fetched = await r.read()
        with pytest.raises(pki.CAPinMismatch):
            pki.verify_ca_against_token(fetched, token)
        assert ch["joins"] == 0
        # And a client pinned to the wrong CA cannot even complete the handshake.
        async with session(pki.bootstrap_context(other_ca)) as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with s.post(ch["url"] + "/cluster/join", json={"token": token}) as r:
                    await r.read()
        assert ch["joins"] == 0


def test_forced_server_name_works_under_uvloop(ca, mgr):
    """The agent runs on uvloop, whose TLS goes through its own sslproto: check the role pin
    (and so the forced server name) holds there too."""
    uvloop = pytest.importorskip("uvloop")
    wrk = creds(ca, "wrk1", "worker")

    async def main():
        async with node_channel(ca, mgr, require_client_cert=True) as ch:
            async with session(pki.client_context(ca, wrk.cert_pem, wrk.key_pem)) as s:
                async with s.get(ch["url"] + "/cluster/whoami") as r:
                    ok = await r.json()
            # A client expecting a worker peer must refuse the manager.
            ctx = pki.client_context(ca, wrk.cert_pem, wrk.key_pem, peer_role="worker")
            async with session(ctx) as s:
                try:
                    async with s.get(ch["url"] + "/cluster/whoami") as r:
                        await r.read()
                    refused = False
                except aiohttp.ClientConnectorCertificateError:
                    refused = True
        return ok, refused

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        ok, refused = runner.run(main())
    assert ok == {"node_id": "wrk1", "role": "worker"}
    assert refused
