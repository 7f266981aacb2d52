"""The LB suite in the VM lab (Debian's 6.1 kernel, where IPVS exists), run inside one guest
as scripts from this repository (the guest sees /work/main through its 9p root):

- the very scenario of test_lb_nft.py (client ns -> node ns -> two backend namespaces with
  http servers), once with the IPVS backend and once with nftables;
- the same through ``choose_backend("auto")``, which must pick IPVS in the guest;
- all-ports VIPs (``ALL_PORTS``: IPVS fwmark services) on two ports, beside a VIP:port
  service, a restart that recovers the marks from the kernel, drain to zero (rejected, but
  an established connection to a draining IPVS backend goes on), no backend (TCP RST), a
  udp all-ports VIP without backends (ICMP port unreachable), and removal of everything.

This file is also the guest's script: ``python test_lb_ipvs_vm.py allports|auto BACKEND``
prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import vm_lab_name

SCENARIO = Path(__file__).with_name("test_lb_nft.py")
sys.path.insert(0, str(SCENARIO.parent))
import test_lb_nft as shared  # noqa: E402  (the shared topology, scenario and assertions)

from swarmnet.lb.backend import choose_backend  # noqa: E402
from swarmnet.lb.plan import ALL_PORTS, Backend, LBService, LBState  # noqa: E402

pytestmark = pytest.mark.vm

VIP2 = "10.77.100.11"  # a VIP:port service beside the all-ports VIP
EXTRA_PORT = 9090  # a second port on every backend: "all ports" must mean more than one
PER_PORT = 12
GUEST_TIMEOUT_S = 900  # Python is ~15-20x slower under TCG, cold imports over 9p


# Opens a connection, says "open", waits for a line on stdin, then sends its request on
# that SAME connection and prints the body (or what went wrong).
HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print("open", flush=True)
sys.stdin.readline()
try:
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.split(b"\r\n\r\n", 1)[1].decode().strip() if data else "empty")
except OSError as e:
    print("error:" + type(e).__name__)
"""

# A connected UDP socket: an ICMP port unreachable comes back as ConnectionRefusedError.
UDP_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b"x")
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""


def _get(topo: shared.Topology, vip: str, port: int, n: int = PER_PORT) -> dict:
    out = shared.nsx(topo.ns["cl"], sys.executable, "-c", shared.CLIENT, vip, str(n), str(port))
    counts: dict[str, int] = {}
    for word in out.split():
        counts[word] = counts.get(word, 0) + 1
    return counts


