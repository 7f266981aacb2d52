"""The LB backends on a real kernel: client ns -> "node" ns (holds the VIP's load balancer,
routes between the others) -> two backend namespaces running python http servers.

The scenario is plain functions so that the VM lab runs the very same code with IPVS: this
file is also a script (``python test_lb_nft.py --backend ipvs``, see test_lb_ipvs_vm.py),
printing one JSON line with the result. Every namespace is named ``sntest-<random>-<role>``
and removed in ``finally`` (which kills the servers in them too), pass or fail.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from swarmnet.lb import plan
from swarmnet.lb.backend import choose_backend, ipvs_available
from swarmnet.lb.plan import Backend, LBService, LBState

VIP = "10.77.100.10"
NODE_IF = {"cl": "10.77.0", "be1": "10.77.1", "be2": "10.77.2"}  # .1 node side, .2 far side
BE_PORT = 8080
REQUESTS = 24
READY_TIMEOUT_S = 60.0  # python start-up; ~20x slower in a TCG guest

# A client inside the client namespace: one NEW connection per request, prints one line
# per request: the body, or "refused"/"timeout"/"error:<name>".
CLIENT = r"""
import socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
port = int(sys.argv[3]) if len(sys.argv) > 3 else 80
for _ in range(n):
    try:
        with socket.create_connection((vip, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        print(data.split(b"\r\n\r\n", 1)[1].decode().strip())
    except ConnectionRefusedError:
        print("refused")
    except TimeoutError:
        print("timeout")
    except OSError as e:
        print("error:" + type(e).__name__)
"""


def sh(*argv: str, input: str | None = None, check: bool = True) -> str:
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise RuntimeError(f"{argv}: rc={p.returncode}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def nsx(ns: str, *argv: str, **kw) -> str:
    return sh("ip", "netns", "exec", ns, *argv, **kw)


class Topology:
    """client -- node -- {be1, be2}; the node forwards and is everyone's gateway."""

    def __init__(self) -> None:
        tag = "sntest-" + secrets.token_hex(3)
        self.ns = {role: f"{tag}-{role}" for role in ("node", "cl", "be1", "be2")}
        self.node = self.ns["node"]
        self.servers: list[subprocess.Popen] = []
        self.tmp = f"/tmp/{tag}"

    def up(self) -> None:
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        nsx(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, (role, net) in enumerate(NODE_IF.items()):
            far = self.ns[role]
            sh("ip", "-n", self.node, "link", "add", f"v{i}", "type", "veth",
               "peer", "name", "eth0", "netns", far)  # fmt: skip
            nsx(self.node, "ip", "addr", "add", f"{net}.1/24", "dev", f"v{i}")
            nsx(self.node, "ip", "link", "set", f"v{i}", "up")
            nsx(far, "ip", "addr", "add", f"{net}.2/24", "dev", "eth0")
            nsx(far, "ip", "link", "set", "eth0", "up")
            nsx(far, "ip", "route", "add", "default", "via", f"{net}.1")
        for role in ("be1", "be2"):
            d = os.path.join(self.tmp, role)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "index.html"), "w") as f:
                f.write(role + "\n")
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.ns[role], sys.executable, "-m", "http.server",
                 str(BE_PORT), "--bind", f"{NODE_IF[role]}.2", "--directory", d],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        for role in ("be1", "be2"):
            url = f"http://{NODE_IF[role]}.2:{BE_PORT}/"
            probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2)"
            while subprocess.run(["ip", "netns", "exec", self.node, sys.executable, "-c", probe],
                                 capture_output=True).returncode != 0:  # fmt: skip
                if time.monotonic() > deadline:
                    raise RuntimeError(f"backend {role} did not answer within {READY_TIMEOUT_S} s")
                time.sleep(0.2)

    def down(self) -> None:
        for p in self.servers:
            p.kill()
        for p in self.servers:
            p.wait(timeout=30)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def requests(self, n: int = REQUESTS) -> Counter:
        out = nsx(self.ns["cl"], sys.executable, "-c", CLIENT, VIP, str(n))
        return Counter(out.split())


