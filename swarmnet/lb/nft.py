"""The nftables load-balancer backend. KERNEL BOUNDARY: every nft call of swarmnet's load
balancer is in this module and its netlink encoder ``nft_netlink`` (DESIGN principle 2);
nothing else in ``swarmnet.lb`` talks to the kernel's nf_tables.

What it programs, in table ``inet swarmnet`` that it owns (nothing else is touched, and no
one else should touch it; kube-proxy's rule for its own table)::

    map services { type ipv4_addr . inet_proto . inet_service : verdict }
    chain prerouting { type nat hook prerouting priority dstnat; ... vmap @services }
    chain output     { type nat hook output priority -100;     ... vmap @services }
    chain svc-<16 base32 of sha256(vip/proto/port)> {
        meta l4proto tcp dnat ip to numgen random mod 3 map { 0 : 10.0.1.5 . 80, 1-2 : ... }
    }

Per packet: one hash lookup in the verdict map, one numgen, one lookup in a small map: O(1)
whatever the number of services (kube-proxy's nftables design). A service without a live
backend is in the ``rejects`` set, which filter chains at priority -300 answer with a TCP RST
or ICMP port unreachable (a clear refusal, not a black hole; TCP RST because ICMP errors are
rate limited, so a burst of connects would time out).

Why one DNAT map per service chain and NO per-backend chains (kube-proxy has ``endpoint-*``
chains): with a chain per backend (11,000 chains) the full load cost 0.47-0.64 s against
0.18-0.20 s with 1,000 chains, and every libnftables command refetches all chains of the
table. kube-proxy needs endpoint chains for per-endpoint masquerade and session affinity,
which we do not have.

Updates: a full sync renders ``plan.nft_full`` (add+delete+add of the table and everything
in it) and commits it as ONE libnftables transaction (one ``nft_run_cmd_from_buffer`` on a
persistent context, ctypes, ``libnftables.so.1``), so a recovery never shows a
half-programmed table. An incremental ``sync`` takes ``plan.nft_changes`` (only the changed
service chains and map elements: for one backend change, ``flush chain svc-X`` + the new
``numgen`` rule with its anonymous map) and sends it as ONE nfnetlink batch that we encode
ourselves (``nft_netlink``): the same kernel transaction, atomic, byte for byte what nft
would send, but without libnftables' cache.

Why (issue 6; 1,000 services x 10 backends, nft 1.0.6, same-run figures in
bench/lb_nft.py): libnftables refetches its cache before every command that adds rules or
elements, because our own previous commit bumped the ruleset generation. For ``add rule`` it
fetches the table's chains, sets, objects and flowtables; for ``add element`` too (measured
with ``nft --debug=mnl``: GETGEN, GETTABLE, GETCHAIN, GETSET, GETOBJ before the batch), and
the sets include the 1,000 anonymous maps. So one change cost 6-8 ms (28-32x faster than a
full load, goal 50x) whatever its size. Options measured:

- set-element updates on per-service named maps (fixed slots) through libnftables: an
  ``add element`` alone still cost >= 2.9 ms (same cache), a change of the weights' total
  would still need a rule, and fixed slots make weights approximate. Rejected.
- our own netlink batch (chosen): ~0.5 ms of CPU per change at 1,000 services (0.08 ms at
  10: the rest is the kernel's own per-table work, e.g. finding ``__map%d`` among 1,000
  sets), no rule handles needed (DELRULE by chain = flush), nothing to keep in sync with
  libnftables, and the table still reads back through libnftables for ``dump`` and a full
  resync. ``plan.diff`` was also made ~6x cheaper (one compare string per service; it was
  ~2 ms of the old 7 ms change), as it runs on every sync.

  bench/lb_nft.py, two runs on the shared 2-core machine: full load 0.93x / 1.03x
  ``nft -f``; one change 0.87 / 0.94 ms = 301x / 248x faster than our full load; the first
  change after a full load (the kernel is still busy with the replaced table) 2.9 / 3.0 ms
  = 91x / 77x; the same change through libnftables 5.5 / 4.8 ms = 48x.

Without libnftables the backend falls back to ``nft -f -`` for full loads and dumps;
``NftConfig(netlink_changes=False)`` sends changes that way too (for comparing).
"""

