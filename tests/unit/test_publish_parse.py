"""``--publish`` from the command line to the replicated state (issue 6).

Three layers, each with its own job, tested together so that a gap between them shows:

- ``swarmnet.cli.parse_publish`` parses only the SHAPE of the flag (docker's short form
  ``[mode=M,]PUBLISHED:TARGET[/PROTO]`` and the long form ``published=P,target=T,...``); a
  value it cannot read is passed on as is, so that the API is the one place that judges it;
- ``swarmnet.api.docker.parse_ports`` (via ``parse_service_spec``) judges the values and
  names the field at fault;
- ``ClusterState._resolve_ports`` judges what needs every other service: a published port
  already in use (409), whatever the publish mode.

What tests/unit/test_api_validation.py and test_state_services.py already cover is not
repeated here (TargetPort 0, Protocol sctp, Ports not a list, an ingress/ingress conflict,
tcp and udp on one number, dnsrr + ingress in the state machine).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_api_validation import expect_error

from swarmnet.api.client import APIError
from swarmnet.api.docker import parse_service_spec
from swarmnet.cli import _service_body, build_parser, parse_publish
from swarmnet.raft.state import ClusterState

NOW = "2025-01-01T00:00:00.000000Z"
P0 = "EndpointSpec.Ports[0]"

# ---------------------------------------------------------------------------- helpers


def body(ports: list[Any] | None, ep_mode: str | None = None) -> dict:
    """A valid ServiceSpec with these ``EndpointSpec.Ports`` (and endpoint mode)."""
    ep: dict = {}
    if ports is not None:
        ep["Ports"] = ports
    if ep_mode is not None:
        ep["Mode"] = ep_mode
    return {
        "Name": "web",
        "TaskTemplate": {"ContainerSpec": {"Image": "sleep", "Args": ["1000"]}},
        "EndpointSpec": ep,
    }


def no_networks(_key: str) -> str | None:
    return None


def spec_of(ports: list[Any] | None, ep_mode: str | None = None) -> dict:
    return parse_service_spec(body(ports, ep_mode), no_networks)


refused = expect_error  # the API validation tests' check: field, status, a message


# ------------------------------------------------------------------ parse_publish: shapes


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("80", {"TargetPort": 80}),
        ("8080:80", {"PublishedPort": 8080, "TargetPort": 80}),
        ("8080:80/udp", {"PublishedPort": 8080, "TargetPort": 80, "Protocol": "udp"}),
        ("53/udp", {"TargetPort": 53, "Protocol": "udp"}),
        (
            "mode=host,8081:80",
            {"PublishMode": "host", "PublishedPort": 8081, "TargetPort": 80},
        ),
        (
            "mode=ingress,8080:80/tcp",
            {"PublishMode": "ingress", "PublishedPort": 8080, "TargetPort": 80, "Protocol": "tcp"},
        ),
        (
            "published=8081,target=80,protocol=udp,mode=host",
            {"PublishedPort": 8081, "TargetPort": 80, "Protocol": "udp", "PublishMode": "host"},
        ),
        # The long form in any order, keys case-insensitive and padded, values trimmed by int().
        (
            "mode=host, Target=80 ,PUBLISHED= 8081",
            {"PublishMode": "host", "TargetPort": 80, "PublishedPort": 8081},
        ),
        ("target=80", {"TargetPort": 80}),
    ],
)
def test_parse_publish_shapes(text: str, port: dict) -> None:
    assert parse_publish(text) == port


@pytest.mark.parametrize(
    "text",
    [
        "8080:80,9090:90",  # two short forms in one flag
        "80,81",
        "host,8080:80",  # a mode without "mode="
        "port=80",  # unknown key
        "mode=host,8081:80,bogus=1",
    ],
)
def test_parse_publish_bad_shapes_are_400(text: str) -> None:
    with pytest.raises(APIError) as info:
        parse_publish(text)
    assert info.value.status == 400 and text in info.value.message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        # Values the CLI cannot judge go to the API unchanged, which names the field.
        ("published=abc,target=80", f"{P0}.PublishedPort"),
        ("8080:http", f"{P0}.TargetPort"),
        ("1.2.3.4:8080:80", f"{P0}.PublishedPort"),  # no host IP in a swarm publish
        ("8080:", f"{P0}.TargetPort"),
        ("", f"{P0}.TargetPort"),
        ("mode=host", f"{P0}.TargetPort"),
        ("mode=HOST,8081:80", f"{P0}.PublishMode"),  # values are not case-folded
        ("mode=bridge,8081:80", f"{P0}.PublishMode"),
        ("8080:80/TCP", f"{P0}.Protocol"),
        ("8080:80/sctp", f"{P0}.Protocol"),
        ("published=70000,target=80", f"{P0}.PublishedPort"),
        ("published=-1,target=80", f"{P0}.PublishedPort"),
        ("target=65536", f"{P0}.TargetPort"),
        ("mode=host,80", f"{P0}.PublishedPort"),  # host mode needs a published port
    ],
)
def test_cli_values_are_judged_by_the_api(text: str, field: str) -> None:
    port = parse_publish(text)
    refused(lambda: spec_of([port]), field)


def test_cli_service_body_with_host_publish_is_valid() -> None:
    """What ``service create --publish mode=host,published=8081,target=80`` sends is a spec
    the API keeps as written (host mode, no port picked)."""
    argv = ["service", "create", "--name", "web", "--replicas", "2",
            "--publish", "mode=host,published=8081,target=80",
            "--publish", "9000:90/udp", "--", "sleep", "1000"]  # fmt: skip
    args = build_parser().parse_args(argv)
    spec = parse_service_spec(_service_body(args), no_networks)
    assert spec["EndpointSpec"] == {
        "Mode": "vip",
        "Ports": [
            {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8081, "PublishMode": "host"},
            {"Protocol": "udp", "TargetPort": 90, "PublishedPort": 9000, "PublishMode": "ingress"},
        ],
    }


# ----------------------------------------------------------------- parse_ports: values


@pytest.mark.parametrize(
    ("ports", "ep_mode", "field", "status"),
    [
        (["8080:80"], None, P0, 400),  # an entry must be an object
        ([{"PublishedPort": 8080}], None, f"{P0}.TargetPort", 400),
        ([{"TargetPort": None}], None, f"{P0}.TargetPort", 400),
        ([{"TargetPort": "80"}], None, f"{P0}.TargetPort", 400),
        ([{"TargetPort": 80.0}], None, f"{P0}.TargetPort", 400),
        ([{"TargetPort": True}], None, f"{P0}.TargetPort", 400),
        ([{"TargetPort": 65536}], None, f"{P0}.TargetPort", 400),
        ([{"TargetPort": -80}], None, f"{P0}.TargetPort", 400),
        ([{"TargetPort": 80, "PublishedPort": True}], None, f"{P0}.PublishedPort", 400),
        ([{"TargetPort": 80, "PublishedPort": "8080"}], None, f"{P0}.PublishedPort", 400),
        ([{"TargetPort": 80, "PublishedPort": 65536}], None, f"{P0}.PublishedPort", 400),
        ([{"TargetPort": 80, "Protocol": "sctp"}], None, f"{P0}.Protocol", 400),
        ([{"TargetPort": 80, "Protocol": 6}], None, f"{P0}.Protocol", 400),
        ([{"TargetPort": 80, "PublishMode": "Host"}], None, f"{P0}.PublishMode", 400),
        ([{"TargetPort": 80, "PublishMode": ["host"]}], None, f"{P0}.PublishMode", 400),
        # Host mode has no mesh to pick a port on: an explicit one is required.
        ([{"TargetPort": 80, "PublishMode": "host"}], None, f"{P0}.PublishedPort", 400),
        (
            [{"TargetPort": 80, "PublishMode": "host", "PublishedPort": 0}],
            None,
            f"{P0}.PublishedPort",
            400,
        ),
        # dnsrr has no VIP for the mesh: refused before the state machine sees it, whether
        # ingress is written or is the default.
        ([{"TargetPort": 80, "PublishedPort": 8080}], "dnsrr", f"{P0}.PublishMode", 400),
        (
            [{"TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"}],
            "dnsrr",
            f"{P0}.PublishMode",
            400,
        ),
        # One spec listing a port twice (any mix of modes) is a conflict with itself.
        (
            [{"TargetPort": 80, "PublishedPort": 8080}, {"TargetPort": 81, "PublishedPort": 8080}],
            None,
            "EndpointSpec.Ports[1].PublishedPort",
            409,
        ),
        (
            [
                {"TargetPort": 80, "PublishedPort": 8080, "PublishMode": "host"},
                {"TargetPort": 81, "PublishedPort": 8080},
            ],
            None,
            "EndpointSpec.Ports[1].PublishedPort",
            409,
        ),
    ],
)
def test_bad_ports_name_the_field(
    ports: list[Any], ep_mode: str | None, field: str, status: int
) -> None:
    refused(lambda: spec_of(ports, ep_mode), field, status)


def test_good_ports_are_normalised() -> None:
    spec = spec_of(
        [
            {"TargetPort": 80},  # everything else defaulted
            {"TargetPort": 80, "PublishedPort": 8080, "Protocol": "udp"},
            {"TargetPort": 81, "PublishedPort": 8080},  # same number, other protocol
            {"TargetPort": 82},  # two "pick one" ports are not a duplicate
            {"TargetPort": 65535, "PublishedPort": 65535, "PublishMode": "host"},
        ]
    )
    assert spec["EndpointSpec"]["Ports"] == [
        {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 0, "PublishMode": "ingress"},
        {"Protocol": "udp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"},
        {"Protocol": "tcp", "TargetPort": 81, "PublishedPort": 8080, "PublishMode": "ingress"},
        {"Protocol": "tcp", "TargetPort": 82, "PublishedPort": 0, "PublishMode": "ingress"},
        {"Protocol": "tcp", "TargetPort": 65535, "PublishedPort": 65535, "PublishMode": "host"},
    ]


def test_dnsrr_may_publish_in_host_mode() -> None:
    """Docker's rule: dnsrr excludes only the mesh; a host-mode publish needs no VIP."""
    port = {"TargetPort": 80, "PublishedPort": 8081, "PublishMode": "host"}
    spec = spec_of([port], "dnsrr")
    assert spec["EndpointSpec"] == {"Mode": "dnsrr", "Ports": [{"Protocol": "tcp"} | port]}


