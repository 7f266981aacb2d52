"""``network create --opt encrypted`` in the netns lab, on THIS machine, whose kernel has no
ESP: the network is created, but the tasks of a service on it fail with the clear ESP error
(``service ps`` ERROR), they are never started, and no host has a VXLAN device for the
network's VNI (never cleartext). A plain network on the same lab keeps working.

(On a kernel with ESP the same path programs SAs instead: tests/unit/test_ipsec_integration.py
on fakes, tests/integration/test_ipsec_vm.py and test_encrypted_vm.py in VMs.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import netns_lab

from swarmnet.ipsec import kernel_supports_esp
from swarmnet.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

TIMEOUT_S = 90.0
SWARMNET = [sys.executable, "-m", "swarmnet"]
HOSTS = ("h1", "h2")


def wait_for(fn: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - shown in the failure message
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}")
        time.sleep(0.3)


def cli(lab: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SWARMNET, "--lab", lab, *args], capture_output=True, text=True, timeout=120
    )


def ps(lab: str, service: str) -> list[dict]:
    r = cli(lab, "service", "ps", "--format", "json", service)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def vxlan_vnis(lab: str, host: str) -> set[int]:
    out = subprocess.run(
        ["ip", "-n", netns.host_ns(lab, host), "-d", "-j", "link", "show", "type", "vxlan"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(link["linkinfo"]["info_data"]["id"]) for link in json.loads(out or "[]")}


def xfrm_states(lab: str, host: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns.host_ns(lab, host), "xfrm", "state"],
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def lab() -> Iterator[str]:
    if kernel_supports_esp():
        pytest.skip("this kernel has ESP: the refusal path cannot be shown here")
    with netns_lab("t", hosts=len(HOSTS)) as name:
        yield name


def test_encrypted_network_refused_per_task_with_the_esp_error(lab: str) -> None:
    r = cli(lab, "network", "create", "-d", "overlay", "--opt", "encrypted", "secret")
    assert r.returncode == 0, r.stderr
    net = json.loads(cli(lab, "network", "inspect", "secret").stdout)
    net = net[0] if isinstance(net, list) else net
    assert "encrypted" in net["Options"]
    vni = int(net["Options"]["com.docker.network.driver.overlay.vxlanid_list"])

    r = cli(
        lab, "service", "create", "--detach", "--name", "sec", "--replicas", "2",
        "--network", "secret", "--", "sleep", "1000",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout

    def failed() -> list[dict] | None:
        rows = ps(lab, "sec")
        if len(rows) >= 2 and all(row["CurrentState"].lower().startswith("failed") for row in rows):
            return rows
        return None

    rows = wait_for(failed, "both tasks of sec to fail")
    for row in rows:
        assert "is encrypted but this node's kernel cannot do IPsec ESP" in row["Error"], row
    assert {row["Node"] for row in rows} == set(HOSTS)  # every host refused, none ran it
    for host in HOSTS:
        assert vni not in vxlan_vnis(lab, host), host
        assert xfrm_states(lab, host) == "", host  # nothing programmed, no key used

    # A plain network on the same hosts is unaffected: its tasks run, with VXLAN.
    r = cli(lab, "network", "create", "-d", "overlay", "plain")
    assert r.returncode == 0, r.stderr
    r = cli(
        lab, "service", "create", "--detach", "--name", "pl", "--replicas", "2",
        "--network", "plain", "--", "sleep", "1000",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    wait_for(
        lambda: (
            (rows := ps(lab, "pl"))
            and len(rows) == 2
            and all(row["CurrentState"].lower().startswith("running") for row in rows)
        ),
        "pl's tasks to run",
    )
    for host in HOSTS:
        assert vni not in vxlan_vnis(lab, host), host
    # The failed tasks still failed, and still nothing for the encrypted VNI.
    assert all(row["CurrentState"].lower().startswith("failed") for row in ps(lab, "sec"))