from __future__ import annotations

import ctypes
import errno
import json
import subprocess
from dataclasses import dataclass

from ..kernel import nsutil
from ..kernel.errors import KernelError
from .backend import SyncingBackend
from .nft_netlink import NftNetlink, netns_inode
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
    is_chain_name,
    nft_changes,
    nft_full,
    slots,
)

NFT_CTX_OUTPUT_JSON = 1 << 4  # nftables/libnftables.h enum nft_ctx_output_flags
NFT_CTX_OUTPUT_NUMERIC_PROTO = 1 << 7
REJECT_PRIORITY = -300  # before conntrack (-200) and DNAT (-100): refused before any state
OUTPUT_PRIORITY = -100  # "dstnat" is only a name in prerouting; in output it is spelled -100


@dataclass(frozen=True)
class NftConfig:
    table: str = "swarmnet"  # the owned table (family inet); tests and benches may use others
    map_name: str = "services"
    vip_map_name: str = "vips"  # all-ports services (port 0): ip daddr . meta l4proto
    # Host-namespace ingress table: masquerade DNATed connections leaving through this
    # interface (the routing mesh's SNAT to the node's ingress address, pain point 7).
    masquerade_oif: str | None = None
    # With masquerade_oif: masquerade every packet leaving it whose source is NOT in this
    # CIDR (the ingress sandbox: what the host forwarded in), instead of "ct status dnat"
    # (the DNAT happened in another namespace's conntrack).
    masquerade_unless_from: str | None = None
    use_libnftables: bool = True  # False: always `nft -f -` (for comparing, and the fallback)
    # Incremental changes as our own nf_tables netlink batch (nft_netlink); False: through
    # libnftables / `nft -f` like full loads (for comparing; the bench measures both).
    netlink_changes: bool = True


class _Libnftables:
    """One persistent libnftables context with buffered output and errors."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self.ctx:
            raise OSError(errno.ENOMEM, "nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, text: str, json_output: bool = False) -> tuple[int, str, str]:
        flags = self.lib.nft_ctx_output_get_flags(self.ctx)
        if json_output:
            self.lib.nft_ctx_output_set_flags(self.ctx, flags | NFT_CTX_OUTPUT_JSON)
        try:
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode())
        finally:
            self.lib.nft_ctx_output_set_flags(self.ctx, flags)
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode()
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode()
        return rc, out, err

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


class NftBackend(SyncingBackend):
    name = "nft"

    def __init__(self, netns: str | None = None, config: NftConfig | None = None) -> None:
        super().__init__()
        self.netns = netns
        self.cfg = config or NftConfig()
        self._lib: _Libnftables | None = None
        self._lib_ino: int | None = None
        if self.cfg.use_libnftables:
            self._open_lib()
        self._nl = NftNetlink(netns) if self.cfg.netlink_changes else None

    def _open_lib(self) -> None:
        """The libnftables context opens its netlink socket at creation, in the calling
        thread's namespace, and keeps it: create it inside the target namespace, and again if
        that namespace was replaced under the same name (a new inode), or every command would
        go to the dead one."""
        if self._lib is not None:
            self._lib.close()
            self._lib = None
        try:
            self._lib_ino = netns_inode(self.netns)
            if self.netns is None:
                self._lib = _Libnftables()
            else:
                with nsutil.in_netns(self.netns):
                    self._lib = _Libnftables()
        except OSError:
            self._lib = None  # no libnftables.so.1 (or no namespace yet): `nft -f -` below

    # ---- the backend interface ---------------------------------------------------

    def _apply_full(self, state: LBState) -> None:
        self.run(render(nft_full(state), self.cfg), nft_full)

    def _apply_changes(self, changes: LBChanges) -> None:
        ops = nft_changes(changes)
        if self._nl is not None:
            self._nl.commit(ops, self.cfg.table, self.cfg.map_name, self.cfg.vip_map_name)
        else:
            self.run(render(ops, self.cfg), nft_changes)

    def dump(self) -> LBState:
        rc, out, err = self._exec(f"list table inet {self.cfg.table}", json_output=True)
        if rc != 0:
            if "No such file or directory" in err:
                return LBState()
            raise KernelError(errno.EIO, "nft list table", err.strip())
        return parse_dump(json.loads(out), self.cfg)

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
        if self._lib is not None:
            self._lib.close()
            self._lib = None

    def delete_table(self) -> None:
        """Remove the owned table entirely (tests, `swarmnet leave`)."""
        t = f"inet {self.cfg.table}"
        self.run(f"add table {t}\ndelete table {t}\n", "delete table")
        self._applied = None

    # ---- the one place nft runs ----------------------------------------------------

    def run(self, text: str, what: object) -> None:
        """Commit ``text`` as one transaction; raise KernelError with nft's message."""
        rc, _out, err = self._exec(text)
        if rc != 0:
            code = errno.EIO
            for name in ("ENOENT", "EEXIST", "EBUSY", "EINVAL", "EPERM", "EOPNOTSUPP"):
                if _ERRNO_TEXT[name] in err:
                    code = getattr(errno, name)
                    break
            raise KernelError(code, getattr(what, "__name__", what), err.strip()[:2000])

    def _exec(self, text: str, json_output: bool = False) -> tuple[int, str, str]:
        if self._lib is not None and self.netns is not None:
            try:
                if netns_inode(self.netns) != self._lib_ino:
                    self._open_lib()
            except OSError:
                pass  # no such namespace: the command below reports it
        if self._lib is not None:
            if self.netns is None:
                return self._lib.run(text, json_output)
            # The context's netlink socket is opened per command in the calling thread's
            # namespace: run the whole command inside the target namespace.
            with nsutil.in_netns(self.netns):
                return self._lib.run(text, json_output)
        argv = ["nft"] + (["-j"] if json_output else []) + ["-f", "-"]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        p = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout, p.stderr