def be(role: str) -> Backend:
    return Backend(f"{NODE_IF[role]}.2", BE_PORT)


def web(*roles: str) -> LBService:
    return LBService(VIP, "tcp", 80, tuple(be(r) for r in roles))


def scenario(backend_name: str) -> dict:
    """Program the VIP, go through it, remove a backend, then all; return what was seen."""
    topo = Topology()
    seen: dict = {"backend": backend_name}
    lb = None
    try:
        topo.up()
        lb = choose_backend(backend_name, netns=topo.node)  # type: ignore[arg-type]
        seen["chosen"] = lb.name
        if lb.name == "ipvs":  # IPVS sees only packets for local addresses (LOCAL_IN)
            nsx(topo.node, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
        both = LBState.of(web("be1", "be2"))
        lb.sync(both)
        seen["dump_both_ok"] = lb.dump() == both
        seen["both"] = dict(topo.requests())
        one = LBState.of(web("be2"))
        seen["changed"] = len(lb.sync(one))
        seen["dump_one_ok"] = lb.dump() == one
        seen["one"] = dict(topo.requests())
        lb.sync(LBState.of(web()))
        seen["none"] = dict(topo.requests(4))
        lb.full_sync(LBState())
        seen["dump_empty_ok"] = lb.dump() == LBState()
        return seen
    finally:
        if lb is not None:
            lb.close()
        topo.down()


def check(seen: dict) -> None:
    """The assertions, shared by the host and the VM runs."""
    assert seen["chosen"] == seen["backend"], seen
    assert set(seen["both"]) == {"be1", "be2"}, seen  # BOTH answer through the VIP
    assert sum(seen["both"].values()) == REQUESTS, seen
    assert seen["one"] == {"be2": REQUESTS}, seen  # only the remaining one
    assert seen["none"] == {"refused": 4}, seen  # no backend: refused, not black-holed
    assert seen["changed"] == 1, seen
    assert seen["dump_both_ok"] and seen["dump_one_ok"] and seen["dump_empty_ok"], seen


def _backends() -> list:
    ipvs = pytest.param(
        "ipvs",
        marks=pytest.mark.skipif(
            os.geteuid() != 0 or not ipvs_available(), reason="this kernel has no IPVS"
        ),
    )
    return ["nft", ipvs]


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.parametrize("backend", _backends())
def test_vip_reaches_both_backends_then_only_the_remaining_one(backend: str) -> None:
    seen = scenario(backend)
    print(json.dumps(seen))
    check(seen)


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_nft_touches_only_its_own_table_and_recovers_by_full_sync() -> None:
    from swarmnet.lb.nft import NftBackend

    topo = Topology()
    try:
        sh("ip", "netns", "add", topo.node)
        nsx(topo.node, "nft", "add table inet other; add chain inet other c")
        lb = NftBackend(netns=topo.node)
        lb.sync(LBState.of(web("be1", "be2")))
        # someone deletes our chain behind our back: the next change fails, then recovers
        nsx(topo.node, "nft", "delete table inet swarmnet")
        with pytest.raises(Exception):  # noqa: B017 - KernelError, the kind depends on nft
            lb.sync(LBState.of(web("be2")))
        lb.sync(LBState.of(web("be2")))
        assert lb.dump() == LBState.of(web("be2"))
        assert "table inet other" in nsx(topo.node, "nft", "list tables")
        lb.close()
    finally:
        topo.down()


def _canonical(ns: str, table: str = "swarmnet") -> list[str]:
    """The table as the kernel reports it (``nft -j``), without handles and in a canonical
    order: two tables with equal values compare equal however they were built."""

    def strip(x: object) -> object:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "handle"}
        if isinstance(x, list):
            return sorted((strip(v) for v in x), key=json.dumps)
        return x

    doc = json.loads(nsx(ns, "nft", "-j", "list", "table", "inet", table))
    return sorted(json.dumps(strip(i)) for i in doc["nftables"] if "metainfo" not in i)


