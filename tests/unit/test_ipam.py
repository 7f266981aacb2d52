"""Tests for the replicated IPAM (swarmnet/raft/ipam.py).

Table tests pin every validation error (field and status) and the swarmkit-like serial
behaviour; a hypothesis state machine checks the invariants and "no leaks" against a
brute-force model, with restarts (snapshot round trips) thrown in at random.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from swarmnet.raft import ipam as ipam_mod
from swarmnet.raft.ipam import IPAM, VNI_MAX, VXLAN_ID_FIELD, IPAMError

# --------------------------------------------------------------------------- validation


def _with_net(subnet: str = "10.0.0.0/16") -> IPAM:
    ipam = IPAM()
    ipam.allocate_subnet("netA", subnet)
    ipam.allocate_vni("netA", 5000)
    return ipam


def _new(pools: list[str] | None = None, size: Any = 24) -> Callable[[], Any]:
    return lambda: IPAM(pools=pools, subnet_size=size)


def _sub(requested: Any, nid: str = "n", ipam: Callable[[], IPAM] = IPAM) -> Callable[[], Any]:
    return lambda: ipam().allocate_subnet(nid, requested)


def _vni(requested: Any, nid: str = "n", ipam: Callable[[], IPAM] = IPAM) -> Callable[[], Any]:
    return lambda: ipam().allocate_vni(nid, requested)


POOL, SUB, VNI = "DefaultAddrPool", "Subnet", VXLAN_ID_FIELD
VALIDATION_CASES: list[tuple[str, Callable[[], Any], str, int, str]] = [
    # (id, call, field, status, substring of message)
    ("pools-empty", _new([]), POOL, 400, "at least one"),
    ("pool-public", _new(["8.8.0.0/16"]), POOL, 400, "private"),
    ("pool-host-bits", _new(["10.0.0.1/8"]), POOL, 400, "did you mean 10.0.0.0/8?"),
    ("pool-ipv6", _new(["fd00::/8"]), POOL, 400, "IPv6"),
    ("pool-garbage", _new(["banana"]), POOL, 400, "not a valid"),
    ("pool-no-prefix", _new(["10.0.0.0"]), POOL, 400, "prefix"),
    ("pools-overlap", _new(["10.0.0.0/8", "10.1.0.0/16"]), POOL, 400, "overlap"),
    ("size-30", _new(size=30), "SubnetSize", 400, "/29"),
    ("size-below-pool", _new(size=7), "SubnetSize", 400, "/8"),
    ("size-below-pool-16", _new(["192.168.0.0/16"], 12), "SubnetSize", 400, "192.168.0.0/16"),
    ("size-str", _new(size="24"), "SubnetSize", 400, "integer"),
    ("size-bool", _new(size=True), "SubnetSize", 400, "integer"),
    (
        "subnet-host-bits",
        _sub("10.0.1.5/24"),
        SUB,
        400,
        "10.0.1.5/24 has host bits set; did you mean 10.0.1.0/24?",
    ),
    ("subnet-no-prefix", _sub("10.0.1.0"), SUB, 400, "10.0.1.0/24"),
    ("subnet-garbage", _sub("banana"), SUB, 400, "banana"),
    ("subnet-empty", _sub(""), SUB, 400, "CIDR"),
    ("subnet-int", _sub(24), SUB, 400, "CIDR"),
    ("subnet-prefix-33", _sub("10.0.0.0/33"), SUB, 400, "valid"),
    ("subnet-prefix-7", _sub("10.0.0.0/7"), SUB, 400, "/8"),
    ("subnet-prefix-30", _sub("10.0.0.0/30"), SUB, 400, "/29"),
    ("subnet-public", _sub("8.8.8.0/24"), SUB, 400, "private"),
    ("subnet-172.32", _sub("172.32.0.0/16"), SUB, 400, "private"),
    ("subnet-ipv6", _sub("fd00::/64"), SUB, 400, "IPv6"),
    (
        "subnet-overlap-inside",
        _sub("10.0.5.0/24", "netB", _with_net),
        SUB,
        409,
        "overlaps subnet 10.0.0.0/16 of network netA",
    ),
    ("subnet-overlap-covering", _sub("10.0.0.0/8", "netB", _with_net), SUB, 409, "netA"),
    ("subnet-overlap-equal", _sub("10.0.0.0/16", "netB", _with_net), SUB, 409, "10.0.0.0/16"),
    ("net-id-twice", _sub(None, "netA", _with_net), "NetworkID", 409, "netA"),
    ("net-id-empty", _sub(None, ""), "NetworkID", 400, "non-empty"),
    ("net-id-none", _vni(None, None), "NetworkID", 400, "non-empty"),  # type: ignore[arg-type]
    ("vni-zero", _vni(0), VNI, 400, "out of range"),
    ("vni-2^24", _vni(1 << 24), VNI, 400, "out of range"),
    ("vni-str", _vni("4096"), VNI, 400, "integer"),
    ("vni-bool", _vni(True), VNI, 400, "integer"),
    ("vni-in-use", _vni(5000, "netB", _with_net), VNI, 409, "VNI 5000 is in use by network netA"),
    ("vni-net-twice", _vni(None, "netA", _with_net), VNI, 409, "netA"),
    ("ip-unknown-net", lambda: IPAM().allocate_ip("nope", "t1"), "Networks", 404, "nope"),
    ("ip-owner-empty", lambda: _with_net().allocate_ip("netA", ""), "Owner", 400, "owner"),
    ("gateway-unknown", lambda: IPAM().gateway_of("nope"), "Networks", 404, "nope"),
]


@pytest.mark.parametrize(
    "call,field,status,fragment",
    [c[1:] for c in VALIDATION_CASES],
    ids=[c[0] for c in VALIDATION_CASES],
)
def test_validation_errors(call, field, status, fragment):
    with pytest.raises(IPAMError) as info:
        call()
    err = info.value
    assert (err.field, err.status) == (field, status), err
    assert fragment in err.message, err.message


def test_failed_requests_change_nothing():
    ipam = _with_net()
    before = ipam.to_dict()
    for call in (
        lambda: ipam.allocate_subnet("netB", "10.0.5.0/24"),
        lambda: ipam.allocate_subnet("netA"),
        lambda: ipam.allocate_vni("netB", 5000),
        lambda: ipam.allocate_ip("nope", "t"),
    ):
        with pytest.raises(IPAMError):
            call()
    assert ipam.to_dict() == before


def test_error_pickles_with_fields():
    err = pickle.loads(pickle.dumps(IPAMError("Subnet", "bad", 409)))
    assert (err.field, err.message, err.status) == ("Subnet", "bad", 409)
    assert "Subnet" in str(err) and "bad" in str(err)


def test_requested_subnet_is_canonicalised():
    ipam = IPAM()
    assert ipam.allocate_subnet("n", " 172.20.0.0/255.255.0.0 ") == "172.20.0.0/16"
    assert ipam.subnet_of("n") == "172.20.0.0/16"


# --------------------------------------------------------------------------- subnets


def test_fresh_cluster_ingress_gets_first_block():
    ipam = IPAM()
    assert ipam.allocate_subnet("ingress") == "10.0.0.0/24"
    assert ipam.gateway_of("ingress") == "10.0.0.1"
    assert ipam.allocate_vni("ingress") == 4096
    assert ipam.allocate_ip("ingress", "task1") == "10.0.0.2/24"


def test_subnets_are_serial_freed_block_reused_late():
    ipam = IPAM()
    assert ipam.allocate_subnet("a") == "10.0.0.0/24"
    assert ipam.allocate_subnet("b") == "10.0.1.0/24"
    ipam.release_subnet("a")
    assert ipam.allocate_subnet("c") == "10.0.2.0/24"


def test_subnets_wrap_then_exhaust():
    ipam = IPAM(pools=["10.0.0.0/22"], subnet_size=24)
    got = [ipam.allocate_subnet(f"n{i}") for i in range(4)]
    assert got == ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"]
    ipam.release_subnet("n1")
    assert ipam.allocate_subnet("x") == "10.0.1.0/24"  # wrapped past the end
    with pytest.raises(IPAMError) as info:
        ipam.allocate_subnet("y")
    err = info.value
    assert (err.field, err.status) == ("Subnet", 409)
    assert "exhausted" in err.message and "10.0.0.0/22" in err.message and "y" in err.message


def test_multiple_pools_in_order_and_wrap():
    ipam = IPAM(pools=["10.10.0.0/23", "192.168.0.0/24"], subnet_size=24)
    assert [ipam.allocate_subnet(f"n{i}") for i in range(3)] == [
        "10.10.0.0/24",
        "10.10.1.0/24",
        "192.168.0.0/24",
    ]
    ipam.release_subnet("n0")
    assert ipam.allocate_subnet("again") == "10.10.0.0/24"


def test_requested_subnets_are_skipped_by_automatic_allocation():
    ipam = IPAM()
    ipam.allocate_subnet("user1", "10.0.1.0/24")
    ipam.allocate_subnet("user2", "10.0.3.128/25")  # smaller than a block: the block is taken
    assert ipam.allocate_subnet("a") == "10.0.0.0/24"
    assert ipam.allocate_subnet("b") == "10.0.2.0/24"
    assert ipam.allocate_subnet("c") == "10.0.4.0/24"
    # A requested subnet outside the pools is fine and does not disturb the pools.
    assert ipam.allocate_subnet("d", "192.168.50.0/24") == "192.168.50.0/24"
    assert ipam.allocate_subnet("e") == "10.0.5.0/24"
    ipam.check_invariants()


def test_large_requested_range_is_skipped_in_one_jump():
    ipam = IPAM()
    ipam.allocate_subnet("big", "10.0.0.0/9")
    assert ipam.allocate_subnet("a") == "10.128.0.0/24"


def test_automatic_subnet_can_not_take_a_requested_one():
    ipam = IPAM(pools=["10.0.0.0/23"], subnet_size=24)
    ipam.allocate_subnet("u", "10.0.0.0/23")
    with pytest.raises(IPAMError) as info:
        ipam.allocate_subnet("a")
    assert info.value.status == 409 and "exhausted" in info.value.message


def test_release_subnet_frees_everything_and_is_idempotent():
    ipam = IPAM()
    ipam.allocate_subnet("n", "10.9.0.0/24")
    for i in range(10):
        ipam.allocate_ip("n", f"t{i}")
    ipam.release_subnet("n")
    ipam.release_subnet("n")
    ipam.release_subnet("never-existed")
    assert ipam.subnet_of("n") is None
    assert ipam.used_ips("n") == {}
    assert ipam.ip_of("n", "t1") is None
    ipam.release_ip("n", "t1")  # no network: no-op
    # The same range is allocatable again, with a fresh serial cursor.
    assert ipam.allocate_subnet("n2", "10.9.0.0/24") == "10.9.0.0/24"
    assert ipam.allocate_ip("n2", "t0") == "10.9.0.2/24"
    ipam.check_invariants()


# --------------------------------------------------------------------------- VNIs


def test_vnis_start_at_4096_and_are_serial():
    ipam = IPAM()
    assert ipam.allocate_vni("a") == 4096
    assert ipam.allocate_vni("b") == 4097
    assert ipam.allocate_vni("pinned", 4098) == 4098
    assert ipam.allocate_vni("c") == 4099  # skips the pinned one
    ipam.release_vni("a")
    assert ipam.allocate_vni("d") == 4100  # the freed 4096 is reused late
    assert ipam.allocate_vni("low", 1) == 1  # below the automatic range: allowed when pinned
    assert ipam.allocate_vni("e") == 4101
    assert ipam.vni_of("low") == 1 and ipam.vni_of("a") is None
    ipam.release_vni("a")
    ipam.release_vni("never")
    ipam.check_invariants()


def test_vni_wraps_to_4096():
    d = IPAM().to_dict()
    d["vni_cursor"] = VNI_MAX - 1
    ipam = IPAM.from_dict(d)
    assert ipam.allocate_vni("a") == VNI_MAX
    assert ipam.allocate_vni("b") == 4096


def test_requested_vni_conflicts_with_automatic_one():
    ipam = IPAM()
    ipam.allocate_vni("a")
    with pytest.raises(IPAMError) as info:
        ipam.allocate_vni("b", 4096)
    assert info.value.status == 409 and "network a" in info.value.message
    ipam.release_vni("a")
    assert ipam.allocate_vni("b", 4096) == 4096


# --------------------------------------------------------------------------- addresses


def test_ips_are_serial_and_freed_ones_reused_late():
    ipam = IPAM()
    ipam.allocate_subnet("n")
    assert ipam.allocate_ip("n", "t1") == "10.0.0.2/24"
    assert ipam.allocate_ip("n", "t2") == "10.0.0.3/24"
    ipam.release_ip("n", "t1")
    assert ipam.allocate_ip("n", "t3") == "10.0.0.4/24"  # not the freed .2
    assert ipam.used_ips("n") == {"t2": "10.0.0.3/24", "t3": "10.0.0.4/24"}


def test_allocate_ip_is_idempotent_per_owner():
    ipam = IPAM()
    ipam.allocate_subnet("n")
    first = ipam.allocate_ip("n", "task-1")
    assert ipam.allocate_ip("n", "task-1") == first
    assert ipam.ip_of("n", "task-1") == first
    assert len(ipam.used_ips("n")) == 1
    ipam.release_ip("n", "task-1")
    ipam.release_ip("n", "task-1")
    assert ipam.used_ips("n") == {} and ipam.ip_of("n", "task-1") is None


def test_small_subnet_wraps_and_exhausts():
    ipam = IPAM()
    ipam.allocate_subnet("tiny", "192.168.9.8/29")
    assert ipam.gateway_of("tiny") == "192.168.9.9"
    got = [ipam.allocate_ip("tiny", f"t{i}") for i in range(5)]  # 8 - net - gw - bcast
    assert got == [f"192.168.9.{h}/29" for h in range(10, 15)]
    with pytest.raises(IPAMError) as info:
        ipam.allocate_ip("tiny", "t5")
    err = info.value
    assert (err.field, err.status) == ("Networks", 409)
    assert "no free address in 192.168.9.8/29 (network tiny)" in err.message
    ipam.release_ip("tiny", "t1")  # .11
    assert ipam.allocate_ip("tiny", "t6") == "192.168.9.11/29"  # wrap: skips net and gateway
    ipam.release_ip("tiny", "t4")  # .14
    ipam.release_ip("tiny", "t0")  # .10
    assert ipam.allocate_ip("tiny", "t7") == "192.168.9.14/29"  # next after .11, not .10
    assert ipam.allocate_ip("tiny", "t8") == "192.168.9.10/29"
    ipam.check_invariants()


def test_large_network_many_tasks():
    """65,533 tasks in a /16: serial allocation must stay O(1) per call (this would take
    minutes with a scan per call); all distinct, then exhaustion."""
    ipam = IPAM()
    ipam.allocate_subnet("big", "10.1.0.0/16")
    usable = (1 << 16) - 3
    addrs = {ipam.allocate_ip("big", f"t{i}") for i in range(usable)}
    assert len(addrs) == usable
    assert "10.1.0.1/16" not in addrs and "10.1.255.255/16" not in addrs
    with pytest.raises(IPAMError):
        ipam.allocate_ip("big", "one-more")
    ipam.release_ip("big", "t100")
    assert ipam.allocate_ip("big", "late") == "10.1.0.102/16"
    ipam.check_invariants()


def test_many_networks_in_default_pool():
    ipam = IPAM()
    got = [ipam.allocate_subnet(f"n{i}") for i in range(5000)]
    assert len(set(got)) == 5000
    assert got[-1] == _nth_block(4999) == "10.19.135.0/24"
    for i in range(0, 5000, 2):
        ipam.release_subnet(f"n{i}")
    assert ipam.allocate_subnet("next") == _nth_block(5000)
    ipam.check_invariants()


def _nth_block(n: int) -> str:
    return str(ipaddress.IPv4Network(("10.0.0.0", 24)).network_address + n * 256) + "/24"


# --------------------------------------------------------------------------- snapshots


def _busy_ipam() -> IPAM:
    ipam = IPAM(pools=["10.0.0.0/16", "172.16.0.0/16"], subnet_size=24)
    for i in range(6):
        ipam.allocate_subnet(f"n{i}")
        ipam.allocate_vni(f"n{i}")
        for t in range(5):
            ipam.allocate_ip(f"n{i}", f"n{i}.t{t}")
    ipam.allocate_subnet("user", "192.168.3.0/24")
    ipam.allocate_vni("user", 77)
    ipam.release_ip("n1", "n1.t2")
    ipam.release_subnet("n2")
    ipam.release_vni("n2")
    return ipam


def test_round_trip_is_exact_and_continues_identically():
    ipam = _busy_ipam()
    d = ipam.to_dict()
    for restored in (
        IPAM.from_dict(d),
        IPAM.from_dict(json.loads(json.dumps(d))),
        pickle.loads(pickle.dumps(ipam)),
    ):
        assert restored == ipam and restored.to_dict() == d
        # Cursors survive: both continue the serial sequences the same way.
        ops = [
            lambda i: i.allocate_subnet("z"),
            lambda i: i.allocate_vni("z"),
            lambda i: i.allocate_ip("n1", "new"),
            lambda i: i.allocate_ip("z", "new"),
        ]
        twin = _busy_ipam()  # never snapshotted: same calls, so the same state
        assert [op(restored) for op in ops] == [op(twin) for op in ops]
    assert IPAM.from_dict(d).allocate_ip("n1", "new") == "10.0.1.7/24"  # after .6, not .4


def test_from_dict_rejects_bad_snapshots():
    d = _busy_ipam().to_dict()
    with pytest.raises(ValueError):
        IPAM.from_dict({**d, "version": 99})
    bad = json.loads(json.dumps(d))
    bad["networks"]["overlap"] = {"subnet": "10.0.0.0/23", "ip_cursor": 1, "ips": {}}
    with pytest.raises(AssertionError):
        IPAM.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["networks"]["n0"]["ips"]["gw"] = "10.0.0.1"
    with pytest.raises(AssertionError):
        IPAM.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["vnis"]["dup"] = bad["vnis"]["n0"]
    with pytest.raises(AssertionError):
        IPAM.from_dict(bad)


def test_module_is_pure():
    """The IPAM runs inside the replicated state machine: no I/O, clock or randomness."""
    tree = ast.parse(Path(ipam_mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "bisect", "ipaddress", "typing"}, imported


# --------------------------------------------------------------------------- stateful

POOLS = ["10.0.0.0/25", "192.168.7.0/26"]
SIZE = 27  # 4 + 2 = 6 automatic blocks of 29 usable addresses: exhaustion is reachable
BLOCKS = [b for p in POOLS for b in ipaddress.IPv4Network(p).subnets(new_prefix=SIZE)]
NET_IDS = [f"net{i}" for i in range(8)]
OWNERS = [f"t{i}" for i in range(16)]
PINNED_VNIS = [1, 4095, 4096, 4097, 4098, 4099]


@st.composite
def requested_subnets(draw) -> str:
    # Inside the pools (overlaps blocks), beside them, and in other private space.
    region = draw(st.sampled_from(["10.0.0.0/24", "192.168.7.0/25", "172.16.0.0/24"]))
    prefix = draw(st.integers(min_value=25, max_value=29))
    net = ipaddress.IPv4Network(region)
    slots = 1 << (prefix - net.prefixlen)
    k = draw(st.integers(min_value=0, max_value=slots - 1))
    return f"{net.network_address + k * (1 << (32 - prefix))}/{prefix}"


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except IPAMError as e:
        return ("err", (e.field, e.status, e.message))


class IPAMMachine(RuleBasedStateMachine):
    """Model: which subnet, VNI and addresses each network should hold, plus brute-force
    oracles for the serial choices. ``twin`` never restarts; ``ipam`` is rebuilt from its
    snapshot at random (a restart or a new leader); both must answer every call alike."""

    def __init__(self) -> None:
        super().__init__()
        self.ipam = IPAM(POOLS, SIZE)
        self.twin = IPAM(POOLS, SIZE)
        self.subnets: dict[str, ipaddress.IPv4Network] = {}
        self.vnis: dict[str, int] = {}
        self.ips: dict[str, dict[str, int]] = {}  # net -> owner -> offset
        self.ip_cursor: dict[str, int] = {}
        self.block_cursor = -1
        self.vni_cursor = 4095

    # -- helpers

    def both(self, name: str, *args: Any) -> tuple[str, Any]:
        a = _outcome(lambda: getattr(self.ipam, name)(*args))
        b = _outcome(lambda: getattr(self.twin, name)(*args))
        assert a == b, (name, args, a, b)
        return a

    def overlaps(self, net: ipaddress.IPv4Network) -> bool:
        return any(net.overlaps(s) for s in self.subnets.values())

    def expected_block(self) -> int | None:
        n = len(BLOCKS)
        for step in range(1, n + 1):
            i = (self.block_cursor + step) % n
            if not self.overlaps(BLOCKS[i]):
                return i
        return None

    def expected_vni(self) -> int:
        vni = self.vni_cursor + 1
        while vni in self.vnis.values():
            vni += 1
        return vni

    def expected_offset(self, nid: str) -> int | None:
        size = self.subnets[nid].num_addresses
        used = set(self.ips[nid].values())
        offset = self.ip_cursor[nid]
        for _ in range(size - 3):
            offset = offset + 1 if offset < size - 2 else 2
            if offset not in used:
                return offset
        return None

    def add_vni(self, nid: str, pinned: int | None) -> bool:
        if pinned is None:
            want = self.expected_vni()
            assert self.both("allocate_vni", nid) == ("ok", want)
            self.vni_cursor = want
        else:
            got = self.both("allocate_vni", nid, pinned)
            if pinned in self.vnis.values():
                assert got[0] == "err" and got[1][1] == 409
                event("pinned VNI in use")
                return False
            assert got == ("ok", pinned)
        self.vnis[nid] = self.vni_of_result(nid)
        return True

    def vni_of_result(self, nid: str) -> int:
        vni = self.ipam.vni_of(nid)
        assert vni is not None and vni == self.twin.vni_of(nid)
        return vni

    def register(self, nid: str, cidr: str) -> None:
        self.subnets[nid] = ipaddress.IPv4Network(cidr)
        self.ips[nid] = {}
        self.ip_cursor[nid] = 1

    def drop(self, nid: str) -> None:
        self.both("release_subnet", nid)
        self.both("release_vni", nid)
        for m in (self.subnets, self.vnis, self.ips, self.ip_cursor):
            m.pop(nid, None)

    # -- rules

    @rule(nid=st.sampled_from(NET_IDS), pinned=st.none() | st.sampled_from(PINNED_VNIS))
    def create_auto(self, nid: str, pinned: int | None) -> None:
        got = self.both("allocate_subnet", nid)
        if nid in self.subnets:
            assert got[0] == "err" and got[1][:2] == ("NetworkID", 409)
            return
        want = self.expected_block()
        if want is None:
            assert got[0] == "err" and got[1][:2] == ("Subnet", 409)
            assert "exhausted" in got[1][2]
            event("subnet pools exhausted")
            return
        assert got == ("ok", str(BLOCKS[want]))
        self.block_cursor = want
        self.register(nid, got[1])
        if not self.add_vni(nid, pinned):
            self.drop(nid)  # the state machine rolls back a half-made network

    @rule(nid=st.sampled_from(NET_IDS), cidr=requested_subnets())
    def create_requested(self, nid: str, cidr: str) -> None:
        got = self.both("allocate_subnet", nid, cidr)
        if nid in self.subnets:
            assert got[0] == "err" and got[1][:2] == ("NetworkID", 409)
        elif self.overlaps(ipaddress.IPv4Network(cidr)):
            assert got[0] == "err" and got[1][:2] == ("Subnet", 409), got
            event("requested subnet overlaps")
        else:
            assert got == ("ok", cidr)
            self.register(nid, cidr)
            self.add_vni(nid, None)

    @rule(nid=st.sampled_from(NET_IDS))
    def remove(self, nid: str) -> None:
        self.drop(nid)
        self.drop(nid)  # idempotent

    @rule(nid=st.sampled_from(NET_IDS), owner=st.sampled_from(OWNERS))
    def alloc_ip(self, nid: str, owner: str) -> None:
        got = self.both("allocate_ip", nid, owner)
        if nid not in self.subnets:
            assert got[0] == "err" and got[1][:2] == ("Networks", 404)
            return
        net = self.subnets[nid]
        if owner in self.ips[nid]:
            want = self.ips[nid][owner]
        else:
            want = self.expected_offset(nid)
            if want is None:
                assert got[0] == "err" and got[1][:2] == ("Networks", 409)
                event("network address space exhausted")
                return
            self.ips[nid][owner] = want
            self.ip_cursor[nid] = want
        assert got == ("ok", f"{net.network_address + want}/{net.prefixlen}")

    @precondition(lambda self: self.subnets)
    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def alloc_ip_existing(self, data: st.DataObject, owner: str) -> None:
        self.alloc_ip(data.draw(st.sampled_from(sorted(self.subnets))), owner)

    @precondition(lambda self: self.subnets)
    @rule(data=st.data())
    def fill(self, data: st.DataObject) -> None:
        """Every owner asks for an address: small user subnets (/28, /29) run out."""
        nid = data.draw(st.sampled_from(sorted(self.subnets)))
        for owner in OWNERS:
            self.alloc_ip(nid, owner)

    @rule(nid=st.sampled_from(NET_IDS), owner=st.sampled_from(OWNERS))
    def release_ip(self, nid: str, owner: str) -> None:
        self.both("release_ip", nid, owner)
        self.ips.get(nid, {}).pop(owner, None)

    @rule()
    def restart(self) -> None:
        d = self.ipam.to_dict()
        self.ipam = IPAM.from_dict(json.loads(json.dumps(d)))
        assert self.ipam.to_dict() == d
        self.ipam = pickle.loads(pickle.dumps(self.ipam))
        assert self.ipam == self.twin

    @precondition(lambda self: self.subnets)
    @rule(data=st.data())
    def drain_and_refill(self, data: st.DataObject) -> None:
        """Free a network's addresses, then its whole host range must be allocatable again."""
        nid = data.draw(st.sampled_from(sorted(self.subnets)))
        for owner in list(self.ips[nid]):
            self.release_ip(nid, owner)
        usable = self.subnets[nid].num_addresses - 3
        for i in range(usable):
            self.alloc_ip(nid, f"fill{i}")
        assert len(self.ipam.used_ips(nid)) == usable
        self.alloc_ip(nid, "one-too-many")
        assert self.ipam.ip_of(nid, "one-too-many") is None
        for i in range(usable):
            self.release_ip(nid, f"fill{i}")

    @rule()
    def release_everything(self) -> None:
        """No leaks: with every network gone, every pool and VNI is allocatable again."""
        for nid in list(self.subnets) + list(self.vnis):
            self.drop(nid)
        snap = self.ipam.to_dict()
        assert snap["networks"] == {} and snap["vnis"] == {}
        for ipam in (IPAM.from_dict(snap), IPAM.from_dict(snap)):
            for i, pool in enumerate(POOLS):
                assert ipam.allocate_subnet(f"whole{i}", pool) == pool
            for vni in PINNED_VNIS:
                assert ipam.allocate_vni(f"v{vni}", vni) == vni
        probe = IPAM.from_dict(snap)
        assert len({probe.allocate_subnet(f"b{i}") for i in range(len(BLOCKS))}) == len(BLOCKS)

    # -- invariants

    @invariant()
    def consistent(self) -> None:
        self.ipam.check_invariants()
        self.twin.check_invariants()
        for nid in NET_IDS:
            sub = self.subnets.get(nid)
            assert self.ipam.subnet_of(nid) == (None if sub is None else str(sub))
            assert self.ipam.vni_of(nid) == self.vnis.get(nid)
            want = (
                {
                    o: f"{sub.network_address + off}/{sub.prefixlen}"
                    for o, off in self.ips.get(nid, {}).items()
                }
                if sub is not None
                else {}
            )
            assert self.ipam.used_ips(nid) == want
        # Never two overlapping subnets, never a duplicate VNI (belt and braces on the model).
        nets = list(self.subnets.values())
        assert not any(a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1 :])
        assert len(set(self.vnis.values())) == len(self.vnis)


IPAMMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIPAMStateful = IPAMMachine.TestCase
