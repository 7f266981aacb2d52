"""Pure, deterministic IPAM for the replicated Raft state machine.

Every subnet, VNI and address decision in swarmnet is made here, inside a replicated
command, from replicated state only. That is the structural defence against Swarm's
duplicate-IP class of bugs (DESIGN "Raft store"): two managers replaying the same log reach
the same allocations, byte for byte, because:

- nothing here reads the clock, the network, the disk or a random source;
- every choice is a pure function of prior calls (serial cursors, no hash-order iteration);
- the state is plain builtins (ints, strs, dicts, lists), so it pickles for pysyncobj's
  snapshot, compares with ``==`` and round-trips through ``to_dict``/``from_dict`` exactly.

Allocation policy follows swarmkit (SWARM-INTERNALS section 3):

- Subnets: the default pools (10.0.0.0/8) are cut into ``/subnet_size`` blocks (/24). The
  automatic choice is serial: the next free block after the last one handed out, with wrap,
  so on a fresh cluster the ingress network gets 10.0.0.0/24. A user-requested subnet may be
  anywhere in RFC 1918 space; it must not overlap any allocated subnet, and if it lies in a
  pool the automatic allocator skips it.
- VNIs: automatic ones come from [4096, 2**24) serially (4096 keeps clear of VLAN IDs on
  Windows); requested ones may be anything in [1, 2**24).
- Addresses: serial per network (``com.docker.network.ipam.serial=true``): the next free host
  after the last handed out, with wrap, so a freed IP is reused as late as possible and a
  stale ARP/FDB entry somewhere in the cluster is unlikely to point at a new owner. The
  gateway (first host) is reserved when the subnet is allocated, like Docker.

Errors are ``IPAMError(field, message, status)``: the API layer turns them into Docker-shaped
4xx JSON with the field at fault (DESIGN principle 6).
"""

from __future__ import annotations

import bisect
import ipaddress
from typing import Any

__all__ = [
    "DEFAULT_POOLS",
    "DEFAULT_SUBNET_SIZE",
    "IPAM",
    "IPAMError",
    "VNI_AUTO_FIRST",
    "VNI_MAX",
    "VXLAN_ID_FIELD",
]

DEFAULT_POOLS: tuple[str, ...] = ("10.0.0.0/8",)
"""Docker's default address pool (``ipamutils``); replaceable only at swarm init."""

DEFAULT_SUBNET_SIZE = 24
"""Prefix length of automatically allocated networks: 65,536 networks of 253 tasks in 10/8."""

SUBNET_PREFIX_MIN = 8
"""Largest network we accept (a whole 10/8)."""

SUBNET_PREFIX_MAX = 29
"""Smallest network: a /29 still leaves 5 hosts after network, gateway and broadcast."""

VNI_MIN = 1
VNI_MAX = (1 << 24) - 1
"""VXLAN IDs are 24 bits; 0 is never handed out (swarmkit's bitmap reserves it)."""

VNI_AUTO_FIRST = 4096
"""First automatic VNI: swarmkit moved from 256 to 4096 to avoid VLAN IDs on Windows."""

VXLAN_ID_FIELD = "com.docker.network.driver.overlay.vxlanid_list"
"""Field named by VNI errors: the Docker network option through which users pin VNIs."""

SNAPSHOT_VERSION = 1
"""Version of the ``to_dict`` layout. Bump, and keep reading old versions, if it changes."""

# RFC 1918 private space. Overlay subnets are routed nowhere, but a public range would shadow
# real destinations for every task on the network, so we refuse it outright.
_PRIVATE = tuple(
    ipaddress.IPv4Network(c) for c in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)

# Offsets inside a subnet: 0 is the network address, 1 the gateway, size-1 the broadcast.
_GATEWAY_OFFSET = 1
_FIRST_HOST_OFFSET = 2

# Sorts after any real interval end (ends are < 2**32); used as a bisect key.
_AFTER_ANY_END = 1 << 33