@pytest.mark.parametrize("value", ["", [], {}, False, 0.0])
def test_falsy_non_port_published_is_refused(value: Any) -> None:
    refused(lambda: spec_of([{"TargetPort": 80, "PublishedPort": value}]), f"{P0}.PublishedPort")


@pytest.mark.parametrize("key", ["Protocol", "PublishMode"])
def test_falsy_non_string_protocol_or_mode_is_refused(key: str) -> None:
    refused(lambda: spec_of([{"TargetPort": 80, key: []}]), f"{P0}.{key}")


@pytest.mark.parametrize(
    ("port", "proto"), [(2377, "tcp"), (7946, "tcp"), (7946, "udp"), (4789, "udp")]
)
@pytest.mark.parametrize("mode", ["ingress", "host"])
def test_the_agents_own_ports_cannot_be_published(port: int, proto: str, mode: str) -> None:
    refused(
        lambda: spec_of(
            [{"TargetPort": 80, "PublishedPort": port, "Protocol": proto, "PublishMode": mode}]
        ),
        f"{P0}.PublishedPort",
    )


def test_unset_protocol_and_mode_take_the_defaults() -> None:
    spec = spec_of([{"TargetPort": 80, "PublishedPort": 8080, "Protocol": "", "PublishMode": None}])
    assert spec["EndpointSpec"]["Ports"][0]["Protocol"] == "tcp"
    assert spec["EndpointSpec"]["Ports"][0]["PublishMode"] == "ingress"