def _serve_extra_port(topo: shared.Topology) -> None:
    """A second http server on EXTRA_PORT in each backend (killed by ``topo.down``)."""
    for role in ("be1", "be2"):
        ip = f"{shared.NODE_IF[role]}.2"
        topo.servers.append(subprocess.Popen(
            ["ip", "netns", "exec", topo.ns[role], sys.executable, "-m", "http.server",
             str(EXTRA_PORT), "--bind", ip, "--directory", os.path.join(topo.tmp, role)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    deadline = time.monotonic() + shared.READY_TIMEOUT_S
    for role in ("be1", "be2"):
        url = f"http://{shared.NODE_IF[role]}.2:{EXTRA_PORT}/"
        probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2)"
        while subprocess.run(["ip", "netns", "exec", topo.node, sys.executable, "-c", probe],
                             capture_output=True).returncode != 0:  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"{role}:{EXTRA_PORT} did not answer")
            time.sleep(0.2)


def allports(ip_of: dict, weight: int = 1, roles: tuple[str, ...] = ("be1", "be2")):
    return LBService(
        shared.VIP, "tcp", ALL_PORTS, tuple(Backend(ip_of[r], ALL_PORTS, weight) for r in roles)
    )


def allports_scenario(backend_name: str) -> dict:
    """See the module docstring; returns what was seen, ``allports_check`` asserts."""
    from swarmnet.lb.ipvs import parse_marks

    topo = shared.Topology()
    ip_of = {r: f"{shared.NODE_IF[r]}.2" for r in ("be1", "be2")}
    seen: dict = {"backend": backend_name}
    lb = hold = None
    try:
        topo.up()
        _serve_extra_port(topo)
        lb = choose_backend(backend_name, netns=topo.node)  # type: ignore[arg-type]
        seen["chosen"] = lb.name
        if lb.name == "ipvs":  # IPVS sees only packets for local addresses (LOCAL_IN)
            for vip in (shared.VIP, VIP2):
                shared.nsx(topo.node, "ip", "addr", "add", f"{vip}/32", "dev", "lo")
        web2 = LBService(VIP2, "tcp", 80, (Backend(ip_of["be1"], shared.BE_PORT),))
        udp_none = LBService(shared.VIP, "udp", ALL_PORTS)
        state = LBState.of(allports(ip_of), web2, udp_none)
        lb.sync(state)
        seen["dump_ok"] = lb.dump() == state
        seen["p8080"] = _get(topo, shared.VIP, shared.BE_PORT)
        seen["p9090"] = _get(topo, shared.VIP, EXTRA_PORT)
        seen["vip2"] = _get(topo, VIP2, 80, 4)
        seen["udp_none"] = shared.nsx(
            topo.ns["cl"], sys.executable, "-c", UDP_PROBE, shared.VIP, "5353"
        ).strip()

        # restart: a new backend object reads the state (and the marks) back from the kernel
        def marks() -> object:
            if lb.name != "ipvs":
                return None
            out = shared.nsx(topo.node, "nft", "-j", "list", "table", "inet", "swarmnet-ipvs")
            return sorted(parse_marks(json.loads(out)).items())

        marks_before = marks()
        lb.close()
        lb = choose_backend(backend_name, netns=topo.node)  # type: ignore[arg-type]
        seen["restart_dump_ok"] = lb.dump() == state
        lb.full_sync(state)
        seen["marks"] = marks_before
        seen["restart_marks_kept"] = marks() == marks_before
        seen["restart_p9090"] = _get(topo, shared.VIP, EXTRA_PORT, 4)
        if lb.name == "ipvs":
            # the mark table lost behind our back: the fwmark services are orphans, the dump
            # no longer shows them, and a full sync deletes and recreates them
            shared.nsx(topo.node, "nft", "delete", "table", "inet", "swarmnet-ipvs")
            seen["lost_table_dump_ok"] = lb.dump() == LBState.of(web2)
            lb.full_sync(state)
            seen["repaired_dump_ok"] = lb.dump() == state
            seen["repaired_p9090"] = _get(topo, shared.VIP, EXTRA_PORT, 4)

        # drain to zero with a connection open: new ones are refused, the open one goes on
        hold = subprocess.Popen(
            ["ip", "netns", "exec", topo.ns["cl"], sys.executable, "-c", HOLD, shared.VIP,
             str(shared.BE_PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        seen["hold_open"] = hold.stdout.readline().strip()
        drained = LBState.of(allports(ip_of, weight=0), web2, udp_none)
        seen["drain_changed"] = len(lb.sync(drained))
        seen["drained"] = _get(topo, shared.VIP, shared.BE_PORT, 4)
        out, _ = hold.communicate("go\n", timeout=120)
        seen["held"] = out.strip()
        hold = None

        lb.sync(LBState.of(allports(ip_of, roles=("be2",)), web2, udp_none))
        seen["one"] = _get(topo, shared.VIP, EXTRA_PORT, 6)
        lb.sync(LBState.of(allports(ip_of, roles=()), web2, udp_none))
        seen["none"] = _get(topo, shared.VIP, shared.BE_PORT, 4)
        lb.full_sync(LBState())
        seen["dump_empty_ok"] = lb.dump() == LBState()
        tables = shared.nsx(topo.node, "nft", "list", "tables")
        seen["table_left"] = "swarmnet-ipvs" in tables
        return seen
    finally:
        if hold is not None:
            hold.kill()
            hold.wait(timeout=30)
        if lb is not None:
            lb.close()
        topo.down()


def allports_check(seen: dict) -> None:
    assert seen["chosen"] == seen["backend"], seen
    assert seen["dump_ok"] and seen["restart_dump_ok"] and seen["dump_empty_ok"], seen
    for port in ("p8080", "p9090"):  # every port of the VIP, both backends on each
        assert set(seen[port]) == {"be1", "be2"}, seen
        assert sum(seen[port].values()) == PER_PORT, seen
    assert seen["vip2"] == {"be1": 4}, seen
    assert seen["udp_none"] == "refused", seen  # ICMP port unreachable, not silence
    assert set(seen["restart_p9090"]) <= {"be1", "be2"}, seen
    assert sum(seen["restart_p9090"].values()) == 4, seen
    assert seen["hold_open"] == "open", seen
    assert seen["drain_changed"] == 1, seen
    assert seen["drained"] == {"refused": 4}, seen
    assert seen["one"] == {"be2": 6}, seen
    assert seen["none"] == {"refused": 4}, seen
    assert not seen["table_left"], seen
    if seen["backend"] == "ipvs":
        assert len(seen["marks"]) == 2 and seen["restart_marks_kept"], seen  # tcp and udp
        assert seen["lost_table_dump_ok"] and seen["repaired_dump_ok"], seen
        assert sum(seen["repaired_p9090"].get(r, 0) for r in ("be1", "be2")) == 4, seen
        # IPVS keeps a draining destination: the connection opened before the drain works.
        assert seen["held"] in ("be1", "be2"), seen


def auto_scenario() -> dict:
    """The shared scenario with ``choose_backend("auto")``."""
    seen = shared.scenario("auto")
    seen["backend"] = "auto"
    return seen


def auto_check(seen: dict, expect: str) -> None:
    assert seen["chosen"] == expect, seen
    shared.check({**seen, "backend": seen["chosen"]})


# ---- the VM tests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[dict]:
    from swarmnet.lab import vm

    name = vm_lab_name()
    try:
        lab = vm.up(name, 1)
        rc, out, err = vm.exec_on(name, "h1", ["modprobe", "-a", "ip_vs", "ip_vs_rr", "veth"])
        assert rc == 0, err
        yield lab
    finally:
        vm.down(name)


def _in_guest(lab: dict, argv: list[str]) -> tuple[dict, int, str]:
    from swarmnet.lab import vm

    rc, out, err = vm.exec_on(lab["name"], "h1", [sys.executable, *argv], GUEST_TIMEOUT_S)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"rc={rc}\n--- out\n{out}\n--- err\n{err}"
    seen = json.loads(lines[-1])
    print(seen)
    return seen, rc, err


@pytest.mark.parametrize("backend", ["ipvs", "nft"])
def test_vip_reaches_both_backends_then_only_the_remaining_one_in_vm(
    lab: dict, backend: str
) -> None:
    seen, rc, err = _in_guest(lab, [str(SCENARIO), "--backend", backend])
    shared.check(seen)
    assert rc == 0, err


@pytest.mark.parametrize("backend", ["ipvs", "nft"])
def test_all_ports_vip_drain_and_rejects_in_vm(lab: dict, backend: str) -> None:
    seen, rc, err = _in_guest(lab, [__file__, "allports", backend])
    allports_check(seen)
    assert rc == 0, err


def test_auto_picks_ipvs_in_the_vm(lab: dict) -> None:
    seen, rc, err = _in_guest(lab, [__file__, "auto"])
    auto_check(seen, "ipvs")
    assert rc == 0, err


def main(argv: list[str]) -> None:
    if argv[0] == "allports":
        seen = allports_scenario(argv[1])
        print(json.dumps(seen))
        allports_check(seen)
    elif argv[0] == "auto":
        seen = auto_scenario()
        print(json.dumps(seen))
        auto_check(seen, "ipvs")
    else:
        raise SystemExit(f"usage: {sys.argv[0]} allports BACKEND | auto")


if __name__ == "__main__":
    main(sys.argv[1:])