class IPAMError(Exception):
    """A refused IPAM request.

    ``field`` is the Docker API field at fault (``Subnet``, ``Networks``, ...), ``message`` a
    sentence for the user and ``status`` the HTTP status the API should answer with:
    400 invalid input, 404 unknown network, 409 conflict, duplicate, in use or exhausted.
    The constructor arguments are kept in ``args`` so the error survives pickling.
    """

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(field, message, status)
        self.field = field
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.field}: {self.message} ({self.status})"


def _check(cond: bool, message: str) -> None:
    """An assertion that stays on under ``python -O`` (invariants are part of the contract)."""
    if not cond:
        raise AssertionError(message)


def _ip(value: int) -> str:
    # Dotted quad by hand: str(IPv4Address(v)) builds an object per call, and this runs in
    # every allocation on every manager (the apply path of bench/raft_ipam.py). Same text.
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{value} is not an IPv4 address")
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def _cidr(base: int, prefix: int) -> str:
    return f"{_ip(base)}/{prefix}"


def _parse_cidr(field: str, value: object, what: str) -> ipaddress.IPv4Network:
    """Parse a strict IPv4 CIDR, explaining exactly what is wrong with a bad one."""
    if not isinstance(value, str) or not value.strip():
        raise IPAMError(field, f"{what} must be an IPv4 CIDR such as 10.0.1.0/24, got {value!r}")
    text = value.strip()
    if "/" not in text:
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            raise IPAMError(
                field, f"{what} {text!r} is not a valid IPv4 CIDR (e.g. 10.0.1.0/24)"
            ) from None
        raise IPAMError(
            field, f"{what} {text!r} has no prefix length; write it as a CIDR such as {text}/24"
        )
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise IPAMError(
            field, f"{what} {text!r} is not a valid IPv4 CIDR (e.g. 10.0.1.0/24): {exc}"
        ) from None
    if net.version != 4:
        raise IPAMError(field, f"{what} {text!r} is IPv6; only IPv4 subnets are supported")
    assert isinstance(net, ipaddress.IPv4Network)
    if int(ipaddress.IPv4Address(text.split("/", 1)[0])) != int(net.network_address):
        raise IPAMError(field, f"{text} has host bits set; did you mean {net}?")
    return net


def _is_private(net: ipaddress.IPv4Network) -> bool:
    return any(net.subnet_of(p) for p in _PRIVATE)


