"""Issue 5 in the netns lab: task endpoints travel by gossip, not by the manager.

One 3-host lab (h1 the only manager) with real agents. The worker's overlay FDB and
neighbour entries come from the gossip tables only (swarmnet/gossip_endpoints.py); the
manager's ``endpoints`` list is still in assignments but not read for the overlay. What the
tests look at: the kernel (``bridge fdb``), the agents' gossip view (GET /swarmnet/gossip)
and their logs. Polls with generous timeouts; no timed assertions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import netns_lab
from test_slice import WEB, Lab, assert_lab_gone, wait_empty, wait_for

from swarmnet.api.client import Client
from swarmnet.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

SWARMNET = [sys.executable, "-m", "swarmnet"]


def gossip(lab: Lab, host: str) -> dict:
    return Client(host=netns.host_api(lab.name, host), timeout_s=10.0).get("/swarmnet/gossip")


def alive_members(lab: Lab, host: str) -> set[str]:
    return {m["addr"].split(":")[0] for m in gossip(lab, host)["members"] if m["state"] == "ALIVE"}


def agent_log(lab: Lab, host: str) -> str:
    return (netns.lab_dir(lab.name) / host / "agent.log").read_text(errors="replace")


def remote_vteps(lab: Lab, host: str, network: str = "front") -> set[str]:
    """The VTEPs that ``host``'s FDB for ``network`` points at (task endpoints only: other
    nodes' ingress endpoints come from the manager, through the services hook)."""
    dev = f"sn-vx-{VNI[network]}"
    return {dst for d, _mac, dst in lab.fdb(host) if d == dev}


VNI: dict[str, int] = {}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with netns_lab("g", hosts=3) as name:
        yield Lab(name)
    assert_lab_gone(name)


@pytest.fixture(scope="module")
def web(lab: Lab) -> list:
    r = lab.cli("network", "create", "-d", "overlay", "front")
    assert r.rc == 0, r.err
    r = lab.cli(
        "service", "create", "--name", "web", "--replicas", "3", "--network", "front", "--", *WEB
    )
    assert r.rc == 0, r.err + r.out
    tasks = lab.running("web", 3)
    VNI["front"] = lab.vni("front")
    assert {t.host for t in tasks} == {"h1", "h2", "h3"}, tasks
    return tasks


def ips(lab: Lab) -> dict[str, str]:
    return {h: lab.ip_of(h) for h in ("h1", "h2", "h3")}


def test_every_node_gossips_with_every_other(lab: Lab) -> None:
    addr = ips(lab)
    for h in addr:
        wait_for(
            lambda h=h: alive_members(lab, h) >= set(addr.values()) or None,
            f"{h} to see all three gossip members alive",
        )
        st = gossip(lab, h)
        assert st["address"] == f"{addr[h]}:7946"
        assert st["keys"] == 1


def test_endpoints_are_programmed_from_gossip(lab: Lab, web: list) -> None:
    addr = ips(lab)
    for h in addr:
        others = {addr[o] for o in addr if o != h}
        wait_for(
            lambda h=h, others=others: remote_vteps(lab, h) == others or None,
            f"{h}'s FDB to point at the two other hosts",
        )
        # The entries came through the gossip tables: the endpoint source logged them.
        wait_for(lambda h=h: "gossip: programmed endpoint" in agent_log(lab, h), f"{h} log")
        assert gossip(lab, h)["networks"], "no network joined in gossip"


def test_node_death_removes_its_endpoints_without_the_manager(lab: Lab, web: list) -> None:
    """h1 (the only manager) is frozen; h3 dies; h2 drops h3's endpoints by itself."""
    addr = ips(lab)
    wait_for(lambda: addr["h3"] in remote_vteps(lab, "h2") or None, "h3's endpoints on h2")
    h1 = lab.agent_pid("h1")
    assert h1 is not None
    os.kill(h1, signal.SIGSTOP)
    try:
        netns.stop(lab.name, "h3")
        wait_empty(
            lambda: addr["h3"] in remote_vteps(lab, "h2") and sorted(lab.fdb("h2")),
            "h3's FDB entries to leave h2 while the manager is frozen",
        )
        assert "member-failed" in agent_log(lab, "h2")
    finally:
        os.kill(h1, signal.SIGCONT)
    netns.start(lab.name, "h3")
    wait_for(lambda: addr["h3"] in alive_members(lab, "h2") or None, "h3 back in h2's gossip view")


@contextlib.contextmanager
def intruder(lab: Lab, key_b64: str) -> Iterator[subprocess.Popen]:
    """A bare gossip member in h2's namespace (port 7947) joining h1 with ``key_b64``."""
    cmd, env = netns.exec_argv(
        lab.name,
        "h2",
        [
            *SWARMNET,
            "gossip",
            "agent",
            "--node",
            "intruder",
            "--bind",
            f"{lab.ip_of('h2')}:7947",
            "--join",
            f"{lab.ip_of('h1')}:7946",
            "--encrypt",
            key_b64,
        ],
    )
    out = Path(netns.lab_dir(lab.name)) / "intruder.out"
    with open(out, "wb") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        p.kill()
        p.wait(10)


def test_wrong_key_never_joins(lab: Lab) -> None:
    import base64

    before = gossip(lab, "h1")["metrics"]
    wrong = base64.b64encode(os.urandom(32)).decode()
    with intruder(lab, wrong) as p:
        # h1 counts what it could not decrypt (the intruder's join stream, its retries).
        def refused() -> bool | None:
            m = gossip(lab, "h1")["metrics"]
            bad = {k: v for k, v in m.items() if "decrypt" in k or "key" in k}
            return any(v > before.get(k, 0) for k, v in bad.items()) or None

        wait_for(refused, "h1 to drop the intruder's undecryptable traffic")
        for h in ("h1", "h2", "h3"):
            names = {m["name"] for m in gossip(lab, h)["members"]}
            assert "intruder" not in names, (h, names)
        assert p.poll() is None or p.returncode != 0


def test_key_rotation_without_partition(lab: Lab, web: list) -> None:
    addr = ips(lab)
    for h in addr:
        wait_for(lambda h=h: alive_members(lab, h) >= set(addr.values()) or None, f"{h} all")
    failed_before = {h: agent_log(lab, h).count("member-failed") for h in addr}
    r = lab.cli("swarm", "rotate-gossip-key")
    assert r.rc == 0, r.err + r.out
    for h in addr:
        wait_for(lambda h=h: gossip(lab, h)["keys"] == 1 or None, f"{h} to end with one key")
        assert "key ring now" in agent_log(lab, h)
    # Nobody lost anybody meanwhile, and gossip still carries endpoints with the new key.
    assert {h: agent_log(lab, h).count("member-failed") for h in addr} == failed_before
    for h in addr:
        assert alive_members(lab, h) >= set(addr.values()), h
    r = lab.cli("service", "scale", "web=6")
    assert r.rc == 0, r.err + r.out
    tasks = lab.running("web", 6)
    want = {t.ip for t in tasks}
    for h in addr:
        mine = {t.ip for t in tasks if t.host == h}
        wait_for(
            lambda h=h, need=want - mine: need <= {ip for _d, ip, _m in lab.neigh(h)} or None,
            f"{h}'s neighbour table to hold the new tasks of the other hosts",
        )