# ----------------------------------------------------------- the state: ports in use


def _init() -> ClusterState:
    s = ClusterState()
    r = s.apply(
        {
            "op": "init",
            "cluster_id": "c1",
            "tokens": {"worker": "w", "manager": "m"},
            "digest": "d",
            "now": NOW,
            "node": {"node_id": "n1", "hostname": "h1", "addr": "198.51.100.11",
                     "role": "manager"},
        }
    )  # fmt: skip
    assert "error" not in r, r
    return s


def _create(s: ClusterState, sid: str, name: str, ports: list[dict], ep_mode: str = "vip"):
    spec = parse_service_spec(body(ports, ep_mode) | {"Name": name}, no_networks)
    return s.apply({"op": "create_service", "id": sid, "spec": spec, "now": NOW})


def _update(s: ClusterState, sid: str, name: str, ports: list[dict]):
    spec = parse_service_spec(body(ports) | {"Name": name}, no_networks)
    version = s.services[sid]["version"]
    return s.apply(
        {"op": "update_service", "id": sid, "version": version, "spec": spec, "now": NOW}
    )


def _error(r: dict, field: str, status: int = 409) -> str:
    assert "error" in r, r
    e = r["error"]
    assert (e["field"], e["status"]) == (field, status), e
    return e["message"]


