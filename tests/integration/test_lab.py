"""The netns lab against the real kernel: namespaces, underlay, process bookkeeping, cleanup.

The real agent is not needed: a stand-in (FAKE_AGENT below) serves the part of the API the
lab uses (/_ping, /swarm/init, /swarm, /swarm/join), records the calls, and starts a child
"task" so that stop/down are seen to kill a host's whole process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmnet.lab import cli, netns
from swarmnet.lab.netns import LabConfig, LabError

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]

# ICMP echo from inside a namespace, in Python: the machine has no `ping` binary.
PING = r"""
import socket, struct, sys, time
dst = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(2)
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
hdr = struct.pack("!BBHHH", 8, 0, 0, 0x5A5A, 1) + b"swarmnet"
s.sendto(hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:], (dst, 0))
end = time.monotonic() + 2
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(1500)
    except socket.timeout:
        break
    icmp = data[(data[0] & 15) * 4:]
    if addr[0] == dst and icmp[0] == 0 and icmp[4:6] == b"\x5a\x5a":
        sys.exit(0)
sys.exit(1)
"""

FAKE_AGENT = r"""
import argparse, json, os, re, socketserver, subprocess, sys
from http.server import BaseHTTPRequestHandler
p = argparse.ArgumentParser()
for a in ("--data-dir", "--advertise-addr", "--api", "--hostname", "--netns-prefix"):
    p.add_argument(a, required=True)
args = p.parse_args()
calls = os.path.join(args.data_dir, "calls.jsonl")
def record(**kw):
    with open(calls, "a") as f:
        f.write(json.dumps(kw) + "\n")
task = subprocess.Popen(["sleep", "1000"])  # a "task": inherits SWARMNET_LAB_ID
record(event="start", argv=sys.argv[1:], pid=os.getpid(), task=task.pid,
       lab_id=os.environ.get("SWARMNET_LAB_ID"), netns=os.stat("/proc/self/ns/net").st_ino)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def address_string(self): return "unix"
    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def path_(self): return re.sub(r"^/v1\.\d+", "", self.path)
    def do_GET(self):
        if self.path_() == "/swarm":
            return self.reply({"JoinTokens": {"Worker": "TOKEN-W", "Manager": "TOKEN-M"}})
        self.reply("OK")
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        record(event=self.path_(), body=json.loads(self.rfile.read(n) or b"null"))
        self.reply("node-" + args.hostname)