def _check_id(field: str, value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise IPAMError(field, f"{what} must be a non-empty string, got {value!r}")
    return value


class IPAM:
    """Subnets, VNIs and addresses of every network, as replicated state.

    All methods are deterministic; call them only from replicated commands (never from a
    local read followed by a write), so that every manager makes the same decision.
    """

    def __init__(self, pools: list[str] | None = None, subnet_size: int = DEFAULT_SUBNET_SIZE):
        pool_list = list(DEFAULT_POOLS) if pools is None else pools
        if not isinstance(pool_list, list | tuple) or not pool_list:
            raise IPAMError("DefaultAddrPool", "at least one default address pool is required")
        if isinstance(subnet_size, bool) or not isinstance(subnet_size, int):
            raise IPAMError("SubnetSize", f"subnet size must be an integer, got {subnet_size!r}")
        parsed: list[ipaddress.IPv4Network] = []
        for p in pool_list:
            net = _parse_cidr("DefaultAddrPool", p, "default address pool")
            if not _is_private(net):
                raise IPAMError(
                    "DefaultAddrPool",
                    f"default address pool {net} is not in private address space "
                    "(10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)",
                )
            for other in parsed:
                if net.overlaps(other):
                    raise IPAMError(
                        "DefaultAddrPool", f"default address pools {other} and {net} overlap"
                    )
            parsed.append(net)
        for net in parsed:
            if not net.prefixlen <= subnet_size <= SUBNET_PREFIX_MAX:
                raise IPAMError(
                    "SubnetSize",
                    f"subnet size /{subnet_size} must be between the pool's /{net.prefixlen} "
                    f"({net}) and /{SUBNET_PREFIX_MAX}",
                )

        # Configuration (fixed at init, like Docker's --default-addr-pool).
        self._pools: list[tuple[int, int]] = [(int(n.network_address), n.prefixlen) for n in parsed]
        self._subnet_size: int = subnet_size
        # Derived from the configuration: blocks per pool and the global index of each pool's
        # first block, so a block is addressed by one int across all pools (the cursor).
        self._pool_blocks: list[int] = [1 << (subnet_size - pfx) for _, pfx in self._pools]
        self._pool_first: list[int] = []
        total = 0
        for count in self._pool_blocks:
            self._pool_first.append(total)
            total += count
        self._total_blocks: int = total

        # Replicated state.
        self._subnet_cursor: int = -1  # global block index of the last automatic subnet
        # network id -> {"base", "prefix", "cursor", "ips": owner->offset, "used": offset->owner}
        # ("used" is the inverse of "ips", kept so the allocator's probe is O(1)).
        self._nets: dict[str, dict[str, Any]] = {}
        # Sorted, disjoint (first, last, network id) address intervals of allocated subnets:
        # an overlap check or a skip over a used range is one bisect, not a scan.
        self._intervals: list[tuple[int, int, str]] = []
        self._vni_of: dict[str, int] = {}
        self._vni_owner: dict[int, str] = {}
        self._vni_cursor: int = VNI_AUTO_FIRST - 1  # last automatic VNI

    # ------------------------------------------------------------------ subnets

    def allocate_subnet(self, network_id: str, requested: str | None = None) -> str:
        """Give ``network_id`` a subnet: ``requested`` if given and free, else the next free
        pool block after the last automatic one. Returns the canonical CIDR."""
        _check_id("NetworkID", network_id, "network id")
        if network_id in self._nets:
            raise IPAMError(
                "NetworkID",
                f"network {network_id} already has subnet {self.subnet_of(network_id)}",
                409,
            )
        if requested is None:
            found = self._find_free_block()
            if found is None:
                pools = ", ".join(_cidr(b, p) for b, p in self._pools)
                raise IPAMError(
                    "Subnet",
                    f"default address pools {pools} exhausted: no free /{self._subnet_size} "
                    f"for network {network_id}; remove a network or pass --subnet",
                    409,
                )
            index, base = found
            self._subnet_cursor = index
            prefix = self._subnet_size
        else:
            net = _parse_cidr("Subnet", requested, "subnet")
            if not SUBNET_PREFIX_MIN <= net.prefixlen <= SUBNET_PREFIX_MAX:
                raise IPAMError(
                    "Subnet",
                    f"subnet {net} has prefix /{net.prefixlen}; it must be between "
                    f"/{SUBNET_PREFIX_MIN} and /{SUBNET_PREFIX_MAX}",
                )
            if not _is_private(net):
                raise IPAMError(
                    "Subnet",
                    f"subnet {net} is not in private address space "
                    "(10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)",
                )
            base, prefix = int(net.network_address), net.prefixlen
            hit = self._overlapping(base, base + (1 << (32 - prefix)) - 1)
            if hit is not None:
                other = self._nets[hit[2]]
                raise IPAMError(
                    "Subnet",
                    f"subnet {net} overlaps subnet {_cidr(other['base'], other['prefix'])} "
                    f"of network {hit[2]}",
                    409,
                )
            # The cursor is left alone: swarmkit's serial allocator moves only on its own picks.
        self._nets[network_id] = {
            "base": base,
            "prefix": prefix,
            "cursor": _GATEWAY_OFFSET,  # the first address handed out is gateway + 1
            "ips": {},
            "used": {},
        }
        size = 1 << (32 - prefix)
        bisect.insort(self._intervals, (base, base + size - 1, network_id))
        return _cidr(base, prefix)

    def release_subnet(self, network_id: str) -> None:
        """Free the subnet of ``network_id`` and every address in it. Unknown id: no-op, so a
        retried command is harmless. The VNI is separate (``release_vni``)."""
        net = self._nets.pop(network_id, None)
        if net is None:
            return
        size = 1 << (32 - net["prefix"])
        key = (net["base"], net["base"] + size - 1, network_id)
        i = bisect.bisect_left(self._intervals, key)
        _check(
            i < len(self._intervals) and self._intervals[i] == key, f"interval of {network_id} lost"
        )
        del self._intervals[i]

    def subnet_of(self, network_id: str) -> str | None:
        net = self._nets.get(network_id)
        return None if net is None else _cidr(net["base"], net["prefix"])

    def gateway_of(self, network_id: str) -> str:
        """The network's gateway: its first host address, reserved when the subnet was made."""
        net = self._net("Networks", network_id)
        return _ip(net["base"] + _GATEWAY_OFFSET)

    def _overlapping(self, first: int, last: int) -> tuple[int, int, str] | None:
        """The allocated interval overlapping [first, last], if any. Intervals are disjoint
        and sorted by start, so their ends are sorted too: only the last interval starting
        at or before ``last`` can overlap."""
        i = bisect.bisect_right(self._intervals, (last, _AFTER_ANY_END))
        if i and self._intervals[i - 1][1] >= first:
            return self._intervals[i - 1]
        return None

    def _locate(self, index: int) -> tuple[int, int]:
        """Global block index -> (pool number, block number inside that pool)."""
        pool = bisect.bisect_right(self._pool_first, index) - 1
        return pool, index - self._pool_first[pool]

    def _find_free_block(self) -> tuple[int, int] | None:
        """Serial search for a free block: start after the cursor, wrap once around all pools.

        A used range is skipped in one step (to the first block after its end), so the search
        costs O(allocated intervals), not O(blocks), even over 10/8 with thousands of networks.
        """
        total = self._total_blocks
        block_size = 1 << (32 - self._subnet_size)
        index = (self._subnet_cursor + 1) % total
        advanced = 0
        while advanced < total:
            pool, k = self._locate(index)
            pool_base = self._pools[pool][0]
            first = pool_base + k * block_size
            hit = self._overlapping(first, first + block_size - 1)
            if hit is None:
                return index, first
            # hit ends at or after `first`, so this moves at least one block forward; a range
            # that runs past the pool's end moves to the next pool's first block.
            next_k = min((hit[1] - pool_base) // block_size + 1, self._pool_blocks[pool])
            step = next_k - k
            advanced += step
            index = (index + step) % total
        return None

    # ------------------------------------------------------------------ VNIs

    def allocate_vni(self, network_id: str, requested: int | None = None) -> int:
        """Give ``network_id`` a VXLAN ID: ``requested`` if free, else the next free one after
        the last automatic pick in [4096, 2**24), with wrap."""
        _check_id("NetworkID", network_id, "network id")
        if network_id in self._vni_of:
            raise IPAMError(
                VXLAN_ID_FIELD,
                f"network {network_id} already has VNI {self._vni_of[network_id]}",
                409,
            )
        if requested is None:
            vni = self._find_free_vni()
            if vni is None:
                raise IPAMError(
                    VXLAN_ID_FIELD,
                    f"VXLAN IDs {VNI_AUTO_FIRST}-{VNI_MAX} exhausted: none free for network "
                    f"{network_id}",
                    409,
                )
            self._vni_cursor = vni
        else:
            if isinstance(requested, bool) or not isinstance(requested, int):
                raise IPAMError(VXLAN_ID_FIELD, f"VNI must be an integer, got {requested!r}")
            if not VNI_MIN <= requested <= VNI_MAX:
                raise IPAMError(
                    VXLAN_ID_FIELD, f"VNI {requested} is out of range {VNI_MIN}-{VNI_MAX}"
                )
            owner = self._vni_owner.get(requested)
            if owner is not None:
                raise IPAMError(
                    VXLAN_ID_FIELD, f"VNI {requested} is in use by network {owner}", 409
                )
            vni = requested
        self._vni_of[network_id] = vni
        self._vni_owner[vni] = network_id
        return vni

    def release_vni(self, network_id: str) -> None:
        """Free the VNI of ``network_id``; unknown id: no-op (idempotent)."""
        vni = self._vni_of.pop(network_id, None)
        if vni is not None:
            del self._vni_owner[vni]

    def vni_of(self, network_id: str) -> int | None:
        return self._vni_of.get(network_id)

    def _find_free_vni(self) -> int | None:
        span = VNI_MAX - VNI_AUTO_FIRST + 1
        # Exact count only when exhaustion is possible at all, so the common call stays O(1).
        if len(self._vni_owner) >= span and (
            sum(1 for v in self._vni_owner if v >= VNI_AUTO_FIRST) >= span
        ):
            return None
        vni = self._vni_cursor
        for _ in range(span):
            vni = vni + 1 if vni < VNI_MAX else VNI_AUTO_FIRST
            if vni not in self._vni_owner:
                return vni
        return None  # pragma: no cover - the count above guarantees a free one

    # ------------------------------------------------------------------ addresses

    def allocate_ip(self, network_id: str, owner: str) -> str:
        """An address for ``owner`` (a task attachment, a service VIP, a node LB endpoint) in
        ``network_id``, as ``"A.B.C.D/prefix"`` like Docker's ``Addresses``.

        The same owner asking again gets the address it already has: a Raft command retried
        after an unknown outcome must not leak a second address.
        """
        _check_id("Owner", owner, "address owner")
        net = self._net("Networks", network_id)
        prefix = net["prefix"]
        have = net["ips"].get(owner)
        if have is not None:
            return f"{_ip(net['base'] + have)}/{prefix}"
        offset = self._next_free_offset(net)
        if offset is None:
            raise IPAMError(
                "Networks",
                f"address space exhausted: no free address in {_cidr(net['base'], prefix)} "
                f"(network {network_id})",
                409,
            )
        net["cursor"] = offset
        net["ips"][owner] = offset
        net["used"][offset] = owner
        return f"{_ip(net['base'] + offset)}/{prefix}"

    def release_ip(self, network_id: str, owner: str) -> None:
        """Free ``owner``'s address in ``network_id``; unknown network or owner: no-op."""
        net = self._nets.get(network_id)
        if net is None:
            return
        offset = net["ips"].pop(owner, None)
        if offset is not None:
            del net["used"][offset]

    def ip_of(self, network_id: str, owner: str) -> str | None:
        net = self._nets.get(network_id)
        if net is None:
            return None
        offset = net["ips"].get(owner)
        return None if offset is None else f"{_ip(net['base'] + offset)}/{net['prefix']}"

    def used_ips(self, network_id: str) -> dict[str, str]:
        """owner -> ``"A.B.C.D/prefix"`` for every address in use; {} for an unknown network."""
        net = self._nets.get(network_id)
        if net is None:
            return {}
        base, prefix = net["base"], net["prefix"]
        return {owner: f"{_ip(base + off)}/{prefix}" for owner, off in net["ips"].items()}

    @staticmethod
    def _next_free_offset(net: dict[str, Any]) -> int | None:
        """Serial pick: the first free host offset after the cursor, with wrap.

        In the common case (no wrap yet) the first probe succeeds. After a wrap the probe walks
        over used addresses, but the cursor stays where it stopped, so one pass of the cursor
        over the subnet costs O(subnet) in total, not per call. A full network is refused up
        front by counting, without a scan.
        """
        size = 1 << (32 - net["prefix"])
        last = size - 2  # broadcast is size - 1
        usable = last - _FIRST_HOST_OFFSET + 1
        used = net["used"]
        if len(used) >= usable:
            return None
        offset = net["cursor"]
        for _ in range(usable):
            offset = offset + 1 if offset < last else _FIRST_HOST_OFFSET
            if offset not in used:
                return offset
        return None  # pragma: no cover - the count above guarantees a free one

    def _net(self, field: str, network_id: str) -> dict[str, Any]:
        net = self._nets.get(network_id)
        if net is None:
            raise IPAMError(field, f"network {network_id!r} has no subnet allocated", 404)
        return net

    # ------------------------------------------------------------------ snapshot

    def to_dict(self) -> dict[str, Any]:
        """The whole state as plain builtins (JSON- and msgpack-friendly; string keys).

        Cursors are part of it: a new leader rebuilt from a snapshot must continue the serial
        sequence exactly where the old one stopped, or replicas would diverge.
        ``subnet_cursor`` is a block index across the pools in order (-1: none yet);
        ``ip_cursor`` is a host offset inside the subnet (1, the gateway: none yet).
        """
        return {
            "version": SNAPSHOT_VERSION,
            "pools": [_cidr(b, p) for b, p in self._pools],
            "subnet_size": self._subnet_size,
            "subnet_cursor": self._subnet_cursor,
            "networks": {
                nid: {
                    "subnet": _cidr(net["base"], net["prefix"]),
                    "ip_cursor": net["cursor"],
                    "ips": {owner: _ip(net["base"] + off) for owner, off in net["ips"].items()},
                }
                for nid, net in self._nets.items()
            },
            "vni_cursor": self._vni_cursor,
            "vnis": dict(self._vni_of),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IPAM:
        """Rebuild from ``to_dict`` output. Raises ValueError on an unknown version and
        AssertionError (``check_invariants``) on an inconsistent snapshot."""
        if d.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported IPAM snapshot version {d.get('version')!r}")
        ipam = cls(list(d["pools"]), d["subnet_size"])
        ipam._subnet_cursor = int(d["subnet_cursor"])
        for nid, rec in d["networks"].items():
            net = ipaddress.IPv4Network(rec["subnet"])
            base = int(net.network_address)
            ips = {owner: int(ipaddress.IPv4Address(a)) - base for owner, a in rec["ips"].items()}
            used = {off: owner for owner, off in ips.items()}
            _check(len(used) == len(ips), f"network {nid}: two owners share an address")
            ipam._nets[nid] = {
                "base": base,
                "prefix": net.prefixlen,
                "cursor": int(rec["ip_cursor"]),
                "ips": ips,
                "used": used,
            }
            ipam._intervals.append((base, base + net.num_addresses - 1, nid))
        ipam._intervals.sort()
        ipam._vni_cursor = int(d["vni_cursor"])
        for nid, vni in d["vnis"].items():
            _check(vni not in ipam._vni_owner, f"VNI {vni} assigned twice")
            ipam._vni_of[nid] = int(vni)
            ipam._vni_owner[int(vni)] = nid
        ipam.check_invariants()
        return ipam

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IPAM):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable state

    def __repr__(self) -> str:
        return (
            f"IPAM(pools={[_cidr(b, p) for b, p in self._pools]}, "
            f"subnet_size={self._subnet_size}, networks={len(self._nets)}, "
            f"vnis={len(self._vni_of)})"
        )

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Raise AssertionError if the state is inconsistent: overlapping subnets, a VNI or
        an address owned twice, an address outside its network or on its network, gateway
        or broadcast address, an index out of step with the state, a cursor out of range."""
        _check(-1 <= self._subnet_cursor < self._total_blocks, "subnet cursor out of range")
        _check(
            VNI_AUTO_FIRST - 1 <= self._vni_cursor <= VNI_MAX,
            f"VNI cursor {self._vni_cursor} out of range",
        )
        expected = sorted(
            (n["base"], n["base"] + (1 << (32 - n["prefix"])) - 1, nid)
            for nid, n in self._nets.items()
        )
        _check(self._intervals == expected, "subnet index out of step with networks")
        for (_, last, a), (first, _, b) in zip(expected, expected[1:], strict=False):
            _check(last < first, f"subnets of networks {a} and {b} overlap")
        for nid, net in self._nets.items():
            prefix = net["prefix"]
            _check(SUBNET_PREFIX_MIN <= prefix <= SUBNET_PREFIX_MAX, f"{nid}: bad prefix")
            size = 1 << (32 - prefix)
            _check(net["base"] % size == 0, f"{nid}: subnet has host bits set")
            _check(_GATEWAY_OFFSET <= net["cursor"] <= size - 2, f"{nid}: IP cursor out of range")
            ips, used = net["ips"], net["used"]
            _check(len(ips) == len(used), f"{nid}: duplicate address")
            for owner, off in ips.items():
                _check(used.get(off) == owner, f"{nid}: address index out of step for {owner}")
                _check(
                    _FIRST_HOST_OFFSET <= off <= size - 2,
                    f"{nid}: {owner} holds {_ip(net['base'] + off)}, not a host address "
                    "(network, gateway, broadcast or outside the subnet)",
                )
        _check(len(self._vni_of) == len(self._vni_owner), "duplicate VNI")
        for nid, vni in self._vni_of.items():
            _check(self._vni_owner.get(vni) == nid, f"VNI index out of step for {nid}")
            _check(VNI_MIN <= vni <= VNI_MAX, f"{nid}: VNI {vni} out of range")