def host(port: int, target: int = 80, proto: str = "tcp") -> dict:
    return {"TargetPort": target, "PublishedPort": port, "PublishMode": "host", "Protocol": proto}


def ingress(port: int, target: int = 80) -> dict:
    return {"TargetPort": target, "PublishedPort": port, "PublishMode": "ingress"}


@pytest.mark.parametrize(
    ("first", "second"),
    [(host(8081), host(8081)), (host(8081), ingress(8081)), (ingress(8081), host(8081))],
    ids=["host-host", "host-then-ingress", "ingress-then-host"],
)
def test_a_published_port_belongs_to_one_service(first: dict, second: dict) -> None:
    """swarmnet reserves a published port cluster-wide in EVERY mode (Docker lets two
    host-mode services share a port and keeps their tasks on different nodes; our scheduler
    has no such filter, so the state refuses instead). The refusal names the field and the
    service holding the port, and stores nothing."""
    s = _init()
    assert "error" not in _create(s, "S1", "a", [first])
    before = (s.index, copy.deepcopy(s.services), s.ipam.to_dict())
    msg = _error(_create(s, "S2", "b", [second]), f"{P0}.PublishedPort")
    assert "8081/tcp" in msg and "service a" in msg
    assert (s.index, s.services, s.ipam.to_dict()) == before
    assert "error" not in _create(s, "S3", "c", [host(8081, proto="udp")])  # other protocol


def test_update_into_a_used_port_is_refused_and_removal_frees_it() -> None:
    s = _init()
    assert "error" not in _create(s, "S1", "a", [host(8081)])
    assert "error" not in _create(s, "S2", "b", [host(8082)])
    before = copy.deepcopy(s.services["S2"])
    _error(
        _update(s, "S2", "b", [host(8082), host(8081, 81)]), "EndpointSpec.Ports[1].PublishedPort"
    )
    assert s.services["S2"] == before
    # Its own port is not a conflict with itself, and a mode switch keeps it.
    r = _update(s, "S2", "b", [ingress(8082)])
    assert "error" not in r, r
    assert s.services["S2"]["endpoint"]["ports"][0]["PublishMode"] == "ingress"
    assert "error" not in s.apply({"op": "remove_service", "id": "S1", "now": NOW})
    assert "error" not in _create(s, "S3", "c", [host(8081)])


def test_host_mode_allocates_no_port_and_no_ingress_vip() -> None:
    """A host-mode port is never filled from 30000-32767 (the API refuses 0) and does not
    consume the next free ingress port either."""
    s = _init()
    assert "error" not in _create(s, "S1", "a", [host(30000)])
    assert "error" not in _create(s, "S2", "b", [{"TargetPort": 80}])
    assert s.services["S2"]["endpoint"]["ports"][0]["PublishedPort"] == 30001
    assert s.services["S1"]["endpoint"]["vips"] == {}


# ------------------------------------------------------------------- through HTTP


@contextlib.asynccontextmanager
async def _api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    # The in-process API harness of test_api_server.py (a real aiohttp app, Agent and
    # single-node Raft store, fake kernel), reused rather than copied.
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_api_server import harness
    finally:
        sys.path.pop(0)
    async with harness(tmp_path, monkeypatch) as h:
        yield h


async def test_http_conflict_and_dnsrr_are_4xx_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _api(tmp_path, monkeypatch) as h:
        await h.init()
        await h.ok("POST", "/services/create", 201, json=body([host(8081)]))
        status, resp, headers = await h.call(
            "POST", "/v1.51/services/create", json=body([host(8081)]) | {"Name": "web2"}
        )
        assert status == 409 and headers["Content-Type"] == "application/json"
        assert f"{P0}.PublishedPort" in resp["message"] and "web" in resp["message"]
        status, resp, _ = await h.call(
            "POST", "/services/create", json=body([ingress(8090)], "dnsrr") | {"Name": "rr"}
        )
        assert status == 400 and f"{P0}.PublishMode" in resp["message"], resp
        services = await h.ok("GET", "/services")
        assert [s["Spec"]["Name"] for s in services] == ["web"]
        ports = services[0]["Endpoint"]["Ports"]
        assert json.loads(json.dumps(ports)) == [host(8081) | {"Protocol": "tcp"}]
