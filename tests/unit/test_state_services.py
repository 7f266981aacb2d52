"""Issue 6 in the replicated state: the ingress network at init, node ingress addresses,
service VIPs (allocation, release, vip <-> dnsrr), published ports (allocation, conflicts)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from swarmnet.manager import assignment_for
from swarmnet.raft.state import ClusterState, ingress_id_for

NOW = "2025-01-01T00:00:00.000000Z"


def init(s: ClusterState) -> None:
    ok(
        s,
        {
            "op": "init",
            "cluster_id": "c1",
            "tokens": {"worker": "w", "manager": "m"},
            "digest": "d",
            "now": NOW,
            "node": {"node_id": "n1", "hostname": "h1", "addr": "198.51.100.1", "role": "manager"},
        },
    )


def ok(s: ClusterState, cmd: dict) -> dict:
    r = s.apply(cmd)
    assert "error" not in r, r
    return r


def refused(s: ClusterState, cmd: dict, status: int, field: str) -> dict:
    r = s.apply(cmd)
    assert "error" in r, r
    assert (r["error"]["status"], r["error"]["field"]) == (status, field), r
    return r["error"]


def spec(name: str, nets: tuple[str, ...] = (), mode: str = "vip", ports: Any = None) -> dict:
    ep: dict = {"Mode": mode}
    if ports:
        ep["Ports"] = [
            {"Protocol": "tcp", "PublishMode": "ingress", "PublishedPort": 0} | p for p in ports
        ]
    return {
        "Name": name,
        "TaskTemplate": {
            "ContainerSpec": {"Image": "sleep", "Args": ["1"]},
            "Networks": [{"Target": n, "Aliases": []} for n in nets],
        },
        "Mode": {"Replicated": {"Replicas": 1}},
        "EndpointSpec": ep,
    }


def create(sid: str, sp: dict) -> dict:
    return {"op": "create_service", "id": sid, "spec": sp, "now": NOW}


@pytest.fixture
def s() -> ClusterState:
    st = ClusterState()
    init(st)
    ok(st, {"op": "create_network", "id": "N1", "name": "front", "now": NOW})
    return st


def test_ingress_at_init_takes_the_first_block_and_vni(s: ClusterState) -> None:
    ing = s.ingress_network()
    assert ing is not None and ing["id"] == ingress_id_for("c1")
    assert (ing["name"], ing["subnet"], ing["vni"], ing["ingress"]) == (
        "ingress",
        "10.0.0.0/24",
        4096,
        True,
    )
    assert s.networks["N1"]["subnet"] == "10.0.1.0/24"  # users get the next block
    assert s.nodes["n1"]["ingress_addr"] == "10.0.0.2/24"
    ok(
        s,
        {
            "op": "add_node",
            "node_id": "n2",
            "hostname": "h2",
            "addr": "198.51.100.2",
            "role": "worker",
            "now": NOW,
        },
    )
    assert s.nodes["n2"]["ingress_addr"] == "10.0.0.3/24"
    ok(s, {"op": "node_state", "node_id": "n2", "state": "down", "now": NOW})
    ok(s, {"op": "remove_node", "node_id": "n2", "now": NOW})
    assert "node:n2" not in s.ipam.used_ips(ing["id"])


def test_vip_per_network_released_on_remove(s: ClusterState) -> None:
    ok(s, create("S1", spec("web", ("N1",))))
    assert s.services["S1"]["endpoint"]["vips"] == {"N1": "10.0.1.2/24"}
    assert s.ipam.used_ips("N1") == {"vip:S1": "10.0.1.2/24"}
    ok(s, {"op": "remove_service", "id": "S1", "now": NOW})
    assert s.ipam.used_ips("N1") == {}


def test_dnsrr_has_no_vip_and_a_switch_releases_or_allocates(s: ClusterState) -> None:
    ok(s, create("S1", spec("web", ("N1",), mode="dnsrr")))
    assert s.services["S1"]["endpoint"]["vips"] == {}
    v = s.services["S1"]["version"]
    ok(
        s,
        {
            "op": "update_service",
            "id": "S1",
            "version": v,
            "spec": spec("web", ("N1",)),
            "now": NOW,
        },
    )
    assert set(s.services["S1"]["endpoint"]["vips"]) == {"N1"}
    v = s.services["S1"]["version"]
    ok(
        s,
        {
            "op": "update_service",
            "id": "S1",
            "version": v,
            "spec": spec("web", ("N1",), mode="dnsrr"),
            "now": NOW,
        },
    )
    assert s.services["S1"]["endpoint"]["vips"] == {}  # moby#38575: no VIP survives
    assert s.ipam.used_ips("N1") == {}


def test_published_ports_attach_ingress_and_allocate(s: ClusterState) -> None:
    iid = s.ingress_network()["id"]
    ok(s, create("S1", spec("web", ("N1",), ports=[{"TargetPort": 80, "PublishedPort": 8080}])))
    ok(s, create("S2", spec("api", (), ports=[{"TargetPort": 80}, {"TargetPort": 81}])))
    assert [p["PublishedPort"] for p in s.services["S2"]["endpoint"]["ports"]] == [30000, 30001]
    assert set(s.services["S1"]["endpoint"]["vips"]) == {"N1", iid}
    ok(
        s,
        {
            "op": "create_task",
            "id": "T1",
            "service_id": "S1",
            "slot": 1,
            "node_id": "n1",
            "now": NOW,
        },
    )
    assert [a["network_id"] for a in s.tasks["T1"]["networks"]] == ["N1", iid]
    # A host-mode publish attaches to ingress (the node's path to its task) without a VIP.
    ok(
        s,
        create(
            "S3",
            spec("h", (), ports=[{"TargetPort": 80, "PublishedPort": 9000, "PublishMode": "host"}]),
        ),
    )
    assert s.services["S3"]["endpoint"]["vips"] == {}
    # The assignment carries what DNS and the LBs need, on every node.
    a = assignment_for(s, "n1")
    assert a["ingress_network_id"] == iid and iid in a["networks"]
    assert a["node"]["ingress_addr"] == "10.0.0.2/24"
    assert {x["name"] for x in a["services"]} == {"web", "api", "h"}
    assert any(e["task_id"] == "node:n1" for e in a["endpoints"])


def test_port_conflicts_and_ingress_removal(s: ClusterState) -> None:
    ok(s, create("S1", spec("web", (), ports=[{"TargetPort": 80, "PublishedPort": 8080}])))
    refused(
        s,
        create("S2", spec("b", (), ports=[{"TargetPort": 80, "PublishedPort": 8080}])),
        409,
        "EndpointSpec.Ports[0].PublishedPort",
    )
    ok(
        s,
        create(
            "S3",
            spec("c", (), ports=[{"TargetPort": 53, "PublishedPort": 8080, "Protocol": "udp"}]),
        ),
    )  # other protocol: fine
    refused(
        s,
        create("S4", spec("d", (), mode="dnsrr", ports=[{"TargetPort": 80}])),
        400,
        "EndpointSpec.Ports[0].PublishMode",
    )
    before = copy.deepcopy(s.ipam.to_dict())
    refused(s, {"op": "remove_network", "id": s.ingress_network()["id"]}, 409, "id")
    assert s.ipam.to_dict() == before
    ok(s, {"op": "remove_service", "id": "S1", "now": NOW})
    ok(s, {"op": "remove_service", "id": "S3", "now": NOW})
    ok(s, {"op": "remove_network", "id": s.ingress_network()["id"]})
    assert s.ingress_network() is None


def test_replay_is_deterministic() -> None:
    def build() -> ClusterState:
        st = ClusterState()
        init(st)
        ok(st, create("S1", spec("web", (), ports=[{"TargetPort": 80}])))
        return st

    a, b = build(), build()
    assert a.ipam == b.ipam and a.services == b.services and a.networks == b.networks