_ERRNO_TEXT = {
    "ENOENT": "No such file or directory",
    "EEXIST": "File exists",
    "EBUSY": "Device or resource busy",
    "EINVAL": "Invalid argument",
    "EPERM": "Operation not permitted",
    "EOPNOTSUPP": "Operation not supported",
}


# ---- rendering (pure) -------------------------------------------------------------------


def render(ops: list[NftOp], cfg: NftConfig) -> str:
    """nft syntax for one transaction (one command per line, all committed together)."""
    t = f"inet {cfg.table}"
    m = cfg.map_name
    lines: list[str] = []
    for op in ops:
        match op:
            case ResetTable():
                lines += [
                    f"add table {t}",
                    f"delete table {t}",
                    f"add table {t}",
                    f"add map {t} {m} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}",
                    f"add chain {t} prerouting "
                    "{ type nat hook prerouting priority dstnat; policy accept; }",
                    f"add rule {t} prerouting ip daddr . meta l4proto . th dport vmap @{m}",
                    f"add chain {t} output "
                    f"{{ type nat hook output priority {OUTPUT_PRIORITY}; policy accept; }}",
                    f"add rule {t} output ip daddr . meta l4proto . th dport vmap @{m}",
                    f"add set {t} rejects {{ type ipv4_addr . inet_proto . inet_service; }}",
                    f"add map {t} {cfg.vip_map_name} {{ type ipv4_addr . inet_proto : verdict; }}",
                    f"add rule {t} prerouting ip daddr . meta l4proto vmap @{cfg.vip_map_name}",
                    f"add rule {t} output ip daddr . meta l4proto vmap @{cfg.vip_map_name}",
                    f"add set {t} rejects-vip {{ type ipv4_addr . inet_proto; }}",
                ]
                if cfg.masquerade_oif:
                    lines += [
                        f"add chain {t} postrouting "
                        "{ type nat hook postrouting priority srcnat; policy accept; }",
                        f'add rule {t} postrouting oifname "{cfg.masquerade_oif}" '
                        + (
                            f"ip saddr != {cfg.masquerade_unless_from} masquerade"
                            if cfg.masquerade_unless_from
                            else "ct status dnat masquerade"
                        ),
                    ]
                for hook in ("prerouting", "output"):
                    lines += [
                        f"add chain {t} reject-{hook} "
                        f"{{ type filter hook {hook} priority {REJECT_PRIORITY}; policy accept; }}",
                        f"add rule {t} reject-{hook} ip daddr . meta l4proto . th dport @rejects "
                        "meta l4proto tcp reject with tcp reset",
                        f"add rule {t} reject-{hook} ip daddr . meta l4proto . th dport @rejects "
                        "reject",
                        f"add rule {t} reject-{hook} ip daddr . meta l4proto @rejects-vip "
                        "meta l4proto tcp reject with tcp reset",
                        f"add rule {t} reject-{hook} ip daddr . meta l4proto @rejects-vip reject",
                    ]
            case AddChain(name):
                lines.append(f"add chain {t} {name}")
            case FlushChain(name):
                lines.append(f"flush chain {t} {name}")
            case DelChain(name):
                lines.append(f"delete chain {t} {name}")
            case AddServiceRule(name, service):
                lines.append(f"add rule {t} {name} {service_rule(service)}")
            case AddElem(key, chain):
                lines.append(f"add element {t} {_map(key, cfg)} {{ {_key(key)} : goto {chain} }}")
            case DelElem(key):
                lines.append(f"delete element {t} {_map(key, cfg)} {{ {_key(key)} }}")
            case AddReject(key):
                lines.append(f"add element {t} {_rejects(key)} {{ {_key(key)} }}")
            case DelReject(key):
                lines.append(f"delete element {t} {_rejects(key)} {{ {_key(key)} }}")
            case _:
                raise AssertionError(f"unknown op {op!r}")
    return "\n".join(lines) + "\n"


