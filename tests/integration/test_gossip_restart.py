"""A restarted agent refills its overlay from gossip at once (issue 5, NetworkDB join sync).

One 3-host netns lab (h1 the only manager), real agents, a 3-replica service on one overlay.
h3's agent alone is killed (its tasks keep running, as in a crash or an upgrade), the remote
FDB and neighbour entries of that overlay are wiped from h3's kernel, and the agent is
started again. Its gossip tables start empty and nothing reads the managers' endpoint list
for the overlay any more: the entries can only come back through gossip, and the join sync
brings them back at once instead of at the next periodic bulk sync (30 s).

The test asserts on the kernel state coming back (polled with a generous timeout) and on
the join sync having run; it only MEASURES the time (printed; run with ``-s``), as timing on
a shared machine is no assertion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import netns_lab
from test_slice import WEB, Lab, assert_lab_gone, wait_for

from swarmnet.api.client import Client
from swarmnet.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

RESTARTS = 2  # the same restart twice: a second life must be answered as well as the first


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with netns_lab("r", hosts=3) as name:
        yield Lab(name)
    assert_lab_gone(name)


def gossip(lab: Lab, host: str) -> dict:
    return Client(host=netns.host_api(lab.name, host), timeout_s=10.0).get("/swarmnet/gossip")


def entries(lab: Lab, host: str, dev: str) -> tuple[set, set]:
    """(FDB entries, neighbour entries) of ``dev`` in ``host``'s namespace."""
    return (
        {e for e in lab.fdb(host) if e[0] == dev},
        {e for e in lab.neigh(host) if e[0] == dev},
    )


def wipe(lab: Lab, host: str, dev: str) -> None:
    ns = lab.ns(host)
    fdb, neigh = entries(lab, host, dev)
    for _d, ip, _mac in neigh:
        subprocess.run(["ip", "-n", ns, "neigh", "del", ip, "dev", dev], check=True)
    for _d, mac, dst in fdb:
        subprocess.run(["bridge", "-n", ns, "fdb", "del", mac, "dev", dev, "dst", dst], check=True)
    assert entries(lab, host, dev) == (set(), set())


def kill_agent(lab: Lab, host: str) -> None:
    """SIGKILL the agent process only (not its tasks), and wait until it is gone."""
    pid = lab.agent_pid(host)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not netns._alive(pid) or None, f"{host}'s agent to die")


def test_restarted_agent_refills_fdb_and_neighbours_from_gossip_at_once(lab: Lab) -> None:
    r = lab.cli("network", "create", "-d", "overlay", "front")
    assert r.rc == 0, r.err
    r = lab.cli(
        "service", "create", "--name", "web", "--replicas", "3", "--network", "front", "--", *WEB
    )
    assert r.rc == 0, r.err + r.out
    tasks = lab.running("web", 3)
    assert {t.host for t in tasks} == {"h1", "h2", "h3"}, tasks
    dev = f"sn-vx-{lab.vni('front')}"
    others = {lab.ip_of("h1"), lab.ip_of("h2")}
    remote_ips = {t.ip for t in tasks if t.host != "h3"}

    def complete() -> tuple[set, set] | None:
        fdb, neigh = entries(lab, "h3", dev)
        if {dst for _d, _m, dst in fdb} >= others and {ip for _d, ip, _m in neigh} >= remote_ips:
            return fdb, neigh
        return None

    want = wait_for(complete, "h3's FDB and neighbours for the other hosts' tasks")
    for life in range(1, RESTARTS + 1):
        kill_agent(lab, "h3")
        wipe(lab, "h3", dev)
        t0 = time.monotonic()
        netns.start(lab.name, "h3")  # returns once the agent answers its API
        t_ready = time.monotonic()
        wait_for(
            lambda: entries(lab, "h3", dev) == want or None,
            f"h3's FDB and neighbour entries back after restart {life}",
        )
        t_back = time.monotonic()
        print(
            f"\nrestart {life}: FDB+neigh back {t_back - t0:.2f} s after the agent was "
            f"started, {t_back - t_ready:.2f} s after its API answered"
        )
        # Gossip's join sync brought them (the counter is this life's: a fresh process).
        metrics = gossip(lab, "h3")["metrics"]
        assert metrics.get("netdb_initial_syncs_done", 0) >= 1, metrics
        log = (netns.lab_dir(lab.name) / "h3" / "agent.log").read_text(errors="replace")
        this_life = log.rsplit("\n--- ", 1)[-1]
        assert "gossip: programmed endpoint" in this_life
    # The restarted node's own endpoint is still (again) on the others.
    for h in ("h1", "h2"):
        h3_ip = next(t.ip for t in tasks if t.host == "h3")
        wait_for(
            lambda h=h, ip=h3_ip: ip in {i for _d, i, _m in lab.neigh(h)} or None,
            f"h3's task in {h}'s neighbour table",
        )