def _random_state(rng) -> LBState:
    services = []
    for v in rng.sample(range(2, 12), rng.randint(0, 6)):
        port = rng.choice((80, 53, 0))
        ips = rng.sample(range(5, 15), rng.randint(0, 4))
        bes = tuple(Backend(f"10.0.1.{i}", 8080 if port else 0, rng.randint(0, 3)) for i in ips)
        services.append(LBService(f"10.0.0.{v}", rng.choice(("tcp", "udp")), port, bes))
    return LBState(frozenset(services))


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_nft_netlink_changes_equal_a_full_load_and_a_resync_from_the_kernel() -> None:
    """Incremental changes go out as our own netlink batches, full loads through
    libnftables: after every change the kernel's table must be exactly what a full load of
    the same state writes (read back through nft), and dump -> full_sync must round-trip."""
    import random

    from swarmnet.lb.fake import FakeBackend
    from swarmnet.lb.nft import NftBackend

    tag = "sntest-" + secrets.token_hex(3)
    inc_ns, full_ns = f"{tag}-inc", f"{tag}-full"
    inc = full = None
    try:
        for ns in (inc_ns, full_ns):
            sh("ip", "netns", "add", ns)
        inc, full, fake = NftBackend(netns=inc_ns), NftBackend(netns=full_ns), FakeBackend()
        rng = random.Random(6)
        inc.sync(LBState())
        fake.sync(LBState())
        for _ in range(40):
            state = _random_state(rng)
            changes = inc.sync(state)
            assert fake.sync(state) == changes
            if len(changes):
                assert not isinstance(fake.last_transaction[0], plan.ResetTable)
            full.full_sync(state)
            assert inc.dump() == state.without_drained() == fake.dump().without_drained()
            assert _canonical(inc_ns) == _canonical(full_ns)
        # a resync from kernel state: a new backend reads the table and reloads it as is
        fresh = NftBackend(netns=inc_ns)
        fresh.full_sync(fresh.dump())
        assert _canonical(inc_ns) == _canonical(full_ns)
        fresh.close()
    finally:
        for lb in (inc, full):
            if lb is not None:
                lb.close()
        for ns in (inc_ns, full_ns):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_nft_netlink_batch_is_all_or_nothing_and_follows_a_recreated_namespace() -> None:
    import errno

    from swarmnet.kernel.errors import KernelError
    from swarmnet.lb.nft import NftBackend

    ns = "sntest-" + secrets.token_hex(3)
    lb = None
    try:
        sh("ip", "netns", "add", ns)
        lb = NftBackend(netns=ns)
        state = LBState.of(web("be1", "be2"))
        lb.sync(state)
        before = _canonical(ns)
        name = plan.chain_name(web().key)
        ops = [plan.FlushChain(name), plan.AddServiceRule(name, web("be2")), plan.DelChain("svc-x")]
        with pytest.raises(KernelError) as e:
            lb._nl.commit(ops, "swarmnet", "services", "vips")  # type: ignore[union-attr]
        assert e.value.code == errno.ENOENT and e.value.op == plan.DelChain("svc-x")
        assert _canonical(ns) == before  # the flush and the new rule were not applied
        # the namespace is replaced under the same name: changes must not go to the old one
        sh("ip", "netns", "delete", ns)
        sh("ip", "netns", "add", ns)
        with pytest.raises(KernelError):
            lb.sync(LBState.of(web("be2")))  # no table in the new namespace
        lb.sync(LBState.of(web("be2")))  # full sync
        lb.sync(LBState.of(web("be1")))  # netlink change, in the new namespace
        assert lb.dump() == LBState.of(web("be1"))
    finally:
        if lb is not None:
            lb.close()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="run the LB scenario once, print JSON")
    ap.add_argument("--backend", choices=("nft", "ipvs"), required=True)
    seen = scenario(ap.parse_args().backend)
    print(json.dumps(seen))
    check(seen)


if __name__ == "__main__":
    main()