def service_rule(service: LBService) -> str:
    total, sl = slots(service)
    if total == 0:
        return "counter"  # never reached: the ``rejects`` set answers first (AddReject)

    def target(b: Backend) -> str:
        return b.ip if service.port == ALL_PORTS else f"{b.ip} . {b.port}"

    entries = ", ".join(
        f"{s.lo if s.lo == s.hi else f'{s.lo}-{s.hi}'} : {target(s.backend)}" for s in sl
    )
    return f"meta l4proto {service.proto} dnat ip to numgen random mod {total} map {{ {entries} }}"


def _key(key: ServiceKey) -> str:
    vip, proto, port = key
    return f"{vip} . {proto}" if port == ALL_PORTS else f"{vip} . {proto} . {port}"


def _map(key: ServiceKey, cfg: NftConfig) -> str:
    return cfg.vip_map_name if key[2] == ALL_PORTS else cfg.map_name


def _rejects(key: ServiceKey) -> str:
    return "rejects-vip" if key[2] == ALL_PORTS else "rejects"


# ---- reading back (pure) ------------------------------------------------------------------

_PROTO_NUM = {6: "tcp", 17: "udp"}


def parse_dump(doc: dict, cfg: NftConfig) -> LBState:
    """The ``LBState`` an ``nft -j list table inet <table>`` holds (drained backends are not
    in the kernel, so they are not in the result; compare with ``state.without_drained()``).
    Objects that are not ours (a chain not named ``svc-...``) are ignored."""
    items = doc.get("nftables", [])
    rules: dict[str, list[dict]] = {}
    elems: list = []
    for item in items:
        if "rule" in item and is_chain_name(item["rule"]["chain"]):
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
        elif "map" in item and item["map"].get("name") in (cfg.map_name, cfg.vip_map_name):
            elems += item["map"].get("elem", [])
    out = []
    for elem in elems:
        key_expr, verdict = elem
        vip, proto, *rest = key_expr["concat"]
        port = rest[0] if rest else ALL_PORTS
        proto = _PROTO_NUM.get(proto, proto) if isinstance(proto, int) else proto
        chain = verdict["goto"]["target"]
        backends = _parse_rule(rules.get(chain, []))
        out.append(LBService(vip, proto, int(port), backends))
    return LBState(frozenset(out))


def _parse_rule(rules: list[dict]) -> tuple[Backend, ...]:
    for rule in rules:
        for expr in rule["expr"]:
            if "reject" in expr:
                return ()
            if "dnat" in expr:
                backends = []
                for sel, target in expr["dnat"]["addr"]["map"]["data"]["set"]:
                    lo, hi = sel["range"] if isinstance(sel, dict) else (sel, sel)
                    ip, port = target["concat"] if isinstance(target, dict) else (target, 0)
                    backends.append(Backend(ip, int(port), hi - lo + 1))
                return tuple(backends)
    return ()
