"""The overlay reconciler on the real kernel: two "hosts" (namespaces) joined by a veth
underlay, one overlay network, one task sandbox on each, traffic over VXLAN.

Everything lives in namespaces named sntest-<random>-...; the fixture removes them all (and
with them every link) whatever happens. Nothing touches the root namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from swarmnet.overlay.plan import (
    LocalAttachment,
    NodeOverlay,
    OverlayNetwork,
    RemoteEndpoint,
    mac_for_ip,
    sandbox_name,
)
from swarmnet.overlay.reconciler import OverlayReconciler

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
    ),
]

NETNS_DIR = "/run/netns"
VNI = 4242
NET = OverlayNetwork("net-it", "it", VNI, "10.9.0.0/24")
VTEP_A, VTEP_B = "198.51.100.1", "198.51.100.2"
IP_A, IP_B = "10.9.0.2", "10.9.0.3"
VX = f"sn-vx-{VNI}"

# A minimal ICMP echo client, for machines without ping(8): sends COUNT requests, waits up
# to TIMEOUT seconds for each reply, exits 0 only if every request was answered.
PINGER = r"""
import os, select, socket, struct, sys, time
dst, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
got = 0
for seq in range(1, count + 1):
    body = b"swarmnet-overlay" * 4
    pkt = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + body
    pkt = pkt[:2] + struct.pack("!H", csum(pkt)) + pkt[4:]
    s.sendto(pkt, (dst, 0))
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
        data, addr = s.recvfrom(4096)
        h = (data[0] & 0x0F) * 4
        typ, _, _, i, sq = struct.unpack("!BBHHH", data[h : h + 8])
        if typ == 0 and i == ident and sq == seq and addr[0] == dst:
            got += 1
            break
