"""Tests of the Docker Engine API body validation (swarmnet/api/docker.py).

Good and bad bodies for ``parse_network_create`` and ``parse_service_spec``: every refusal is
a CommandError naming the field at fault, and (hypothesis) arbitrary JSON anywhere in a body
gives a 4xx CommandError or a valid result, never another exception. A valid result must
also survive msgpack, since it becomes a Raft command.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmnet.api.docker import (
    join_token,
    parse_network_create,
    parse_service_spec,
    render_network,
    service_argv,
    split_token,
)
from swarmnet.raft.state import CommandError

NETS = {"front": "N1", "N1": "N1"}


def resolve(key: str) -> str | None:
    return NETS.get(key)


def good_service() -> dict:
    return {
        "Name": "web",
        "Labels": {"tier": "front"},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": "python3",
                "Args": ["-m", "http.server"],
                "Env": ["PORT=8000"],
            },
            "Networks": [{"Target": "front", "Aliases": ["www"]}],
            "ForceUpdate": 2,
        },
        "Mode": {"Replicated": {"Replicas": 3}},
        "EndpointSpec": {"Mode": "dnsrr"},
    }


def expect_error(fn, field: str, status: int = 400) -> CommandError:
    with pytest.raises(CommandError) as info:
        fn()
    e = info.value
    assert (e.field, e.status) == (field, status), (e.field, e.status, e.message)
    assert e.message
    return e


def packable(value: Any) -> None:
    assert msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False) == value


# --------------------------------------------------------------------------- networks


def test_network_create_good_bodies() -> None:
    assert parse_network_create({"Name": "net"}) == {
        "name": "net",
        "driver": "overlay",
        "subnet": None,
        "attachable": False,
        "options": {},
        "labels": {},
    }
    got = parse_network_create(
        {
            "Name": "net",
            "Driver": "overlay",
            "Attachable": True,
            "IPAM": {"Driver": "default", "Config": [{"Subnet": "10.1.2.0/24"}]},
            "Options": {"com.example": "x"},
            "Labels": {"a": "b"},
        }
    )
    assert got["subnet"] == "10.1.2.0/24" and got["attachable"] is True
    assert got["options"] == {"com.example": "x"} and got["labels"] == {"a": "b"}
    assert parse_network_create({"Name": "n", "IPAM": {"Config": [{}]}})["subnet"] is None
    assert parse_network_create({"Name": "n", "IPAM": None, "Options": None})["subnet"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (None, "Name"),
        ([], "body"),
        ("net", "body"),
        (5, "body"),
        ({}, "Name"),
        ({"Name": 5}, "Name"),
        ({"Name": "bad name"}, "Name"),
        ({"Name": "n\n"}, "Name"),
        ({"Name": "n", "Driver": "bridge"}, "Driver"),
        ({"Name": "n", "Driver": ["overlay"]}, "Driver"),
        ({"Name": "n", "IPAM": "x"}, "IPAM"),
        ({"Name": "n", "IPAM": {"Config": {"Subnet": "10.0.0.0/24"}}}, "IPAM.Config"),
        ({"Name": "n", "IPAM": {"Config": [{}, {}]}}, "IPAM.Config"),
        ({"Name": "n", "IPAM": {"Config": ["10.0.0.0/24"]}}, "IPAM.Config[0]"),
        ({"Name": "n", "IPAM": {"Config": [{"Subnet": 10}]}}, "IPAM.Config[0].Subnet"),
        ({"Name": "n", "IPAM": {"Config": [{"Subnet": "banana"}]}}, "IPAM.Config[0].Subnet"),
        ({"Name": "n", "IPAM": {"Config": [{"Subnet": "fd00::/64"}]}}, "IPAM.Config[0].Subnet"),
        ({"Name": "n", "Options": ["encrypted"]}, "Options"),
        ({"Name": "n", "Options": {"a": 1}}, "Options"),
        ({"Name": "n", "Labels": {"a": None}}, "Labels"),
        ({"Name": "n", "Labels": {"a": "\ud800"}}, "Labels"),
        ({"Name": "n", "EnableIPv6": True}, "EnableIPv6"),
    ],
)
def test_network_create_bad_bodies(body: Any, field: str) -> None:
    expect_error(lambda: parse_network_create(body), field)


def test_render_network_docker_shape() -> None:
    n = {
        "id": "N1",
        "name": "net",
        "subnet": "10.0.0.0/24",
        "gateway": "10.0.0.1",
        "vni": 4096,
        "attachable": False,
        "ingress": False,
        "options": {},
        "labels": {},
        "created": "t",
    }
    r = render_network(n)
    assert (r["Id"], r["Name"], r["Driver"], r["Scope"]) == ("N1", "net", "overlay", "swarm")
    assert r["IPAM"]["Config"][0] == {"Subnet": "10.0.0.0/24", "Gateway": "10.0.0.1"}
    assert r["Options"]["com.docker.network.driver.overlay.vxlanid_list"] == "4096"
    json.dumps(r)


# --------------------------------------------------------------------------- services


def test_service_spec_good_body_normalised() -> None:
    spec = parse_service_spec(good_service(), resolve)
    assert spec["Name"] == "web" and spec["Labels"] == {"tier": "front"}
    cs = spec["TaskTemplate"]["ContainerSpec"]
    assert cs == {
        "Image": "python3",
        "Args": ["-m", "http.server"],
        "Command": [],
        "Env": ["PORT=8000"],
    }
    assert spec["TaskTemplate"]["Networks"] == [{"Target": "N1", "Aliases": ["www"]}]
    assert spec["TaskTemplate"]["ForceUpdate"] == 2
    assert spec["Mode"] == {"Replicated": {"Replicas": 3}}
    assert spec["EndpointSpec"] == {"Mode": "dnsrr"}
    assert service_argv(spec) == ["python3", "-m", "http.server"]
    packable(spec)


def test_service_spec_defaults_and_top_level_networks() -> None:
    spec = parse_service_spec(
        {
            "Name": "w",
            "TaskTemplate": {"ContainerSpec": {"Image": "sleep"}},
            "Networks": [{"Target": "N1"}],
        },
        resolve,
    )
    assert spec["Mode"] == {"Replicated": {"Replicas": 1}}
    assert spec["EndpointSpec"] == {"Mode": "vip"}
    assert spec["TaskTemplate"]["Networks"] == [{"Target": "N1", "Aliases": []}]
    assert parse_service_spec(
        {
            "Name": "w",
            "TaskTemplate": {"ContainerSpec": {"Image": "x"}},
            "Mode": {"Replicated": {"Replicas": 0}},
        },
        resolve,
    )["Mode"] == {"Replicated": {"Replicas": 0}}


def _with(path: str, value: Any) -> dict:
    """good_service() with the value at a dotted path replaced ('-' deletes it)."""
    body = good_service()
    *parents, last = path.split(".")
    node: Any = body
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value == "-":
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


CS = "TaskTemplate.ContainerSpec"
SERVICE_ERRORS: list[tuple[Any, str, int]] = [
    (None, "Name", 400),
    ([], "body", 400),
    ("web", "body", 400),
    (_with("Name", "-"), "Name", 400),
    (_with("Name", "web/1"), "Name", 400),
    (_with("Name", 7), "Name", 400),
    (_with("TaskTemplate", []), "TaskTemplate", 400),
    (_with("TaskTemplate.ContainerSpec", "sleep"), CS, 400),
    (_with("TaskTemplate.ContainerSpec.Image", "-"), f"{CS}.Image", 400),
    (_with("TaskTemplate.ContainerSpec.Image", "  "), f"{CS}.Image", 400),
    (_with("TaskTemplate.ContainerSpec.Image", ["sleep"]), f"{CS}.Image", 400),
    (_with("TaskTemplate.ContainerSpec.Image", "a\x00b"), f"{CS}.Image", 400),
    (_with("TaskTemplate.ContainerSpec.Args", "-m"), f"{CS}.Args", 400),
    (_with("TaskTemplate.ContainerSpec.Args", [1]), f"{CS}.Args", 400),
    (_with("TaskTemplate.ContainerSpec.Args", ["\udc80"]), f"{CS}.Args", 400),
    (_with("TaskTemplate.ContainerSpec.Command", "sh -c"), f"{CS}.Command", 400),
    (_with("TaskTemplate.ContainerSpec.Env", ["NOEQUALS"]), f"{CS}.Env", 400),
    (_with("TaskTemplate.ContainerSpec.Env", {"A": "b"}), f"{CS}.Env", 400),
    (_with("Mode", "replicated"), "Mode", 400),
    (_with("Mode", {"Global": {}}), "Mode.Global", 400),
    (_with("Mode.Replicated", 3), "Mode.Replicated", 400),
    (_with("Mode.Replicated.Replicas", -1), "Mode.Replicated.Replicas", 400),
    (_with("Mode.Replicated.Replicas", "3"), "Mode.Replicated.Replicas", 400),
    (_with("Mode.Replicated.Replicas", 1.5), "Mode.Replicated.Replicas", 400),
    (_with("Mode.Replicated.Replicas", True), "Mode.Replicated.Replicas", 400),
    (_with("Mode.Replicated.Replicas", None), "Mode.Replicated.Replicas", 400),
    (_with("Mode.Replicated.Replicas", 10001), "Mode.Replicated.Replicas", 400),
    (_with("TaskTemplate.Networks", {"Target": "front"}), "TaskTemplate.Networks", 400),
    (_with("TaskTemplate.Networks.0", "front"), "TaskTemplate.Networks[0]", 400),
    (_with("TaskTemplate.Networks.0.Target", "-"), "TaskTemplate.Networks[0].Target", 400),
    (_with("TaskTemplate.Networks.0.Target", 3), "TaskTemplate.Networks[0].Target", 400),
    (_with("TaskTemplate.Networks.0.Target", "nope"), "TaskTemplate.Networks[0].Target", 404),
    (
        _with("TaskTemplate.Networks", [{"Target": "front"}, {"Target": "N1"}]),
        "TaskTemplate.Networks[1].Target",
        400,
    ),
    (_with("TaskTemplate.Networks.0.Aliases", 5), "TaskTemplate.Networks[0].Aliases", 400),
    (_with("TaskTemplate.Networks.0.Aliases", "www"), "TaskTemplate.Networks[0].Aliases", 400),
    (_with("TaskTemplate.Networks.0.Aliases", [{}]), "TaskTemplate.Networks[0].Aliases", 400),
    (_with("TaskTemplate.ForceUpdate", "abc"), "TaskTemplate.ForceUpdate", 400),
    (_with("TaskTemplate.ForceUpdate", [1]), "TaskTemplate.ForceUpdate", 400),
    (_with("TaskTemplate.ForceUpdate", 1e400), "TaskTemplate.ForceUpdate", 400),
    (_with("TaskTemplate.ForceUpdate", 2**64), "TaskTemplate.ForceUpdate", 400),
    (_with("TaskTemplate.ForceUpdate", -1), "TaskTemplate.ForceUpdate", 400),
    (_with("EndpointSpec", "vip"), "EndpointSpec", 400),
    (_with("EndpointSpec.Mode", "round-robin"), "EndpointSpec.Mode", 400),
    (_with("EndpointSpec.Mode", ["vip"]), "EndpointSpec.Mode", 400),
    (_with("EndpointSpec.Ports", {"TargetPort": 80}), "EndpointSpec.Ports", 400),
    (_with("EndpointSpec.Ports", [{"TargetPort": 0}]), "EndpointSpec.Ports[0].TargetPort", 400),
    (
        _with("EndpointSpec.Ports", [{"TargetPort": 80, "Protocol": "sctp"}]),
        "EndpointSpec.Ports[0].Protocol",
        400,
    ),
    (_with("Labels", ["a"]), "Labels", 400),
    (_with("Labels", {"a": 1}), "Labels", 400),
]


@pytest.mark.parametrize(("body", "field", "status"), SERVICE_ERRORS)
def test_service_spec_bad_bodies(body: Any, field: str, status: int) -> None:
    expect_error(lambda: parse_service_spec(body, resolve), field, status)


def test_service_spec_does_not_alias_the_body() -> None:
    body = good_service()
    spec = parse_service_spec(body, resolve)
    snapshot = copy.deepcopy(spec)
    body["TaskTemplate"]["ContainerSpec"]["Args"].append("mutated")
    body["TaskTemplate"]["Networks"][0]["Aliases"].append("mutated")
    assert spec == snapshot


# --------------------------------------------------------------------------- join tokens


def test_join_token_round_trip_and_errors() -> None:
    tok = join_token("abc123", "s3cr3t")
    assert tok == "SWMTKN-1-abc123-s3cr3t"
    assert split_token(tok) == ("abc123", "s3cr3t")
    for bad in (None, 5, "", "SWMTKN-1-", "SWMTKN-1-abc", "SWMTKN-1-a-b-c", "SWMTKN-2-a-b"):
        expect_error(lambda bad=bad: split_token(bad), "JoinToken")


# --------------------------------------------------------------------------- fuzz

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "overlay", "front", "N1", "10.0.0.0/24", "A=b", "\ud800", "a\x00"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["Name", "Target", "Subnet", "Replicas", "Image", "Config", "x"])
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)

NET_FIELDS = [
    "body",
    "Name",
    "Driver",
    "IPAM",
    "IPAM.Config",
    "Options",
    "Labels",
    "EnableIPv6",
    "Attachable",
]
SERVICE_FIELDS = [
    "body",
    "Name",
    "Labels",
    "TaskTemplate",
    "TaskTemplate.ContainerSpec",
    "TaskTemplate.ContainerSpec.Image",
    "TaskTemplate.ContainerSpec.Args",
    "TaskTemplate.ContainerSpec.Args.0",
    "TaskTemplate.ContainerSpec.Command",
    "TaskTemplate.ContainerSpec.Env",
    "TaskTemplate.ContainerSpec.Env.0",
    "TaskTemplate.Networks",
    "TaskTemplate.Networks.0",
    "TaskTemplate.Networks.0.Target",
    "TaskTemplate.Networks.0.Aliases",
    "TaskTemplate.ForceUpdate",
    "Networks",
    "Mode",
    "Mode.Replicated",
    "Mode.Replicated.Replicas",
    "EndpointSpec",
    "EndpointSpec.Mode",
    "EndpointSpec.Ports",
]


def _good_network() -> dict:
    return {"Name": "net", "IPAM": {"Config": [{"Subnet": "10.1.0.0/24"}]}, "Labels": {"a": "b"}}


def _replace(body: dict, path: str, value: Any) -> Any:
    if path == "body":
        return value
    *parents, last = path.split(".")
    node: Any = body
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


def _check_outcome(fn) -> None:
    try:
        result = fn()
    except CommandError as e:
        assert 400 <= e.status < 500, (e.status, e.field, e.message)
        assert isinstance(e.field, str) and e.field and e.message
        return
    packable(result)  # a Raft command must be able to carry it
    json.dumps(result)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(field=st.sampled_from(NET_FIELDS), value=JSON)
def test_fuzz_network_create_one_field(field: str, value: Any) -> None:
    body = _replace(_good_network(), field, value)
    _check_outcome(lambda: parse_network_create(body))


@FUZZ
@given(field=st.sampled_from(SERVICE_FIELDS), value=JSON)
def test_fuzz_service_spec_one_field(field: str, value: Any) -> None:
    body = _replace(good_service(), field, value)
    _check_outcome(lambda: parse_service_spec(body, resolve))


@FUZZ
@given(body=JSON)
def test_fuzz_whole_bodies(body: Any) -> None:
    _check_outcome(lambda: parse_network_create(body))
    _check_outcome(lambda: parse_service_spec(body, resolve))


@pytest.mark.parametrize(
    ("given", "program"),
    [
        ("python3", "python3"),
        ("python3:latest", "python3"),
        ("docker.io/library/python3:latest", "python3"),
        ("python3:latest@sha256:" + "0" * 64, "python3"),
        ("/usr/bin/env", "/usr/bin/env"),
    ],
)
def test_docker_cli_image_normalisation_is_undone(given: str, program: str) -> None:
    from swarmnet.api.docker import program_from_image

    assert program_from_image(given) == program
