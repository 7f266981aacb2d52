"""Issue 6 end to end on one 3-host netns lab: embedded DNS, VIPs (nftables in each
sandbox), dnsrr, the ingress routing mesh, host failure, and bad input.

Everything is driven through the CLI/API and observed from inside the lab's namespaces
(``ip netns exec`` for a host, ``nsenter`` into a task for its resolv.conf). Tests poll
with generous timeouts; nothing sleeps to assert.
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

from swarmnet.api.client import APIError, Client
from swarmnet.lab import netns
from swarmnet.lab.netns import LabConfig

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

TIMEOUT_S = 90.0
HOSTS = ("h1", "h2", "h3")
SWARMNET = [sys.executable, "-m", "swarmnet"]
# Answers every request with its task name (SWARMNET_TASK_NAME), on port 80.
SERVER = (
    "import http.server,os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b=os.environ['SWARMNET_TASK_NAME'].encode()\n"
    "        self.send_response(200);self.send_header('Content-Length',str(len(b)))\n"
    "        self.end_headers();self.wfile.write(b)\n"
    "    def log_message(self,*a): pass\n"
    "http.server.ThreadingHTTPServer(('0.0.0.0',80),H).serve_forever()\n"
)


def wait_for(fn: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - shown in the failure message
            last = e
        else:
            if last and not isinstance(last, Exception):
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}")
        time.sleep(0.3)


def run(argv: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)


class Lab:
    def __init__(self, name: str):
        self.name = name
        self.api = Client(host=netns.host_api(name, "h1"), timeout_s=30.0)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return run([*SWARMNET, "--lab", self.name, *args], 180.0)

    def ip_of(self, host: str) -> str:
        return LabConfig(name=self.name).host_ip(int(host[1:]))

    def on_host(self, host: str, *argv: str) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", netns.host_ns(self.name, host), *argv], 30.0)

    def running(self, service: str, n: int) -> list[dict]:
        def check():
            flt = json.dumps({"service": {service: True}})
            ts = [t for t in self.api.get("/tasks", filters=flt) if t["DesiredState"] == "running"]
            ok = len(ts) == n and all(t["Status"]["State"] == "running" for t in ts)
            return ts if ok else None

        return wait_for(check, f"{n} running tasks of {service}")

    def task_pid(self, task_name: str) -> tuple[str, int]:
        """(host, pid) of a running task, from the agents' local-task lists."""

        def find():
            for h in HOSTS:
                try:
                    c = Client(host=netns.host_api(self.name, h), timeout_s=5.0)
                    for t in c.get("/swarmnet/local-tasks"):
                        if t["name"] == task_name and t["pid"]:
                            return h, t["pid"]
                except (APIError, OSError):
                    continue
            return None

        return wait_for(find, f"the process of task {task_name}")

    def in_task(self, task_name: str, *argv: str) -> subprocess.CompletedProcess:
        _h, pid = self.task_pid(task_name)
        return run(["nsenter", "-t", str(pid), "-n", "-m", *argv], 30.0)


def ips_of(tasks: list[dict], network_id: str) -> set[str]:
    return {
        a.split("/")[0]
        for t in tasks
        for na in t["NetworksAttachments"]
        if na["Network"]["ID"] == network_id
        for a in na["Addresses"]
    }


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with netns_lab("t", hosts=3) as name:
        yield Lab(name)


