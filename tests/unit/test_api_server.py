"""The Docker-shaped HTTP API end to end, without root or kernel: the real aiohttp app from
``make_app``, a real Agent with a FakeKernel, whose Manager runs a real single-node pysyncobj
Store and the real leader loop on 127.0.0.1. Only the worker role is stubbed (it would run
task processes in network namespaces).

Ports: the Raft port comes from RaftConfig; the manager's control port (2377) is a module
constant, which the fixture points at a free port, so these tests run next to a real agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stubs import StubWorker, free_port

import swarmnet.agent as agent_mod
import swarmnet.manager as manager_mod
from swarmnet.agent import Agent, AgentOptions
from swarmnet.api import docker as D
from swarmnet.api.server import NOT_MANAGER, make_app, prom_name
from swarmnet.kernel.fake import FakeKernel
from swarmnet.manager import Manager, ManagerConfig
from swarmnet.raft.store import RaftConfig

POLL_TIMEOUT_S = 30.0  # generous: a loaded CI machine may take a while to schedule


class Harness:
    def __init__(self, agent: Agent, client: TestClient):
        self.agent = agent
        self.client = client

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with self.client.request(method, path, **kw) as resp:
            raw = await resp.read()
            body: Any = None
            if raw and resp.content_type == "application/json":
                body = json.loads(raw)
            elif raw:
                body = raw.decode()
            return resp.status, body, resp.headers

    async def ok(self, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        got, body, _ = await self.call(method, path, **kw)
        assert got == status, (method, path, got, body)
        return body

    async def init(self) -> str:
        return await self.ok("POST", "/v1.51/swarm/init", json={"AdvertiseAddr": "127.0.0.1"})

    def snapshot(self) -> Any:
        """What a refused request must not change."""
        store = self.agent.manager.store
        return store.read(
            lambda s: (s.index, sorted(s.networks), sorted(s.services), s.ipam.to_dict())
        )


@contextlib.asynccontextmanager
async def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    raft_port, control_port = free_port(), free_port()
    monkeypatch.setattr(manager_mod, "CONTROL_PORT", control_port)
    monkeypatch.setattr(agent_mod, "Worker", StubWorker)
    monkeypatch.setattr(
        agent_mod,
        "Manager",
        functools.partial(
            Manager,
            # No worker polls here: never declare the node down during a test.
            config=ManagerConfig(node_down_after_s=3600.0, leader_loop_s=0.2),
            raft=RaftConfig(raft_port=raft_port),
        ),
    )
    opts = AgentOptions(
        data_dir=tmp_path / "agent",
        advertise_addr="127.0.0.1",
        api="tcp://127.0.0.1:0",
        hostname="h1",
    )
    agent = Agent(opts, FakeKernel())
    client = TestClient(TestServer(make_app(agent)))
    await client.start_server()
    try:
        yield Harness(agent, client)
    finally:
        await client.close()
        store = agent.manager.store if agent.manager else None
        await agent.close()
        if store is not None:
            store._sync.destroy_synchronous()  # the tick thread is gone before the next test


@pytest.fixture
async def h(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    async with harness(tmp_path, monkeypatch) as hh:
        yield hh


async def eventually(fn: Callable[[], Awaitable[Any]], what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_TIMEOUT_S
    while True:
        value = await fn()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- system


async def test_ping_version_info_before_init(h: Harness) -> None:
    for path in ("/_ping", "/v1.51/_ping", "/v1.24/_ping"):
        status, body, headers = await h.call("GET", path)
        assert (status, body) == (200, "OK")
        assert headers["Api-Version"] == D.API_VERSION
        assert headers["Swarm"] == "inactive"
        assert headers["Ostype"] == "linux"
    status, body, headers = await h.call("HEAD", "/_ping")
    assert status == 200 and headers["Swarm"] == "inactive"
    version = await h.ok("GET", "/version")
    assert version["ApiVersion"] == D.API_VERSION and version["MinAPIVersion"] == D.API_MIN_VERSION
    info = await h.ok("GET", "/v1.51/info")
    assert info["Swarm"]["LocalNodeState"] == "inactive" and info["Name"] == "h1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/swarm"),
        ("GET", "/nodes"),
        ("GET", "/networks"),
        ("GET", "/v1.51/networks/x"),
        ("POST", "/networks/create"),
        ("DELETE", "/networks/x"),
        ("GET", "/services"),
        ("POST", "/v1.51/services/create"),
        ("GET", "/tasks"),
        ("POST", "/swarm/update"),
    ],
)
async def test_not_a_manager_before_init(h: Harness, method: str, path: str) -> None:
    status, body, headers = await h.call(method, path, json={"Name": "x"})
    assert status == 503, body
    assert body == {"message": NOT_MANAGER}
    assert headers["Api-Version"] == D.API_VERSION


async def test_unknown_path_is_a_json_404(h: Harness) -> None:
    status, body, _ = await h.call("GET", "/v1.51/nonsense")
    assert status == 404 and "message" in body


# --------------------------------------------------------------------------- swarm, nodes


async def test_swarm_init_tokens_and_nodes(h: Harness) -> None:
    node_id = await h.init()
    assert re.fullmatch(r"[0-9a-z]{25}", node_id)
    _, _, headers = await h.call("GET", "/_ping")
    assert headers["Swarm"] == "active/manager"
    swarm = await h.ok("GET", "/v1.51/swarm")
    token_re = r"SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}"
    worker, manager = swarm["JoinTokens"]["Worker"], swarm["JoinTokens"]["Manager"]
    assert re.fullmatch(token_re, worker) and re.fullmatch(token_re, manager)
    assert worker != manager and worker.split("-")[2] == manager.split("-")[2]
    assert swarm["DefaultAddrPool"] == ["10.0.0.0/8"] and swarm["SubnetSize"] == 24
    # A second init is refused; the swarm is unchanged.
    status, body, _ = await h.call("POST", "/swarm/init", json={})
    assert status == 503 and "already part of a swarm" in body["message"]
    # Rotating the worker token changes only that token.
    await h.ok("POST", "/swarm/update?rotateWorkerToken=true")
    after = (await h.ok("GET", "/swarm"))["JoinTokens"]
    assert after["Worker"] != worker and after["Manager"] == manager
    nodes = await h.ok("GET", "/nodes")
    assert [n["ID"] for n in nodes] == [node_id]
    assert nodes[0]["Description"]["Hostname"] == "h1"
    assert nodes[0]["Spec"]["Role"] == "manager" and nodes[0]["Status"]["State"] == "ready"
    assert nodes[0]["ManagerStatus"]["Leader"] is True
    assert (await h.ok("GET", "/nodes/h1"))["ID"] == node_id
    assert (await h.ok("GET", f"/nodes/{node_id[:6]}"))["ID"] == node_id
    info = await h.ok("GET", "/info")
    assert info["Swarm"]["LocalNodeState"] == "active" and info["Swarm"]["Nodes"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"AdvertiseAddr": "198.51.100.7"}, "AdvertiseAddr"),
        ({"DefaultAddrPool": "10.0.0.0/8"}, "DefaultAddrPool"),
        # A pool refused by the replicated init: the agent closes the manager it just
        # started (this used to hang in Manager.close(), see manager._leader_loop).
        ({"DefaultAddrPool": ["8.8.0.0/16"]}, "DefaultAddrPool"),
        ({"SubnetSize": "24"}, "SubnetSize"),
        ({"DefaultAddrPool": ["10.0.0.0/8"], "SubnetSize": 4}, "SubnetSize"),
    ],
)
async def test_swarm_init_bad_input_leaves_no_swarm(h: Harness, body: dict, field: str) -> None:
    status, resp, _ = await asyncio.wait_for(h.call("POST", "/swarm/init", json=body), 5)
    assert status == 400, resp
    assert field in resp["message"]
    _, _, headers = await h.call("GET", "/_ping")
    assert headers["Swarm"] == "inactive"
    await h.init()  # and a good init still works afterwards


# --------------------------------------------------------------------------- networks


async def test_network_round_trip(h: Harness) -> None:
    await h.init()
    created = await h.ok(
        "POST", "/v1.51/networks/create", 201, json={"Name": "front", "Driver": "overlay"}
    )
    nid = created["Id"]
    assert re.fullmatch(r"[0-9a-z]{25}", nid)
    await h.ok(
        "POST",
        "/networks/create",
        201,
        json={
            "Name": "back",
            "IPAM": {"Config": [{"Subnet": "172.20.0.0/24"}]},
            "Labels": {"a": "b"},
        },
    )
    nets = await h.ok("GET", "/networks")
    # ingress: created by swarm init, 10.0.0.0/24 (issue 6), so "front" gets the next block
    assert [n["Name"] for n in nets] == ["back", "front", "ingress"]
    front = nets[1]
    assert (front["Id"], front["Driver"], front["Scope"]) == (nid, "overlay", "swarm")
    assert front["IPAM"]["Config"][0]["Subnet"] == "10.0.1.0/24"
    assert front["IPAM"]["Config"][0]["Gateway"] == "10.0.1.1"
    assert front["Options"]["com.docker.network.driver.overlay.vxlanid_list"] == "4097"
    assert nets[0]["IPAM"]["Config"][0]["Subnet"] == "172.20.0.0/24" and nets[0]["Labels"] == {
        "a": "b"
    }
    for key in (nid, nid[:5], "front"):
        assert (await h.ok("GET", f"/v1.51/networks/{key}"))["Id"] == nid
    filtered = await h.ok(
        "GET", "/networks", params={"filters": json.dumps({"name": {"fro": True}})}
    )
    assert [n["Name"] for n in filtered] == ["front"]
    # Conflicts and bad input: 4xx naming the field, nothing created.
    before = h.snapshot()
    for body, status, word in (
        ({"Name": "front"}, 409, "front"),
        ({"Name": "x", "IPAM": {"Config": [{"Subnet": "172.20.0.128/25"}]}}, 409, "Subnet"),
        ({"Name": "x", "IPAM": {"Config": [{"Subnet": "8.8.8.0/24"}]}}, 400, "Subnet"),
        ({"Name": "x", "IPAM": {"Config": [{"Subnet": "10.9.9.1/24"}]}}, 400, "Subnet"),
        ({"Name": "bad name"}, 400, "Name"),
        ({"Name": "x", "Driver": "bridge"}, 400, "Driver"),
    ):
        status_got, resp, _ = await h.call("POST", "/networks/create", json=body)
        assert status_got == status and word in resp["message"], (body, status_got, resp)
    assert h.snapshot() == before
    await h.ok("DELETE", "/networks/front", 204)
    status, resp, _ = await h.call("GET", f"/networks/{nid}")
    assert status == 404 and nid in resp["message"]
    status, _, _ = await h.call("DELETE", "/networks/front")
    assert status == 404


# --------------------------------------------------------------------------- services, tasks


def service_body(name: str, replicas: int, networks: list[str]) -> dict:
    return {
        "Name": name,
        "TaskTemplate": {
            "ContainerSpec": {"Image": "python3", "Args": ["-m", "http.server"]},
            "Networks": [{"Target": n} for n in networks],
        },
        "Mode": {"Replicated": {"Replicas": replicas}},
    }


async def test_services_and_tasks(h: Harness) -> None:
    node_id = await h.init()
    await h.ok("POST", "/networks/create", 201, json={"Name": "front"})
    subnet = ipaddress.ip_network(
        (await h.ok("GET", "/networks/front"))["IPAM"]["Config"][0]["Subnet"]
    )
    sid = (
        await h.ok("POST", "/v1.51/services/create", 201, json=service_body("web", 2, ["front"]))
    )["ID"]
    svc = await h.ok("GET", "/services/web")
    assert svc["ID"] == sid and svc["Spec"]["Name"] == "web"
    assert svc["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
    assert svc["ServiceStatus"]["DesiredTasks"] == 2
    version = svc["Version"]["Index"]
    assert (await h.ok("GET", f"/services/{sid[:4]}"))["ID"] == sid
    assert [s["ID"] for s in await h.ok("GET", "/services")] == [sid]

    # Update with the current version: scale to 3; the same version again is stale.
    await h.ok(
        "POST",
        f"/v1.51/services/web/update?version={version}",
        json=service_body("web", 3, ["front"]),
    )
    status, resp, _ = await h.call(
        "POST", f"/services/web/update?version={version}", json=service_body("web", 4, ["front"])
    )
    assert status == 409 and "out of sequence" in resp["message"]
    for query in ("", "?version=abc", "?version=-1", "?version=%C2%B2", f"?version={10**30}"):
        before = h.snapshot()
        status, resp, _ = await h.call(
            "POST", f"/services/web/update{query}", json=service_body("web", 4, ["front"])
        )
        assert 400 <= status < 500 and "version" in resp["message"], (query, status, resp)
        assert h.snapshot() == before
    svc = await h.ok("GET", "/services/web")
    assert svc["Spec"]["Mode"]["Replicated"]["Replicas"] == 3 and svc["Version"]["Index"] > version
    status, resp, _ = await h.call(
        "POST",
        f"/services/web/update?version={svc['Version']['Index']}",
        json=service_body("web2", 3, ["front"]),
    )
    assert status == 400 and "Name" in resp["message"]

    # The leader loop schedules the tasks onto the only node.
    flt = {"filters": json.dumps({"service": ["web"], "desired-state": ["running"]})}

    async def three_tasks() -> list | None:
        tasks = await h.ok("GET", "/tasks", params=flt)
        return tasks if len(tasks) == 3 else None

    tasks = await eventually(three_tasks, "3 tasks of web")
    assert sorted(t["Slot"] for t in tasks) == [1, 2, 3]
    addrs = set()
    for t in tasks:
        assert t["ServiceID"] == sid and t["NodeID"] == node_id and t["DesiredState"] == "running"
        assert t["Name"] == f"web.{t['Slot']}"
        (att,) = t["NetworksAttachments"]
        assert att["Network"]["Spec"]["Name"] == "front"
        (addr,) = att["Addresses"]
        assert ipaddress.ip_interface(addr).network == subnet
        addrs.add(addr)
    assert len(addrs) == 3
    one = tasks[0]
    assert (await h.ok("GET", f"/tasks/{one['ID']}"))["ID"] == one["ID"]
    assert (await h.ok("GET", f"/tasks/{one['Name']}"))["ID"] == one["ID"]

    # A network in use cannot go; unknown ids are 404.
    status, resp, _ = await h.call("DELETE", "/networks/front")
    assert status == 409 and "web" in resp["message"]
    for path in ("/services/nope", "/tasks/nope", "/networks/nope", "/nodes/nope"):
        status, resp, _ = await h.call("GET", path)
        assert status == 404 and "nope" in resp["message"], path
    status, _, _ = await h.call(
        "POST", "/services/nope/update?version=1", json=service_body("nope", 1, [])
    )
    assert status == 404
    status, _, _ = await h.call("DELETE", "/services/nope")
    assert status == 404
    status, resp, _ = await h.call("POST", "/services/create", json=service_body("web", 1, []))
    assert status == 409
    status, resp, _ = await h.call("POST", "/services/create", json=service_body("x", 1, ["nope"]))
    assert status == 404 and "TaskTemplate.Networks[0].Target" in resp["message"]

    await h.ok("DELETE", "/services/web")
    status, _, _ = await h.call("GET", f"/services/{sid}")
    assert status == 404
    remaining = await h.ok("GET", "/tasks")
    assert all(t["DesiredState"] == "remove" for t in remaining)


async def test_ipsec_settings_rotation_and_metrics(h: Harness) -> None:
    status, body, _ = await h.call("GET", "/swarmnet/ipsec")
    assert status == 503, body  # a manager's view
    await h.init()
    st = await h.ok("GET", "/swarmnet/ipsec")
    assert st["version"] == 0 and st["phase"] == "steady" and st["keys"] == []
    assert st["config"] == {"interval_s": 43200.0, "grace_s": 30.0, "threshold_packets": 1 << 31}
    before = h.snapshot()
    for body, field in (
        ({"bogus": 1}, "bogus"),
        ({"grace_s": -1}, "grace_s"),
        ({"threshold_packets": "x"}, "threshold_packets"),
        ({}, "body"),
        ([1], "body"),
    ):
        status, resp, _ = await h.call("POST", "/swarmnet/ipsec/config", json=body)
        assert status == 400 and field in resp["message"], (body, status, resp)
    assert h.snapshot() == before
    st = await h.ok("POST", "/swarmnet/ipsec/config", json={"grace_s": 5, "threshold_packets": 9})
    assert st["config"]["grace_s"] == 5.0 and st["config"]["threshold_packets"] == 9
    st = await h.ok("POST", "/v1.51/swarmnet/ipsec/rotate")
    assert st["force"] is True  # no encrypted network yet: asked, done at the first key set
    metrics = await h.ok("GET", "/swarmnet/metrics")
    assert isinstance(metrics, dict)
    status, text, headers = await h.call("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert all(
        re.fullmatch(r"# TYPE swarmnet_[a-z0-9_]+ untyped|swarmnet_[a-z0-9_]+ -?[0-9.e+]+", line)
        for line in text.strip().splitlines()
    ), text


async def test_dispatcher_heartbeat_at_init_and_update(h: Harness) -> None:
    for bad in ({"HeartbeatPeriod": "5s"}, {"HeartbeatPeriod": 10}, "x"):
        status, body, _ = await h.call(
            "POST", "/swarm/init", json={"AdvertiseAddr": "127.0.0.1", "Spec": {"Dispatcher": bad}}
        )
        assert status == 400 and "Spec.Dispatcher" in body["message"], (bad, body)
    assert h.agent.identity is None  # refused before anything was made
    await h.ok(
        "POST",
        "/swarm/init",
        json={
            "AdvertiseAddr": "127.0.0.1",
            "Spec": {"Dispatcher": {"HeartbeatPeriod": 30 * 10**9}},
        },
    )
    sw = await h.ok("GET", "/swarm")
    assert sw["Spec"]["Dispatcher"]["HeartbeatPeriod"] == 30 * 10**9
    assert h.agent.manager.node_down_after_s() == 60.0
    version = sw["Version"]["Index"]
    status, body, _ = await h.call(
        "POST", f"/swarm/update?version={version}", json={"Dispatcher": {"HeartbeatPeriod": -1}}
    )
    assert status == 400 and "Dispatcher.HeartbeatPeriod" in body["message"]
    await h.ok(
        "POST",
        f"/swarm/update?version={version}",
        json={"Dispatcher": {"HeartbeatPeriod": 7 * 10**9}},
    )
    assert h.agent.manager.node_down_after_s() == 14.0
    assert (await h.ok("GET", "/swarm"))["Spec"]["Dispatcher"]["HeartbeatPeriod"] == 7 * 10**9


def test_prometheus_names() -> None:
    assert prom_name("swarmnet_ipsec_XfrmInNoStates") == "swarmnet_ipsec_xfrm_in_no_states"
    assert prom_name("swarmnet_gossip_drop.bad-crc") == "swarmnet_gossip_drop_bad_crc"
    assert prom_name("9lives") == "_9lives"


async def test_bad_json_and_filters_are_4xx(h: Harness) -> None:
    await h.init()
    await h.ok("POST", "/networks/create", 201, json={"Name": "front"})
    before = h.snapshot()
    for raw in (
        b"{",
        b"\xff\xfe",
        b'"\xff"',
        b'"\\ud800"',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"Name": "\\ud800"}',
    ):
        for path in ("/networks/create", "/services/create"):
            status, resp, _ = await h.call(
                "POST", path, data=raw, headers={"Content-Type": "application/json"}
            )
            assert 400 <= status < 500, (path, raw[:20], status, resp)
            assert "message" in resp
    assert h.snapshot() == before
    for flt in (
        '{"name": [1]}',
        '{"name": {"1": true}}',
        '{"id": [null]}',
        "[1]",
        "{",
        '{"service": [[]]}',
    ):
        for path in ("/networks", "/services", "/tasks"):
            status, resp, _ = await h.call("GET", path, params={"filters": flt})
            assert status == 200 or 400 <= status < 500, (path, flt, status, resp)


# --------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.sampled_from(
        ["front", "overlay", "10.0.0.0/24", "172.16.0.0/29", "sleep", "A=b", "\ud800"]
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "Name",
                    "Driver",
                    "IPAM",
                    "Config",
                    "Subnet",
                    "TaskTemplate",
                    "ContainerSpec",
                    "Image",
                    "Args",
                    "Networks",
                    "Target",
                    "Aliases",
                    "Mode",
                    "Replicated",
                    "Replicas",
                    "Labels",
                    "Options",
                    "EndpointSpec",
                    "ForceUpdate",
                    "Env",
                ]
            )
            | st.text(max_size=5),
            inner,
            max_size=5,
        )
    ),
    max_leaves=15,
)


def _mutate(body: dict, path: tuple[str, ...], value: Any) -> dict:
    node: Any = body
    for p in path[:-1]:
        nxt = node.get(p) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[path[-1]] = value
    return body


NETWORK_PATHS = [
    ("Name",),
    ("Driver",),
    ("IPAM",),
    ("IPAM", "Config"),
    ("Options",),
    ("Labels",),
    ("Attachable",),
]
SERVICE_PATHS = [
    ("Name",),
    ("TaskTemplate",),
    ("TaskTemplate", "ContainerSpec"),
    ("TaskTemplate", "ContainerSpec", "Image"),
    ("TaskTemplate", "ContainerSpec", "Args"),
    ("TaskTemplate", "ContainerSpec", "Env"),
    ("TaskTemplate", "Networks"),
    ("TaskTemplate", "ForceUpdate"),
    ("Mode",),
    ("Mode", "Replicated"),
    ("Mode", "Replicated", "Replicas"),
    ("EndpointSpec",),
    ("Labels",),
]


def body_strategy(kind: str) -> st.SearchStrategy:
    if kind == "network":
        base = {"Name": "fz", "IPAM": {"Config": [{"Subnet": "172.18.0.0/24"}]}}
        paths = NETWORK_PATHS
    else:
        base = service_body("fz", 1, ["front"])
        paths = SERVICE_PATHS
    mutated = st.builds(
        lambda path, value: _mutate(json.loads(json.dumps(base)), path, value),
        st.sampled_from(paths),
        JSON,
    )
    return JSON | mutated


@pytest.mark.slow
def test_fuzz_create_bodies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only 2xx or 4xx, never a 5xx, and a 4xx changes nothing. Sync test with its own loop,
    because hypothesis drives the examples and each one awaits the real server."""
    loop = asyncio.new_event_loop()
    ctx = harness(tmp_path, monkeypatch)
    h = loop.run_until_complete(ctx.__aenter__())
    try:
        loop.run_until_complete(h.init())
        loop.run_until_complete(h.ok("POST", "/networks/create", 201, json={"Name": "front"}))

        async def one(path: str, body: Any) -> None:
            before = h.snapshot()
            status, resp, _ = await h.call("POST", path, data=json.dumps(body))
            assert status < 500, (path, body, status, resp)
            if status >= 400:
                assert isinstance(resp, dict) and resp.get("message"), resp
                assert h.snapshot() == before, (path, body, resp)
                return
            assert status == 201, (status, resp)
            # Clean up so that later examples are not all name conflicts.
            if "/networks/" in path:
                await h.ok("DELETE", f"/networks/{resp['Id']}", 204)
            else:
                await h.ok("DELETE", f"/services/{resp['ID']}")

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            which=st.sampled_from(["network", "service"]),
            data=st.data(),
        )
        def fuzz(which: str, data: st.DataObject) -> None:
            body = data.draw(body_strategy(which))
            path = "/v1.51/networks/create" if which == "network" else "/services/create"
            loop.run_until_complete(one(path, body))

        fuzz()
    finally:
        loop.run_until_complete(ctx.__aexit__(None, None, None))
        loop.close()