class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
S(args.api[len("unix://"):], H).serve_forever()
"""


@pytest.fixture
def lab_name():
    """A random lab, always removed, whatever the test did."""
    name = f"t{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        netns.down(name)
        assert not netns.lab_namespaces(name)


@pytest.fixture
def fake_agent(tmp_path, monkeypatch):
    script = tmp_path / "fake_agent.py"
    script.write_text(FAKE_AGENT)
    monkeypatch.setattr(netns, "AGENT_ARGV", [sys.executable, str(script)])


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="swarmnet")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)


def ping(name: str, host: str, dst: str) -> bool:
    return in_ns(netns.host_ns(name, host), sys.executable, "-c", PING, dst).returncode == 0


def link_is_up(ns: str, dev: str) -> bool:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, text=True, check=True
    )
    return "UP" in json.loads(out.stdout)[0]["flags"]


def calls(name: str, host: str) -> list[dict]:
    path = netns.lab_dir(name) / host / "data" / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not netns._alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_up_no_agents_builds_underlay_and_status(lab_name, capsys):
    assert run_cli("lab", "up", "--name", lab_name, "--no-agents") == 0
    assert netns.lab_namespaces(lab_name) == sorted(
        [f"snlab-{lab_name}-{s}" for s in ("h1", "h2", "h3", "ul")]
    )
    assert ping(lab_name, "h1", "198.51.100.12")
    assert ping(lab_name, "h1", "198.51.100.13")
    assert not ping(lab_name, "h1", "198.51.100.14")  # the check can fail
    out = in_ns(netns.host_ns(lab_name, "h2"), "ip", "-j", "addr", "show", "eth0")
    eth0 = json.loads(out.stdout)[0]
    assert eth0["mtu"] == 1500
    assert {"local": "198.51.100.12", "prefixlen": 24} in [
        {"local": a["local"], "prefixlen": a["prefixlen"]} for a in eth0["addr_info"]
    ]
    assert link_is_up(netns.underlay_ns(lab_name), "h2")

    capsys.readouterr()
    assert run_cli("lab", "status", "--name", lab_name, "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"name", "underlay", "hosts"}
    assert doc["name"] == lab_name
    assert doc["underlay"] == {"netns": f"snlab-{lab_name}-ul", "bridge": "br0"}
    assert [set(h) for h in doc["hosts"]] == [
        {"host", "netns", "underlay_ip", "api", "role", "pid"}
    ] * 3
    assert doc["hosts"][2] == {
        "host": "h3",
        "netns": f"snlab-{lab_name}-h3",
        "underlay_ip": "198.51.100.13",
        "api": f"unix:///run/swarmnet/lab/{lab_name}/h3/api.sock",
        "role": "worker",
        "pid": None,
    }
    assert [h["role"] for h in doc["hosts"]] == ["manager", "worker", "worker"]

    assert run_cli("lab", "exec", "--name", lab_name, "h2", "--", "sh", "-c", "exit 7") == 7


def test_down_removes_everything_and_is_idempotent(lab_name):
    netns.up(LabConfig(name=lab_name, hosts=2), agents=False)
    assert netns.lab_dir(lab_name).is_dir()
    assert run_cli("lab", "down", "--name", lab_name) == 0
    assert netns.lab_namespaces(lab_name) == []
    assert not netns.lab_dir(lab_name).exists()
    assert run_cli("lab", "down", "--name", lab_name) == 0
    assert run_cli("lab", "status", "--name", lab_name) == 1


def test_down_after_crash_without_lab_json(lab_name):
    netns.up(LabConfig(name=lab_name, hosts=2), agents=False)
    h1 = netns.host_ns(lab_name, "h1")
    # What an agent leaves: a task sandbox, a process marked as the host's, and one that is
    # only inside a lab namespace (started by hand, no marker).
    subprocess.run(["ip", "netns", "add", f"{h1}-task1"], check=True)
    env = dict(os.environ, SWARMNET_LAB_ID=f"{lab_name}/h1")
    marked = subprocess.Popen(["nsenter", f"--net=/run/netns/{h1}", "--", "sleep", "1000"], env=env)
    unmarked = subprocess.Popen(["ip", "netns", "exec", f"{h1}-task1", "sleep", "1000"])
    try:
        (netns.lab_dir(lab_name) / "lab.json").unlink()
        with pytest.raises(LabError, match="leftovers"):
            netns.status(lab_name)
        netns.down(lab_name)
        assert netns.lab_namespaces(lab_name) == []
        assert not netns.lab_dir(lab_name).exists()
        assert wait_dead(marked.pid) and wait_dead(unmarked.pid)
    finally:
        for p in (marked, unmarked):
            p.kill()
            p.wait()


def test_up_again_cleans_leftovers(lab_name, capsys):
    netns.up(LabConfig(name=lab_name, hosts=3), agents=False)
    subprocess.run(["ip", "netns", "add", f"snlab-{lab_name}-h3-task1"], check=True)
    netns.up(LabConfig(name=lab_name, hosts=2), agents=False)
    assert "already exists" in capsys.readouterr().err
    assert netns.lab_namespaces(lab_name) == sorted(
        [f"snlab-{lab_name}-{s}" for s in ("h1", "h2", "ul")]
    )


def test_stop_kills_host_processes_and_downs_link(lab_name):
    netns.up(LabConfig(name=lab_name, hosts=2), agents=False)
    h2 = netns.host_ns(lab_name, "h2")
    env = dict(os.environ, SWARMNET_LAB_ID=f"{lab_name}/h2")
    victim = subprocess.Popen(["nsenter", f"--net=/run/netns/{h2}", "--", "sleep", "1000"], env=env)
    other_env = dict(os.environ, SWARMNET_LAB_ID=f"{lab_name}/h1")
    bystander = subprocess.Popen(["sleep", "1000"], env=other_env)
    try:
        assert ping(lab_name, "h1", "198.51.100.12")
        assert netns.stop(lab_name, "h2") == 1
        assert wait_dead(victim.pid)
        assert netns._alive(bystander.pid)  # h1's processes are not h2's
        assert not link_is_up(netns.underlay_ns(lab_name), "h2")
        assert not ping(lab_name, "h1", "198.51.100.12")
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()


def test_up_with_agents_forms_swarm_then_stop_start(lab_name, fake_agent):
    netns.up(LabConfig(name=lab_name, hosts=3, managers=2))
    doc = netns.status(lab_name)
    pids = {h["host"]: h["pid"] for h in doc["hosts"]}
    assert all(pids.values())

    for i, host in enumerate(("h1", "h2", "h3"), 1):
        start = calls(lab_name, host)[0]
        assert start["lab_id"] == f"{lab_name}/{host}"
        assert start["pid"] == pids[host]  # nsenter execs the agent: the recorded pid is it
        assert start["netns"] == os.stat(f"/run/netns/snlab-{lab_name}-{host}").st_ino
        argv = start["argv"]
        assert argv[argv.index("--advertise-addr") + 1] == f"198.51.100.{10 + i}"
        assert argv[argv.index("--netns-prefix") + 1] == f"snlab-{lab_name}-{host}-"
    assert calls(lab_name, "h1")[1] == {
        "event": "/swarm/init",
        "body": {"AdvertiseAddr": "198.51.100.11", "ListenAddr": "198.51.100.11:2377"},
    }
    join2, join3 = calls(lab_name, "h2")[1], calls(lab_name, "h3")[1]
    assert join2["event"] == "/swarm/join"
    assert join2["body"] == {
        "RemoteAddrs": ["198.51.100.11:2377"],
        "JoinToken": "TOKEN-M",
        "AdvertiseAddr": "198.51.100.12",
        "ListenAddr": "198.51.100.12:2377",
    }
    assert join3["body"]["JoinToken"] == "TOKEN-W"

    task = calls(lab_name, "h3")[0]["task"]
    assert run_cli("lab", "stop", "h3", "--name", lab_name) == 0
    assert wait_dead(pids["h3"]) and wait_dead(task)
    assert netns.status(lab_name)["hosts"][2]["pid"] is None
    assert netns.status(lab_name)["hosts"][0]["pid"] == pids["h1"]

    assert run_cli("lab", "start", "h3", "--name", lab_name) == 0
    new_pid = netns.status(lab_name)["hosts"][2]["pid"]
    assert new_pid not in (None, pids["h3"])
    assert link_is_up(netns.underlay_ns(lab_name), "h3")
    assert [c["event"] for c in calls(lab_name, "h3")] == ["start", "/swarm/join", "start"]


def test_agent_that_dies_is_reported_with_its_log(lab_name, tmp_path, monkeypatch):
    script = tmp_path / "dying.py"
    script.write_text("import sys; print('agent: bad flag', file=sys.stderr); sys.exit(3)\n")
    monkeypatch.setattr(netns, "AGENT_ARGV", [sys.executable, str(script)])
    with pytest.raises(LabError, match="(?s)exited with status 3.*agent: bad flag"):
        netns.up(LabConfig(name=lab_name, hosts=1))


def test_topology_file_and_flags(tmp_path):
    cfg = netns.load_topology(ROOT / "cluster-compose" / "netns-3.toml")
    assert cfg == LabConfig()
    bad = tmp_path / "bad.toml"
    bad.write_text("hosts = 3\n[underlay]\nmtu = 1500\ncdir = '10.0.0.0/24'\n")
    with pytest.raises(LabError, match="underlay.cdir"):
        netns.load_topology(bad)
    with pytest.raises(LabError, match="managers"):
        LabConfig(hosts=2, managers=3).validate()
    with pytest.raises(LabError, match="192.0.2.0/24"):
        LabConfig(cidr="192.0.2.0/24").validate()
    with pytest.raises(LabError, match="no '-'"):
        LabConfig(name="a-b").validate()
    with pytest.raises(LabError, match="too small"):
        LabConfig(cidr="198.51.100.0/28", hosts=5).validate()
    assert LabConfig(cidr="10.9.0.0/16").host_ip(200) == "10.9.0.210"


def test_up_signal_exit_code_of_exec(lab_name):
    netns.up(LabConfig(name=lab_name, hosts=1), agents=False)
    rc = netns.exec_on(lab_name, "h1", ["sh", "-c", f"kill -{int(signal.SIGTERM)} $$"])
    assert rc == 128 + signal.SIGTERM
    with pytest.raises(LabError, match="no host"):
        netns.exec_on(lab_name, "h9", ["true"])
