"""The node channel (2377) without root: a real Agent + Manager + single-node pysyncobj Store
on 127.0.0.1 (worker role stubbed), spoken to with swarmnet.pki contexts over real TLS.
Join by token, renewal, token rotation, and revocation of a keep-alive connection."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from stubs import StubWorker, free_port

import swarmnet.agent as agent_mod
import swarmnet.manager as manager_mod
from swarmnet import pki
from swarmnet.agent import Agent, AgentOptions
from swarmnet.kernel.fake import FakeKernel
from swarmnet.manager import Manager, ManagerConfig
from swarmnet.raft.store import RaftConfig


@pytest.fixture
async def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    port = free_port()
    monkeypatch.setattr(manager_mod, "CONTROL_PORT", port)
    monkeypatch.setattr(agent_mod, "CONTROL_PORT", port)
    monkeypatch.setattr(agent_mod, "Worker", StubWorker)
    monkeypatch.setattr(
        agent_mod,
        "Manager",
        functools.partial(
            Manager,
            config=ManagerConfig(node_down_after_s=3600.0, leader_loop_s=0.2),
            raft=RaftConfig(raft_port=free_port()),
        ),
    )
    a = Agent(
        AgentOptions(
            data_dir=tmp_path / "h1", advertise_addr="127.0.0.1", api="unix://x", hostname="h1"
        ),
        FakeKernel(),
    )
    await a.init_swarm({})
    try:
        yield a
    finally:
        store = a.manager.store if a.manager else None
        await a.close()
        if store is not None:
            store._sync.destroy_synchronous()


def url(path: str) -> str:
    return f"https://127.0.0.1:{manager_mod.CONTROL_PORT}{path}"


async def join(ca: bytes, token: str) -> tuple[int, dict, bytes]:
    key, csr = pki.new_key_and_csr()
    conn = aiohttp.TCPConnector(ssl=pki.bootstrap_context(ca))
    async with aiohttp.ClientSession(connector=conn) as s:
        body = {"token": token, "csr": csr.decode(), "hostname": "w1", "addr": "127.0.0.9"}
        async with s.post(url("/cluster/join"), json=body) as r:
            return r.status, await r.json(), key


def files_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_init_writes_private_files_and_a_pinned_token(agent: Agent) -> None:
    certs = agent.certs
    assert files_mode(certs) == 0o700
    assert files_mode(certs / "swarm-node.key") == 0o600
    assert files_mode(certs / "swarm-root-ca.key") == 0o600
    assert files_mode(agent.opts.data_dir / "node.json") == 0o600
    assert files_mode(agent.opts.data_dir) == 0o700
    raft = agent.opts.data_dir / "raft"
    assert files_mode(raft) == 0o700
    assert all(files_mode(f) == 0o600 for f in raft.iterdir() if f.is_file())
    ca = pki.RootCA.load(certs)
    tokens = agent.manager.tokens()
    for t in tokens.values():
        assert pki.verify_ca_against_token(ca.cert_pem, t)


async def test_join_renew_rotate_and_revoke_a_keepalive_connection(agent: Agent) -> None:
    assert agent.manager is not None
    ca = pki.RootCA.load(agent.certs).public()
    token = agent.manager.tokens()["worker"]
    status, data, key = await join(ca.cert_pem, token)
    assert status == 200, data
    assert data["role"] == "worker" and "raft_password" not in data
    creds = pki.NodeCredentials(data["certificate"].encode(), key)
    ident = creds.identity(ca)
    assert ident.node_id == data["node_id"] and ident.role == "worker"

    # Without a certificate: 401 on everything but the CA and the join.
    conn = aiohttp.TCPConnector(ssl=pki.bootstrap_context(ca))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(url("/cluster/assignments")) as r:
            assert r.status == 401
        async with s.get(url("/cluster/ca")) as r:
            assert r.status == 200 and pki.ca_digest((await r.text()).encode()) == ca.digest

    ctx = pki.client_context(ca, creds.cert_pem, creds.key_pem)
    conn = aiohttp.TCPConnector(ssl=ctx, limit=1)  # one connection: keep-alive is reused
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(url("/cluster/assignments"), params={"index": "-1"}) as r:
            assert r.status == 200
            assert (await r.json())["node"]["id"] == ident.node_id
        # Renewal: a new certificate for the same node id and the store's role.
        key2, csr2 = pki.new_key_and_csr()
        async with s.post(url("/cluster/renew"), json={"csr": csr2.decode()}) as r:
            assert r.status == 200
            renewed = pki.NodeCredentials((await r.json())["certificate"].encode(), key2)
        assert renewed.identity(ca).node_id == ident.node_id
        async with s.post(url("/cluster/renew"), json={"csr": "junk"}) as r:
            assert r.status == 400
        # Rotation: the old worker token no longer admits anyone.
        await agent.manager.store.submit(
            {"op": "rotate_token", "role": "worker", "secret": pki.new_secret(), "now": "x"}
        )
        status, body, _ = await join(ca.cert_pem, token)
        assert status == 403, body
        # node rm: the same (kept-alive) connection is refused at its next request.
        result = await agent.manager.remove_node(ident.node_id, force=True)
        assert "error" not in result
        async with s.get(url("/cluster/assignments"), params={"index": "-1"}) as r:
            assert r.status == 403
            assert "removed" in (await r.json())["message"]
        # ...including with the renewed certificate (revocation is by node id).
    ctx2 = pki.client_context(ca, renewed.cert_pem, renewed.key_pem)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx2)) as s:
        async with s.get(url("/cluster/assignments")) as r:
            assert r.status == 403


async def test_join_with_a_bad_csr_or_malformed_token(agent: Agent) -> None:
    ca = pki.RootCA.load(agent.certs).public()
    token = agent.manager.tokens()["worker"]
    conn = aiohttp.TCPConnector(ssl=pki.bootstrap_context(ca))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post(url("/cluster/join"), json={"token": token, "csr": "x"}) as r:
            assert r.status == 400 and "csr" in (await r.json())["message"]
        async with s.post(url("/cluster/join"), json={"token": "SWMTKN-1-x"}) as r:
            assert r.status == 400
    before = agent.manager.store.read(lambda st: sorted(st.nodes))
    assert len(before) == 1


async def test_tcp_api_needs_tls_client_certificates_or_insecure(
    agent: Agent, tmp_path: Path
) -> None:
    import dataclasses
    import ssl

    port = free_port()
    base = dataclasses.replace(agent.opts, api=f"tcp://127.0.0.2:{port}", data_dir=tmp_path / "x")
    # Neither --tlsverify nor --insecure: refused, with a sentence saying what to pass.
    with pytest.raises(SystemExit, match="--tlsverify"):
        await Agent(base, FakeKernel())._serve_api()
    with pytest.raises(SystemExit, match="--tlscert"):
        await Agent(dataclasses.replace(base, tlsverify=True), FakeKernel())._serve_api()
    certs = agent.certs
    opts = dataclasses.replace(
        base,
        tlsverify=True,
        tlscacert=certs / "swarm-root-ca.crt",
        tlscert=certs / "swarm-node.crt",
        tlskey=certs / "swarm-node.key",
    )
    api = Agent(opts, FakeKernel())
    await api._serve_api()
    try:

        def ctx(with_cert: bool) -> ssl.SSLContext:
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            c.check_hostname = False
            c.verify_mode = ssl.CERT_NONE
            if with_cert:
                c.load_cert_chain(str(certs / "swarm-node.crt"), str(certs / "swarm-node.key"))
            return c

        target = f"https://127.0.0.2:{port}/_ping"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx(True))) as s:
            async with s.get(target) as r:
                assert r.status == 200
        with pytest.raises((aiohttp.ClientError, OSError)):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx(False))) as s:
                async with s.get(target) as r:
                    await r.read()
    finally:
        await api.close()
