"""Host-mode publishing (``--publish mode=host,published=P,target=T``) on a 3-host netns lab.

Docker's contract, which swarmnet keeps: a host-mode port answers only on the nodes that run
a task of the service, and only with THAT node's task; a node without a task does not answer
at all (no mesh); when a task goes away its node stops answering. Traffic is always sent
from ANOTHER host's namespace to the target host's underlay address, as an outside client
would (never from the root namespace, and never from the target itself, whose locally
generated packets take the OUTPUT path instead of PREROUTING).

swarmnet differs from Docker on one point, asserted here as swarmnet documents it
(``ClusterState._resolve_ports``): a published port is reserved cluster-wide in every mode,
so a second service asking for the same host-mode port is refused with 409 naming
``EndpointSpec.Ports[0].PublishedPort``, where Docker would accept it and keep the two
services' tasks on different nodes.

The lab helpers (``Lab``, ``wait_for``, the task-name HTTP ``SERVER``) are those of
test_services_lb.py, imported rather than copied; this module has its own lab.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import netns_lab
from test_services_lb import HOSTS, SERVER, Lab, wait_for

from swarmnet.api.client import APIError

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PORT = 8081
PUBLISH = f"mode=host,published={PORT},target=80"
# curl exit codes that mean "nothing answered": 7 = connection refused (the host's kernel
# sent a RST: no DNAT, no listener), 28 = timed out.
NO_ANSWER = (7, 28)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with netns_lab("t", hosts=3) as name:
        yield Lab(name)


def client_for(target: str) -> str:
    """Another host of the lab, to send from (an outside client of ``target``)."""
    return next(h for h in HOSTS if h != target)


def get(lab: Lab, target: str) -> tuple[int, str]:
    r = lab.on_host(
        client_for(target), "curl", "-s", "-m", "3", f"http://{lab.ip_of(target)}:{PORT}/"
    )
    return r.returncode, r.stdout


def placement(lab: Lab, tasks: list[dict]) -> dict[str, str]:
    """host name -> the name of the task it runs (the node's hostname is the lab host)."""
    hostnames = {n["ID"]: n["Description"]["Hostname"] for n in lab.api.get("/nodes")}
    out: dict[str, str] = {}
    for t in tasks:
        h = hostnames[t["NodeID"]]
        assert h not in out, f"two tasks of one host-mode service on {h}: {tasks}"
        out[h] = t["Name"]
    return out


def answers_only_with(lab: Lab, target: str, task: str, tries: int = 6) -> bool:
    """Every one of ``tries`` requests to ``target`` succeeds with ``task``'s name."""
    return all(get(lab, target) == (0, task) for _ in range(tries))


def does_not_answer(lab: Lab, target: str, tries: int = 3) -> bool:
    """Every one of ``tries`` requests to ``target`` finds nothing listening."""
    for _ in range(tries):
        rc, out = get(lab, target)
        if rc not in NO_ANSWER:
            return False
        assert not out, out
    return True


@pytest.fixture(scope="module")
def hweb(lab: Lab) -> dict[str, str]:
    r = lab.cli(
        "service", "create", "--name", "hweb", "--replicas", "2",
        "--publish", PUBLISH, "--", "python3", "-c", SERVER,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    where = placement(lab, lab.running("hweb", 2))
    assert len(where) == 2, where
    return where


def test_inspect_shows_the_host_mode_port(lab: Lab, hweb: dict[str, str]) -> None:
    ep = lab.api.get("/services/hweb")["Endpoint"]
    assert ep["Ports"] == [
        {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": PORT, "PublishMode": "host"}
    ]
    # No mesh, so no ingress VIP (and no other network was asked for).
    assert "VirtualIPs" not in ep, ep
    r = lab.cli("service", "ls")
    assert f"*:{PORT}->80/tcp (host)" in r.stdout, r.stdout


def test_each_task_node_answers_with_its_own_task(lab: Lab, hweb: dict[str, str]) -> None:
    for h, task in sorted(hweb.items()):
        wait_for(
            lambda h=h, task=task: answers_only_with(lab, h, task),
            f"{h}:{PORT} answering with {task} only (from {client_for(h)})",
        )


def test_the_node_without_a_task_does_not_answer(lab: Lab, hweb: dict[str, str]) -> None:
    (idle,) = [h for h in HOSTS if h not in hweb]
    # Wait until the service answers where it runs: a silent idle node then means "not
    # published here", not "nothing programmed anywhere yet".
    for h, task in hweb.items():
        wait_for(lambda h=h, task=task: answers_only_with(lab, h, task, 1), f"{h}:{PORT} up")
    assert does_not_answer(lab, idle, tries=5), f"{idle}:{PORT} answered: host mode leaked"


def test_scale_down_frees_the_node(lab: Lab, hweb: dict[str, str]) -> None:
    r = lab.cli("service", "scale", "hweb=1")
    assert r.returncode == 0, r.stderr + r.stdout
    where = placement(lab, lab.running("hweb", 1))
    ((kept, task),) = where.items()
    assert hweb.get(kept) == task, (hweb, where)  # the remaining task did not move
    (freed,) = [h for h in hweb if h != kept]
    wait_for(lambda: does_not_answer(lab, freed), f"{freed}:{PORT} to stop answering")
    wait_for(lambda: answers_only_with(lab, kept, task), f"{kept}:{PORT} still serving {task}")
    for h in HOSTS:
        if h != kept:
            assert does_not_answer(lab, h), f"{h}:{PORT} answers without a task"


def test_same_host_port_on_a_second_service_is_refused(lab: Lab, hweb: dict[str, str]) -> None:
    """swarmnet reserves the port cluster-wide (see the module docstring): 409, field named,
    nothing created, and the first service keeps serving."""
    r = lab.cli(
        "service", "create", "--name", "hweb2", "--replicas", "1", "--detach",
        "--publish", PUBLISH, "--", "sleep", "100000",
    )  # fmt: skip
    assert r.returncode != 0, r.stdout
    assert "EndpointSpec.Ports[0].PublishedPort" in r.stderr and "hweb" in r.stderr, r.stderr
    body = {
        "Name": "hweb2",
        "TaskTemplate": {"ContainerSpec": {"Image": "sleep", "Args": ["100000"]}},
        "EndpointSpec": {
            "Ports": [{"TargetPort": 80, "PublishedPort": PORT, "PublishMode": "host"}]
        },
    }
    with pytest.raises(APIError) as e:
        lab.api.post("/services/create", body)
    assert e.value.status == 409, e.value.message
    assert "EndpointSpec.Ports[0].PublishedPort" in e.value.message
    assert [s["Spec"]["Name"] for s in lab.api.get("/services")] == ["hweb"]
    # The same number on udp is another port: accepted.
    r = lab.cli(
        "service", "create", "--name", "hwebudp", "--replicas", "1", "--detach",
        "--publish", f"{PUBLISH},protocol=udp", "--", "sleep", "100000",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    lab.running("hwebudp", 1)
    r = lab.cli("service", "rm", "hwebudp")
    assert r.returncode == 0, r.stderr
