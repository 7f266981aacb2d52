"""An in-memory load-balancer backend with the kernel's semantics, and a packet tracer.

It is the nftables backend minus the kernel: ``sync`` builds the very same transaction
(``plan.nft_full`` / ``plan.nft_changes``; the nft backend renders the first for
libnftables and encodes the second as netlink with ``nft_netlink``) and applies it to an
in-memory table the way nf_tables does (knftables' ``Fake``): on a copy, committed only if
every op succeeds; adding an existing chain is a no-op, flushing or deleting a missing one is ENOENT, deleting a chain
that a map element still points at or that still has rules is EBUSY, a map element added
twice with another target is EEXIST. ``trace`` then walks a packet through the table as
the kernel would (base chain -> ``services`` vmap -> service chain -> numgen map -> DNAT),
so tests assert where traffic lands ("VIP:80 reaches 10.0.1.5:80"), not only rule text.
"""

from __future__ import annotations

import copy
import errno
from dataclasses import dataclass, field

from ..kernel.errors import KernelError
from .backend import SyncingBackend
from .plan import (
    ALL_PORTS,
    AddChain,
    AddElem,
    AddReject,
    AddServiceRule,
    Backend,
    DelChain,
    DelElem,
    DelReject,
    FlushChain,
    LBChanges,
    LBService,
    LBState,
    NftOp,
    ResetTable,
    ServiceKey,
    nft_changes,
    nft_full,
    slots,
)


@dataclass(frozen=True)
class _Rule:
    """A service chain's rule as the kernel holds it: the protocol match and the selection
    map (``total == 0``: reject)."""

    proto: str
    total: int
    targets: tuple[tuple[int, int, str, int], ...]  # (lo, hi, ip, port)


@dataclass
class _Table:
    chains: dict[str, list[_Rule]] = field(default_factory=dict)
    services: dict[ServiceKey, str] = field(default_factory=dict)  # the vmap: key -> goto chain
    rejects: set[ServiceKey] = field(default_factory=set)  # answered before NAT


@dataclass(frozen=True)
class Trace:
    verdict: str  # "dnat", "reject" or "accept" (no service matched: the packet goes on)
    backends: frozenset[str] = frozenset()  # "ip:port" the DNAT can choose


class FakeBackend(SyncingBackend):
    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.table: _Table | None = None
        self.transactions: list[list[NftOp]] = []  # every committed transaction, in order
        self.fail_next: KernelError | None = None  # inject a failure into the next commit

    # ---- the backend interface ---------------------------------------------------

    def _apply_full(self, state: LBState) -> None:
        self.run(nft_full(state))

    def _apply_changes(self, changes: LBChanges) -> None:
        self.run(nft_changes(changes))

    def dump(self) -> LBState:
        if self.table is None:
            return LBState()
        out = []
        for key, chain in self.table.services.items():
            rules = self.table.chains[chain]
            assert len(rules) == 1, f"service chain {chain} holds {len(rules)} rules"
            backends = tuple(
                Backend(ip, port, hi - lo + 1) for lo, hi, ip, port in rules[0].targets
            )
            out.append(LBService(key[0], key[1], key[2], backends))
        return LBState(frozenset(out))

    def close(self) -> None:
        pass

    @property
    def last_transaction(self) -> list[NftOp]:
        return self.transactions[-1] if self.transactions else []

    # ---- the kernel's semantics ----------------------------------------------------

    def run(self, ops: list[NftOp]) -> None:
        """Apply one transaction atomically: all ops or none."""
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        table = copy.deepcopy(self.table)
        for op in ops:
            table = _apply(table, op)
        self.table = table
        self.transactions.append(list(ops))

    def trace(self, src: str, dst: str, proto: str, port: int) -> frozenset[str]:
        """The backends ("ip:port") a packet from ``src`` to ``dst:port/proto`` can be DNATed
        to; empty if it is rejected or matches no service. ``src`` does not change the
        choice today (random selection, no affinity); it is in the signature so tests do not
        change when source affinity arrives."""
        return self.trace_verdict(src, dst, proto, port).backends

    def trace_verdict(self, src: str, dst: str, proto: str, port: int) -> Trace:
        del src
        if self.table is None:
            return Trace("accept")
        for key in ((dst, proto, port), (dst, proto, ALL_PORTS)):
            if key in self.table.rejects:  # filter chains at -300 come first
                return Trace("reject")
        # base chains: ip daddr . meta l4proto . th dport vmap @services, then
        # ip daddr . meta l4proto vmap @vips (all-ports services, port 0 in the plan)
        chain = self.table.services.get((dst, proto, port))
        if chain is None:
            chain = self.table.services.get((dst, proto, ALL_PORTS))
        if chain is None:
            return Trace("accept")
        for rule in self.table.chains[chain]:  # goto: the service chain decides
            if rule.proto != proto:
                continue
            if rule.total == 0:
                return Trace("accept")  # an empty service's chain only counts
            # numgen random mod total: every value 0..total-1 must land in exactly one slot
            hits = [0] * rule.total
            for lo, hi, _ip, _port in rule.targets:
                for v in range(lo, hi + 1):
                    hits[v] += 1
            assert all(h == 1 for h in hits), f"{chain}: numgen values map {hits}"
            return Trace(
                "dnat",
                frozenset(f"{ip}:{p or port}" for _lo, _hi, ip, p in rule.targets),
            )
        return Trace("accept")  # end of a goto'd chain: the base chain's policy (accept)


def _apply(table: _Table | None, op: NftOp) -> _Table:
    if isinstance(op, ResetTable):
        return _Table()
    if table is None:
        raise KernelError(errno.ENOENT, op, "no table")
    match op:
        case AddChain(name):
            table.chains.setdefault(name, [])
        case FlushChain(name):
            _chain(table, op, name).clear()
        case DelChain(name):
            if _chain(table, op, name):
                raise KernelError(errno.EBUSY, op, "chain has rules")
            if name in table.services.values():
                raise KernelError(errno.EBUSY, op, "chain is referenced by a map element")
            del table.chains[name]
        case AddServiceRule(name, service):
            total, sl = slots(service)
            targets = tuple((s.lo, s.hi, s.backend.ip, s.backend.port) for s in sl)
            _chain(table, op, name).append(_Rule(service.proto, total, targets))
        case AddElem(key, chain):
            _chain(table, op, chain)
            if table.services.get(key, chain) != chain:
                raise KernelError(errno.EEXIST, op, "element exists with another target")
            table.services[key] = chain
        case DelElem(key):
            if key not in table.services:
                raise KernelError(errno.ENOENT, op, "no such element")
            del table.services[key]
        case AddReject(key):
            table.rejects.add(key)  # a set: adding twice is not an error (nft add)
        case DelReject(key):
            if key not in table.rejects:
                raise KernelError(errno.ENOENT, op, "no such element")
            table.rejects.discard(key)
        case _:
            raise AssertionError(f"unknown op {op!r}")
    return table


def _chain(table: _Table, op: NftOp, name: str) -> list[_Rule]:
    try:
        return table.chains[name]
    except KeyError:
        raise KernelError(errno.ENOENT, op, f"no chain {name}") from None