@pytest.fixture(scope="module")
def web(lab: Lab) -> dict:
    r = lab.cli("network", "create", "-d", "overlay", "front")
    assert r.returncode == 0, r.stderr
    r = lab.cli(
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "2",
        "--network",
        "front",
        "--publish",
        "8080:80",
        "--",
        "python3",
        "-c",
        SERVER,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    tasks = lab.running("web", 2)
    svc = lab.api.get("/services/web")
    front = lab.api.get("/networks/front")["Id"]
    return {"tasks": tasks, "svc": svc, "front": front}


def test_ingress_network_created_at_init(lab: Lab) -> None:
    ing = lab.api.get("/networks/ingress")
    assert ing["Ingress"] is True
    assert ing["IPAM"]["Config"][0]["Subnet"] == "10.0.0.0/24"
    assert ing["Options"]["com.docker.network.driver.overlay.vxlanid_list"] == "4096"


def test_service_inspect_shows_vips_and_ports(lab: Lab, web: dict) -> None:
    ep = web["svc"]["Endpoint"]
    assert ep["Ports"] == [
        {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"}
    ]
    nets = {v["NetworkID"] for v in ep["VirtualIPs"]}
    ingress = lab.api.get("/networks/ingress")["Id"]
    assert nets == {web["front"], ingress}


@pytest.mark.parametrize("host", HOSTS)
def test_routing_mesh_on_every_host_reaches_both_replicas(lab: Lab, web: dict, host: str) -> None:
    names = {t["Name"] for t in web["tasks"]}
    seen: set[str] = set()

    def both():
        r = lab.on_host(host, "curl", "-s", "-m", "3", f"http://{lab.ip_of(host)}:8080/")
        if r.returncode == 0 and r.stdout in names:
            seen.add(r.stdout)
        return seen == names

    wait_for(both, f"both replicas through {host}:8080 (seen {seen})")


def test_dns_vip_and_tasks(lab: Lab, web: dict) -> None:
    vip = next(
        v["Addr"].split("/")[0]
        for v in web["svc"]["Endpoint"]["VirtualIPs"]
        if v["NetworkID"] == web["front"]
    )
    task_ips = ips_of(web["tasks"], web["front"])
    me = web["tasks"][0]["Name"]

    def getent(name: str) -> set[str]:
        r = lab.in_task(me, "getent", "ahostsv4", name)
        return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}

    wait_for(lambda: getent("web") == {vip}, "getent web = the VIP")
    wait_for(lambda: getent("tasks.web") == task_ips, "getent tasks.web = both task IPs")
    r = lab.in_task(me, "dig", "+short", "+time=2", "tasks.web")
    assert set(r.stdout.split()) == task_ips, r
    code = (
        "import dns.resolver as r;print(' '.join(sorted(a.address for a in r.resolve('web','A'))))"
    )
    r = lab.in_task(me, sys.executable, "-c", code)
    assert r.stdout.split() == [vip], r
    # The VIP balances over both replicas, from inside a sandbox.
    names = {t["Name"] for t in web["tasks"]}
    seen: set[str] = set()

    def both():
        out = lab.in_task(me, "curl", "-s", "-m", "3", f"http://{vip}:80/").stdout
        if out in names:
            seen.add(out)
        return seen == names

    wait_for(both, f"both replicas through the VIP (seen {seen})")


def test_dnsrr_gives_task_ips_and_no_vip(lab: Lab, web: dict) -> None:
    r = lab.cli(
        "service",
        "create",
        "--name",
        "rr",
        "--replicas",
        "2",
        "--network",
        "front",
        "--endpoint-mode",
        "dnsrr",
        "--",
        "sleep",
        "100000",
    )
    assert r.returncode == 0, r.stderr
    tasks = lab.running("rr", 2)
    assert "VirtualIPs" not in lab.api.get("/services/rr")["Endpoint"]
    want = ips_of(tasks, web["front"])
    me = web["tasks"][0]["Name"]

    def rr():
        r = lab.in_task(me, "dig", "+short", "+time=2", "rr")
        return set(r.stdout.split()) == want

    wait_for(rr, f"rr -> {want}")


@pytest.mark.parametrize(
    ("ports", "mode", "field", "status"),
    [
        ([{"TargetPort": 0}], "vip", "EndpointSpec.Ports[0].TargetPort", 400),
        (
            [{"TargetPort": 80, "PublishedPort": 70000}],
            "vip",
            "EndpointSpec.Ports[0].PublishedPort",
            400,
        ),
        ([{"TargetPort": 80, "Protocol": "sctp"}], "vip", "EndpointSpec.Ports[0].Protocol", 400),
        (
            [{"TargetPort": 80, "PublishMode": "mesh"}],
            "vip",
            "EndpointSpec.Ports[0].PublishMode",
            400,
        ),
        (
            [{"TargetPort": 80, "PublishedPort": 8080}],
            "vip",
            "EndpointSpec.Ports[0].PublishedPort",
            409,
        ),
        (
            [{"TargetPort": 80, "PublishedPort": 9090}],
            "dnsrr",
            "EndpointSpec.Ports[0].PublishMode",
            400,
        ),
        ([], "roundrobin", "EndpointSpec.Mode", 400),
    ],
)
def test_bad_input_names_the_field(lab: Lab, web: dict, ports, mode, field, status) -> None:
    body = {
        "Name": "bad",
        "TaskTemplate": {"ContainerSpec": {"Image": "sleep", "Args": ["1000"]}},
        "EndpointSpec": {"Mode": mode, "Ports": ports},
    }
    with pytest.raises(APIError) as e:
        lab.api.post("/services/create", body)
    assert e.value.status == status and field in e.value.message, e.value.message


def test_a_task_whose_process_exits_leaves_dns_elsewhere_until_it_runs_again(
    lab: Lab, web: dict
) -> None:
    """A crash-looping task (runs 3 s, exits 1; the supervisor restarts it after 0.5, 1,
    2, 4... s): between runs its address is withdrawn by gossip, so another host's DNS stops
    giving it, and gives it again when it runs. The task keeps its id: this is the node's
    restart, not a manager rescheduling it."""
    r = lab.cli(
        "service", "create", "--name", "flaky", "--network", "front",
        "--endpoint-mode", "dnsrr", "--",
        "python3", "-c", "import sys,time; time.sleep(3); sys.exit(1)",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    try:
        flt = json.dumps({"service": {"flaky": True}})

        def the_task() -> dict | None:
            ts = [t for t in lab.api.get("/tasks", filters=flt) if t["DesiredState"] == "running"]
            return ts[0] if len(ts) == 1 and ts[0]["NetworksAttachments"] else None

        task = wait_for(the_task, "the flaky task")
        ip = ips_of([task], web["front"]).pop()
        hostname = {n["ID"]: n["Description"]["Hostname"] for n in lab.api.get("/nodes")}
        flaky_host = hostname[task["NodeID"]]
        observer = next(
            t["Name"] for t in web["tasks"] if lab.task_pid(t["Name"])[0] != flaky_host
        )
        seen: list[bool] = []

        def flapped() -> bool:
            r = lab.in_task(observer, "dig", "+short", "+time=2", "tasks.flaky")
            if r.returncode != 0 or ";;" in r.stdout:
                return False  # no answer: neither present nor absent
            present = ip in r.stdout.split()
            if not seen or seen[-1] != present:
                seen.append(present)
            return seen[:3] == [True, False, True] or seen[1:4] == [True, False, True]

        wait_for(flapped, f"tasks.flaky to drop {ip} between runs and give it again")
        (again,) = [t for t in lab.api.get("/tasks", filters=flt) if t["DesiredState"] == "running"]
        assert again["ID"] == task["ID"]
    finally:
        r = lab.cli("service", "rm", "flaky")
        assert r.returncode == 0, r.stderr


def test_scale_down_and_host_stop_leave_dns_and_lb(lab: Lab, web: dict) -> None:
    r = lab.cli("service", "scale", "web=3")
    assert r.returncode == 0, r.stderr
    tasks = lab.running("web", 3)
    r = lab.cli("service", "scale", "web=1")
    assert r.returncode == 0, r.stderr
    tasks = lab.running("web", 1)
    (only,) = tasks
    ips = ips_of(tasks, web["front"])
    observer = only["Name"]

    def dns_is(want: set[str]) -> bool:
        r = lab.in_task(observer, "dig", "+short", "+time=2", "tasks.web")
        return set(r.stdout.split()) == want

    wait_for(lambda: dns_is(ips), "tasks.web = the one task left")
    # Every host's mesh now answers with that task only.
    for h in HOSTS:

        def only_one(h=h):
            outs = {
                lab.on_host(h, "curl", "-s", "-m", "3", f"http://{lab.ip_of(h)}:8080/").stdout
                for _ in range(6)
            }
            return outs == {only["Name"]}

        wait_for(only_one, f"{h}:8080 answers with {only['Name']} only")
    # SIGKILL a host that runs a task (not h1: it runs the manager and the observer): its
    # task leaves DNS and every load balancer; the survivors' mesh never picks it again.
    r = lab.cli("service", "scale", "web=3")
    assert r.returncode == 0, r.stderr
    tasks = lab.running("web", 3)
    hosts = {t["Name"]: lab.task_pid(t["Name"])[0] for t in tasks}
    observer = next(n for n, h in hosts.items() if h == "h1") if "h1" in hosts.values() else None
    victim = next(t for t in tasks if hosts[t["Name"]] != "h1")
    victim_host = hosts[victim["Name"]]
    dead_ip = ips_of([victim], web["front"]).pop()
    netns.stop(lab.name, victim_host)

    def dns_without_dead() -> bool:
        if observer is None:
            return True
        r = lab.in_task(observer, "dig", "+short", "+time=2", "tasks.web")
        got = set(r.stdout.split())
        return bool(got) and dead_ip not in got

    wait_for(dns_without_dead, f"tasks.web without {dead_ip}", timeout_s=120.0)
    survivors = [h for h in HOSTS if h != victim_host]
    for h in survivors:

        def all_answer(h=h):
            rcs = [
                lab.on_host(h, "curl", "-s", "-m", "2", f"http://{lab.ip_of(h)}:8080/").returncode
                for _ in range(8)
            ]
            return all(rc == 0 for rc in rcs)

        wait_for(all_answer, f"{h}:8080 never picks the dead task", timeout_s=120.0)