print(f"{got}/{count} replies")
sys.exit(0 if got == count else 1)
"""


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def ping(netns: str, dst: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("ping"):
        cmd = ["ping", "-c", "3", "-W", "2", dst]
    else:
        cmd = [sys.executable, "-c", PINGER, dst, "3", "2"]
    return sh("ip", "netns", "exec", netns, *cmd, check=False, timeout=60)


def rx_packets(netns: str, dev: str) -> int:
    out = json.loads(sh("ip", "-n", netns, "-s", "-j", "link", "show", "dev", dev).stdout)
    return int(out[0]["stats64"]["rx"]["packets"])


def links(netns: str) -> list[str]:
    return [m["ifname"] for m in json.loads(sh("ip", "-n", netns, "-j", "link", "show").stdout)]


@dataclass
class Lab:
    tag: str  # "sntest-<random>": every namespace of this test starts with it
    host_a: str
    host_b: str


@pytest.fixture
def lab() -> Iterator[Lab]:
    tag = f"sntest-{secrets.token_hex(3)}"
    lab = Lab(tag, f"{tag}-a", f"{tag}-b")
    try:
        for host in (lab.host_a, lab.host_b):
            sh("ip", "netns", "add", host)
            sh("ip", "-n", host, "link", "set", "lo", "up")
        # The underlay: one veth between the two hosts (1500 MTU, the veth default).
        sh("ip", "-n", lab.host_a, "link", "add", "ul0", "type", "veth",
           "peer", "name", "ul0", "netns", lab.host_b)  # fmt: skip
        for host, addr in ((lab.host_a, VTEP_A), (lab.host_b, VTEP_B)):
            sh("ip", "-n", host, "addr", "add", f"{addr}/24", "dev", "ul0")
            sh("ip", "-n", host, "link", "set", "ul0", "up")
        yield lab
    finally:
        # Sandboxes and hosts alike; deleting a host namespace takes its links with it.
        for name in sorted(os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []):
            if name.startswith(tag):
                sh("ip", "netns", "del", name, check=False)


def node_for(lab: Lab, side: str, remote: bool = True) -> NodeOverlay:
    me, peer = (IP_A, IP_B) if side == "a" else (IP_B, IP_A)
    vtep, peer_vtep = (VTEP_A, VTEP_B) if side == "a" else (VTEP_B, VTEP_A)
    prefix = f"{lab.tag}-{side}-"
    sb = sandbox_name(prefix, f"task{side}")
    return NodeOverlay(
        vtep=vtep,
        underlay_mtu=1500,
        networks=(NET,),
        sandboxes=(sb,),
        attachments=(LocalAttachment(f"task{side}", NET.id, f"{me}/24", sb, "eth0"),),
        remotes=(RemoteEndpoint(NET.id, peer, peer_vtep),) if remote else (),
        netns_prefix=prefix,
    )


def test_two_hosts_one_overlay(lab: Lab) -> None:
    from swarmnet.kernel.netlink import NetlinkKernel

    ka = NetlinkKernel(base_netns=lab.host_a)
    kb = NetlinkKernel(base_netns=lab.host_b)
    dump: subprocess.Popen[str] | None = None
    try:
        ra, rb = OverlayReconciler(ka), OverlayReconciler(kb)
        na, nb = node_for(lab, "a"), node_for(lab, "b")
        assert ra.reconcile(na) and rb.reconcile(nb)
        sb_a = na.sandboxes[0]

        # The kernel holds what we planned (read back with iproute2, not our own snapshot).
        assert {"sn-br-4242", VX} <= set(links(lab.host_a))
        neigh = sh("ip", "-n", lab.host_a, "neigh", "show", "dev", VX).stdout
        assert IP_B in neigh and mac_for_ip(IP_B) in neigh and "PERMANENT" in neigh
        fdb = sh("bridge", "-n", lab.host_a, "fdb", "show", "dev", VX).stdout
        assert f"{mac_for_ip(IP_B)} dst {VTEP_B}" in fdb

        if shutil.which("tcpdump"):
            dump = subprocess.Popen(
                # -c 2: exit after the first request and its reply, so we wait for the
                # capture to finish instead of racing it; immediate mode so libpcap does
                # not hold packets in a block until its timeout.
                [
                    "ip",
                    "netns",
                    "exec",
                    lab.host_b,
                    "tcpdump",
                    "--immediate-mode",
                    "-l",
                    "-n",
                    "-c",
                    "2",
                    "-i",
                    "ul0",
                    "udp",
                    "port",
                    "4789",
                ],  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert dump.stderr is not None
            # tcpdump prints "listening on ul0 ..." once the capture runs (after a
            # "verbose output suppressed" line); a closed stderr means it died.
            seen = []
            while not any("listening" in ln for ln in seen) and len(seen) < 5:
                seen.append(dump.stderr.readline())
            assert "listening" in seen[-1], seen
        rx_before = rx_packets(lab.host_b, VX)
        res = ping(sb_a, IP_B)
        assert res.returncode == 0, res.stdout + res.stderr
        assert rx_packets(lab.host_b, VX) - rx_before >= 3  # arrived through the vxlan
        if dump is not None:
            out, _ = dump.communicate(timeout=30)
            dump = None
            assert f"vni {VNI}" in out and f"{IP_A} > {IP_B}: ICMP echo request" in out, out

        # Level-triggered and idempotent: a second pass changes nothing.
        assert ra.reconcile(na) == [] and rb.reconcile(nb) == []

        # The peer's endpoint goes away: its PERMANENT entries must go too (moby#50232).
        na_gone = node_for(lab, "a", remote=False)
        assert ra.reconcile(na_gone)
        assert ka.snapshot().fdb == set() and ka.snapshot().neigh == set()
        # (The bridge's own dynamically learned entry for that MAC may remain until it ages
        # out; it has no `dst`, and frames it sends to the vxlan port find no VTEP.)
        fdb = sh("bridge", "-n", lab.host_a, "fdb", "show", "dev", VX).stdout.splitlines()
        assert not [ln for ln in fdb if mac_for_ip(IP_B) in ln and " dst " in ln], fdb
        assert IP_B not in sh("ip", "-n", lab.host_a, "neigh", "show", "dev", VX).stdout
        assert ping(sb_a, IP_B).returncode != 0  # no route over the overlay any more

        # The network goes away (and the task with it): nothing of ours is left.
        for r, n, host in ((ra, na_gone, lab.host_a), (rb, nb, lab.host_b)):
            empty = replace(n, networks=(), sandboxes=(), attachments=(), remotes=())
            assert r.reconcile(empty)
            assert [name for name in links(host) if name.startswith("sn-")] == []
            assert "ul0" in links(host)  # the underlay is not ours: untouched
            assert r.reconcile(empty) == []
        left = [n for n in os.listdir(NETNS_DIR) if n.startswith(lab.tag)]
        assert sorted(left) == sorted([lab.host_a, lab.host_b])
        assert (ra.errors, rb.errors) == (0, 0)
    finally:
        if dump is not None:
            dump.kill()
            dump.wait(timeout=10)
        ka.close()
        kb.close()
