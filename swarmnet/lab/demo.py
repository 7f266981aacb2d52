"""``swarmnet lab demo``: a lab, an overlay network, a replicated web service, and traffic
shown crossing hosts over kernel VXLAN (HTTP from one task to every other task, and the
VXLAN packets as they appear on the underlay).

Everything goes through the same public paths a user takes: the agents' HTTP API for the
swarm, ``swarmnet exec`` semantics (nsenter into a task) for the traffic.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from swarmnet.api.client import Client
from swarmnet.lab import netns
from swarmnet.lab.netns import LabConfig, LabError

NETWORK = "demo-net"
PUBLISHED = 8080
SERVICE = "web"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _tasks(c: Client) -> list[dict]:
    return c.get("/tasks", filters=json.dumps({"service": {SERVICE: True}}))


def _wait_running(c: Client, want: int, timeout_s: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = [t for t in _tasks(c) if t["DesiredState"] == "running"]
        running = [t for t in tasks if t["Status"]["State"] == "running"]
        if len(running) == want and len(tasks) == want:
            return running
        if time.monotonic() > deadline:
            states = ", ".join(f"{t['Name']}={t['Status']['State']}" for t in tasks)
            raise LabError(f"service {SERVICE} did not converge in {timeout_s:.0f} s ({states})")
        time.sleep(0.2)


def _task_pid(name: str, host: str, task_id: str) -> int:
    deadline = time.monotonic() + 30
    while True:
        local = Client(netns.host_api(name, host)).get("/swarmnet/local-tasks")
        for t in local:
            if t["id"] == task_id and t["pid"]:
                return int(t["pid"])
        if time.monotonic() > deadline:
            raise LabError(f"task {task_id} has no process on {host}")
        time.sleep(0.2)


def _http_from_task(pid: int, ip: str) -> tuple[bool, str]:
    """GET http://ip/ from inside the task's network namespace (python, no curl needed)."""
    code = (
        "import sys,urllib.request;"
        f"r=urllib.request.urlopen('http://{ip}/',timeout=5);"
        "print(r.status, len(r.read()))"
    )
    p = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "-u", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if p.returncode == 0:
        status, size = p.stdout.split()
        return True, f"{status}, {size} bytes"
    lines = p.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit {p.returncode}"


def _http_from_netns(ns: str, hostport: str) -> tuple[bool, str]:
    """GET http://hostport/ from inside a lab host's namespace (never from the root one)."""
    code = (
        "import urllib.request;"
        f"r=urllib.request.urlopen('http://{hostport}/',timeout=5);"
        "print(r.status, len(r.read()))"
    )
    p = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if p.returncode == 0:
        status, size = p.stdout.split()
        return True, f"{status}, {size} bytes"
    lines = p.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit {p.returncode}"


def run(name: str = "swarmnet", hosts: int = 3, replicas: int | None = None, keep: bool = True) -> int:
    replicas = replicas or hosts
    cfg = LabConfig(name=name, hosts=hosts)
    cfg.validate()
    _say(f"==> building lab {name!r}: {hosts} hosts as network namespaces on a private underlay")
    netns.up(cfg, agents=True)
    c = Client(netns.host_api(name, "h1"))
    nodes = {n["ID"]: n["Description"]["Hostname"] for n in c.get("/nodes")}
    _say(f"    swarm formed: {', '.join(sorted(nodes.values()))} (h1 is the manager)")

    _say(f"==> swarmnet network create -d overlay {NETWORK}")
    net = c.post("/networks/create", {"Name": NETWORK, "Driver": "overlay"})
    info = c.get(f"/networks/{net['Id']}")
    vni = info["Options"]["com.docker.network.driver.overlay.vxlanid_list"]
    _say(f"    subnet {info['IPAM']['Config'][0]['Subnet']}, VXLAN VNI {vni}")

    _say(
        f"==> swarmnet service create --name {SERVICE} --replicas {replicas} --network {NETWORK} "
        f"--publish {PUBLISHED}:80 -- python3 -m http.server 80"
    )
    c.post(
        "/services/create",
        {
            "Name": SERVICE,
            "TaskTemplate": {
                "ContainerSpec": {"Image": "python3", "Args": ["-m", "http.server", "80"]},
                "Networks": [{"Target": NETWORK}],
            },
            "Mode": {"Replicated": {"Replicas": replicas}},
            "EndpointSpec": {
                "Ports": [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": PUBLISHED}]
            },
        },
    )
    t0 = time.monotonic()
    tasks = sorted(_wait_running(c, replicas), key=lambda t: t["Slot"])
    _say(f"    {replicas} tasks running after {time.monotonic() - t0:.2f} s:")
    for t in tasks:
        ip = t["NetworksAttachments"][0]["Addresses"][0]
        _say(f"      {t['Name']:<8} on {nodes.get(t['NodeID'], '?'):<4} {ip}")

    src = tasks[0]
    src_host = nodes[src["NodeID"]]
    pid = _task_pid(name, src_host, src["ID"])
    _say(f"==> HTTP from {src['Name']} (on {src_host}) to every other task, over the overlay")
    ok = True
    capture = None
    if shutil.which("tcpdump"):
        capture = subprocess.Popen(
            ["ip", "netns", "exec", netns.underlay_ns(name), "tcpdump", "-i", "br0", "-nn", "-l", "-c", "4",
             "udp port 4789"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        time.sleep(0.5)  # let tcpdump attach before the traffic starts
    for t in tasks[1:]:
        ip = t["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
        good, out = _http_from_task(pid, ip)
        ok &= good
        _say(f"      -> {t['Name']:<8} {ip:<12} on {nodes.get(t['NodeID'], '?'):<4} {'OK  HTTP ' + out if good else 'FAILED ' + out}")
    if capture is not None:
        try:
            lines, _ = capture.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            capture.kill()
            lines, _ = capture.communicate()
        _say("==> the same traffic on the underlay bridge (tcpdump udp port 4789):")
        for line in lines.splitlines()[:4]:
            _say("      " + line[:150])
    _say(f"==> the routing mesh: HTTP to every host's underlay address on :{PUBLISHED}, from h1")
    for h in netns.status(name)["hosts"]:
        good, out = _http_from_netns(netns.host_ns(name, "h1"), f"{h['underlay_ip']}:{PUBLISHED}")
        ok &= good
        _say(f"      -> {h['host']} {h['underlay_ip']}:{PUBLISHED:<6} {'OK  HTTP ' + out if good else 'FAILED ' + out}")
    opt = "" if name == "swarmnet" else f" --name {name}"
    lab_opt = "" if name == "swarmnet" else f" --lab {name}"
    _say("")
    _say("Explore:")
    _say(f"  swarmnet{lab_opt} service ps {SERVICE}")
    _say(f"  swarmnet lab exec{opt} {src_host} -- swarmnet exec {src['Name']} -- curl -s http://<task ip>/")
    _say(f"  swarmnet{lab_opt} service scale {SERVICE}=6")
    _say(f"Tear down: swarmnet lab down{opt}")
    if not keep:
        netns.down(name)
    return 0 if ok else 1
