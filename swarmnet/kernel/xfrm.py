"""The XFRM sub-boundary: ESP security associations, policies and the VXLAN mark rules.

Why a separate module: pyroute2 0.9.7 has no XFRM netlink messages, so the real
implementation drives the ``ip xfrm`` command (``ip -batch -``: one process for a whole
reconcile pass) and, for the per-VNI marks, ``nft -f -`` (one atomic transaction). iproute2
6.1 prints nothing for ``ip -j xfrm ...``, so snapshots parse the text output.

The vocabulary (states, policies, marks, ops, snapshots) is pure data in
``swarmnet.kernel.xfrm_types`` (re-exported here), so that planners (``swarmnet.ipsec.plan``)
import it without this module's ``subprocess`` and stay in the pure import contract.

Identity, as the kernel sees it:
- a state is ``(src, dst, spi)`` (the kernel's key is daddr + spi + proto esp);
- a policy is ``(src, dst, dir, dport, mark, mask)``: its selector, direction and mark.
  ``XfrmPolicyAdd`` has *update* semantics (``ip xfrm policy update``: create or replace),
  because switching the outbound key is a replace of the template's SPI, done in one step.

The marks: XFRM selectors cannot see the VNI, so an nftables table ``swarmnet_esp`` marks
VXLAN packets of encrypted VNIs (``@th,96,24`` is the VNI: UDP header 8 bytes + VXLAN flags 4
bytes) with a bit, and the policies select on that bit. Output uses a ``type route`` chain,
so a mark change re-runs the route and XFRM lookup (ip_route_me_harder) after the VXLAN
driver has already routed the packet; prerouting marks cleartext arrivals and, in transport
mode, the decrypted packet re-injected by XFRM, so the inbound policy (which requires ESP)
drops cleartext VXLAN of an encrypted VNI while other VNIs between the same hosts pass.
"""

from __future__ import annotations

import errno
import os
import re
import uuid

from swarmnet.kernel.errors import KernelError
from swarmnet.kernel.xfrm_types import (  # re-exported: the vocabulary
    AEAD_RFC4106,
    NFT_TABLE,
    EspMarks,
    EspMarkSet,
    StateInfo,
    Xfrm,
    XfrmOp,
    XfrmPolicy,
    XfrmPolicyAdd,
    XfrmPolicyDel,
    XfrmSnapshot,
    XfrmState,
    XfrmStateAdd,
    XfrmStateDel,
    key_digest,
)

__all__ = [
    "AEAD_RFC4106",
    "NFT_TABLE",
    "EspMarks",
    "EspMarkSet",
    "StateInfo",
    "Xfrm",
    "XfrmOp",
    "XfrmPolicy",
    "XfrmPolicyAdd",
    "XfrmPolicyDel",
    "XfrmSnapshot",
    "XfrmState",
    "XfrmStateAdd",
    "XfrmStateDel",
    "key_digest",
    "FakeXfrm",
    "IpXfrm",
    "probe_esp",
    "parse_states",
    "parse_policies",
    "parse_marks",
    "parse_xfrm_stat",
    "nft_script",
    "policy_cmd",
    "state_cmd",
]


# ---- the fake ---------------------------------------------------------------------------


class FakeXfrm:
    """In-memory XFRM with the real one's semantics: EEXIST for a duplicate state, ESRCH
    for deleting a missing state or policy, policy add replaces. Counters are set by tests
    (``count``), since no packet flows here."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str, int], XfrmState] = {}
        self._counters: dict[tuple[str, str, int], dict[str, int]] = {}
        self._policies: dict[tuple, XfrmPolicy] = {}
        self._marks: EspMarks | None = None
        self.stats: dict[str, int] = {}
        self.applied: list[XfrmOp] = []

    def count(self, src: str, dst: str, spi: int, **counters: int) -> None:
        if (src, dst, spi) not in self._states:
            raise KernelError(errno.ESRCH, (src, dst, spi), "no such state")
        self._counters[(src, dst, spi)].update(counters)

    def snapshot(self) -> XfrmSnapshot:
        states = {
            i: StateInfo(
                s.src,
                s.dst,
                s.spi,
                s.reqid,
                s.aead,
                s.icv_bits,
                s.esn,
                s.replay_window,
                s.key_digest,
                **self._counters[i],
            )  # fmt: skip
            for i, s in self._states.items()
        }
        return XfrmSnapshot(states, dict(self._policies), self._marks, dict(self.stats))

    def apply(self, ops: list[XfrmOp]) -> None:
        for op in ops:
            if isinstance(op, XfrmStateAdd):
                _validate_state(op.state, op)
                if op.state.ident in self._states:
                    raise KernelError(errno.EEXIST, op, "state exists")
                self._states[op.state.ident] = op.state
                self._counters[op.state.ident] = {}
            elif isinstance(op, XfrmStateDel):
                if self._states.pop((op.src, op.dst, op.spi), None) is None:
                    raise KernelError(errno.ESRCH, op, "no such state")
                del self._counters[(op.src, op.dst, op.spi)]
            elif isinstance(op, XfrmPolicyAdd):
                self._policies[op.policy.ident] = op.policy
            elif isinstance(op, XfrmPolicyDel):
                if self._policies.pop(op.policy.ident, None) is None:
                    raise KernelError(errno.ENOENT, op, "no such policy")
            elif isinstance(op, EspMarkSet):
                self._marks = op.marks if op.marks.vnis else None
            else:  # pragma: no cover - the union is closed
                raise TypeError(op)
            self.applied.append(op)


def _validate_state(s: XfrmState, op: object) -> None:
    # What the kernel refuses, checked the same way in both implementations.
    if s.spi < 256 or s.spi >= 1 << 32:
        raise KernelError(errno.EINVAL, op, "SPI must be in [256, 2^32)")
    if len(s.key) not in (20, 28, 36):
        raise KernelError(errno.EINVAL, op, "rfc4106 key must be 16/24/32 bytes + 4 salt")
    if s.icv_bits not in (64, 96, 128):
        raise KernelError(errno.EINVAL, op, "ICV must be 64, 96 or 128 bits")
    if s.esn and s.replay_window == 0:
        raise KernelError(errno.EINVAL, op, "ESN needs a replay window")


# ---- the real one: ip xfrm / nft ------------------------------------------------------


def state_cmd(s: XfrmState) -> str:
    esn = f" flag esn replay-window {s.replay_window}" if s.esn else (
        f" replay-window {s.replay_window}"
    )  # fmt: skip
    return (
        f"xfrm state add src {s.src} dst {s.dst} proto esp spi {s.spi:#010x} reqid {s.reqid} "
        f"mode transport{esn} aead {s.aead} 0x{s.key.hex()} {s.icv_bits}"
    )


def policy_cmd(p: XfrmPolicy, verb: str) -> str:
    sel = (
        f"src {p.src}/32 dst {p.dst}/32 proto udp dport {p.dport} dir {p.dir} "
        f"mark {p.mark:#x} mask {p.mask:#x}"
    )
    if verb == "delete":
        return f"xfrm policy delete {sel}"
    spi = f" spi {p.spi:#010x}" if p.spi is not None else ""
    return (
        f"xfrm policy {verb} {sel} tmpl src {p.src} dst {p.dst} proto esp{spi} "
        f"reqid {p.reqid} mode transport"
    )


def nft_script(m: EspMarks) -> str:
    """Atomic replace: create-if-missing, delete, then the new table (one nft transaction)."""
    lines = [f"table ip {NFT_TABLE} {{}}", f"delete table ip {NFT_TABLE}"]
    if m.vnis:
        rules = "\n".join(
            f"    udp dport {m.port} @th,96,24 {v} meta mark set meta mark | {m.mark:#010x}"
            for v in sorted(m.vnis)
        )
        lines.append(
            f"table ip {NFT_TABLE} {{\n"
            "  chain output {\n    type route hook output priority mangle; policy accept;\n"
            f"{rules}\n  }}\n"
            "  chain prerouting {\n    type filter hook prerouting priority mangle; "
            f"policy accept;\n{rules}\n  }}\n}}"
        )
    return "\n".join(lines) + "\n"


_ERRNO_BY_TEXT = (
    ("File exists", errno.EEXIST),
    ("No such process", errno.ESRCH),
    ("No such file", errno.ENOENT),
    ("Invalid argument", errno.EINVAL),
    ("Operation not permitted", errno.EPERM),
    ("Protocol not supported", errno.EPROTONOSUPPORT),
    ("algorithm not found", errno.ENOENT),
    ("unable to initialize cryptographic", errno.EINVAL),
)


def _errno_of(text: str) -> int:
    for needle, code in _ERRNO_BY_TEXT:
        if needle.lower() in text.lower():
            return code
    return errno.EIO


class IpXfrm:
    """The real XFRM boundary for one namespace (``netns`` None: the current one)."""

    def __init__(self, netns: str | None = None, timeout_s: float = 30.0) -> None:
        self.netns = netns
        self.timeout_s = timeout_s

    def _run(self, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
        import subprocess  # here, not at module level: see the module docstring

        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        r = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=self.timeout_s
        )
        return r.returncode, r.stdout, r.stderr

    # -- apply
    def apply(self, ops: list[XfrmOp]) -> None:
        batch: list[tuple[str, XfrmOp]] = []
        for op in ops:
            if isinstance(op, EspMarkSet):
                self._flush(batch)
                batch = []
                rc, _, err = self._run(["nft", "-f", "-"], nft_script(op.marks))
                if rc != 0:
                    raise KernelError(_errno_of(err), op, err.strip())
                continue
            if isinstance(op, XfrmStateAdd):
                _validate_state(op.state, op)
                batch.append((state_cmd(op.state), op))
            elif isinstance(op, XfrmStateDel):
                batch.append(
                    (f"xfrm state delete src {op.src} dst {op.dst} proto esp spi {op.spi:#x}", op)
                )
            elif isinstance(op, XfrmPolicyAdd):
                batch.append((policy_cmd(op.policy, "update"), op))
            elif isinstance(op, XfrmPolicyDel):
                batch.append((policy_cmd(op.policy, "delete"), op))
            else:  # pragma: no cover
                raise TypeError(op)
        self._flush(batch)

    def _flush(self, batch: list[tuple[str, XfrmOp]]) -> None:
        if not batch:
            return
        # `ip -batch` stops at the first failing line and names it ("Command failed -:N");
        # `policy update` does not exist for a missing policy on old kernels, but 6.1 accepts it.
        rc, _, err = self._run(["ip", "-batch", "-"], "".join(c + "\n" for c, _ in batch))
        if rc == 0:
            return
        m = re.search(r"Command failed -:(\d+)", err)
        op = batch[int(m.group(1)) - 1][1] if m else batch[0][1]
        raise KernelError(_errno_of(err), op, err.strip().splitlines()[0] if err else "")

    # -- snapshot
    def snapshot(self) -> XfrmSnapshot:
        rc, out, err = self._run(["ip", "-s", "xfrm", "state"])
        if rc != 0:
            raise KernelError(_errno_of(err), "xfrm state list", err.strip())
        states = {s.ident: s for s in parse_states(out)}
        rc, out, err = self._run(["ip", "xfrm", "policy"])
        if rc != 0:
            raise KernelError(_errno_of(err), "xfrm policy list", err.strip())
        policies = {p.ident: p for p in parse_policies(out)}
        rc, out, _ = self._run(["nft", "list", "table", "ip", NFT_TABLE])
        marks = parse_marks(out) if rc == 0 else None
        rc, out, _ = self._run(["cat", "/proc/net/xfrm_stat"])
        stats = parse_xfrm_stat(out) if rc == 0 else {}
        return XfrmSnapshot(states, policies, marks, stats)


# ---- parsers (text of iproute2 6.1 and nft 1.0.6; tested against captured output) ------


def _split_blocks(text: str) -> list[str]:
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("src "):
            blocks.append([line])
        elif blocks and line.strip():
            blocks[-1].append(line)
    return ["\n".join(b) for b in blocks]


def _int(m: re.Match | None, group: int = 1, base: int = 10) -> int:
    return int(m.group(group), base) if m else 0


def parse_states(text: str) -> list[StateInfo]:
    out = []
    for b in _split_blocks(text):
        head = re.match(r"src (\S+) dst (\S+)", b)
        spi = re.search(r"proto esp spi (0x[0-9a-f]+)", b)
        if not head or not spi:
            continue  # not ESP (we never create anything else)
        aead = re.search(r"aead (\S+) 0x([0-9a-f]+)(?: \(\d+ bits\))? (\d+)", b)
        esn = re.search(r"seq-hi (0x[0-9a-f]+), seq (0x[0-9a-f]+), oseq-hi (0x[0-9a-f]+), "
                        r"oseq (0x[0-9a-f]+)", b)  # fmt: skip
        plain = re.search(r"anti-replay context: seq (0x[0-9a-f]+), oseq (0x[0-9a-f]+)", b)
        if esn:
            seq = (int(esn.group(1), 16) << 32) | int(esn.group(2), 16)
            oseq = (int(esn.group(3), 16) << 32) | int(esn.group(4), 16)
            window = _int(re.search(r"replay_window (\d+)", b))
        else:
            seq, oseq = (_int(plain, 1, 16), _int(plain, 2, 16)) if plain else (0, 0)
            window = _int(re.search(r"replay-window (\d+)", b))
        cur = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", b)
        stats = re.search(r"stats:\s*\n\s*replay-window \d+ replay (\d+) failed (\d+)", b)
        out.append(
            StateInfo(
                src=head.group(1),
                dst=head.group(2),
                spi=int(spi.group(1), 16),
                reqid=_int(re.search(r"reqid (\d+)", b)),
                aead=aead.group(1) if aead else "",
                icv_bits=int(aead.group(3)) if aead else 0,
                esn=bool(re.search(r"\bflag [^\n]*\besn\b", b)),
                replay_window=window,
                key_digest=key_digest(bytes.fromhex(aead.group(2))) if aead else "",
                packets=_int(cur, 2),
                bytes=_int(cur, 1),
                oseq=oseq,
                seq=seq,
                integrity_failed=_int(stats, 2),
                replay=_int(stats, 1),
            )
        )
    return out


def parse_policies(text: str) -> list[XfrmPolicy]:
    """Only the policies of our shape (udp dport selector, one ESP transport template)."""
    out = []
    for b in _split_blocks(text):
        sel = re.match(r"src (\S+?)(?:/32)? dst (\S+?)(?:/32)? proto udp dport (\d+)", b)
        d = re.search(r"\bdir (in|out|fwd)\b", b)
        tmpl = re.search(r"tmpl src \S+ dst \S+\s*\n\s*proto esp(?: spi (0x[0-9a-f]+))?[^\n]*"
                         r"reqid (\d+)", b)  # fmt: skip
        if not sel or not d or not tmpl:
            continue
        mark = re.search(r"mark (0x[0-9a-f]+)/(0x[0-9a-f]+)", b)
        out.append(
            XfrmPolicy(
                src=sel.group(1),
                dst=sel.group(2),
                dir=d.group(1),
                dport=int(sel.group(3)),
                mark=_int(mark, 1, 16),
                mask=_int(mark, 2, 16),
                reqid=int(tmpl.group(2)),
                spi=int(tmpl.group(1), 16) if tmpl.group(1) else None,
            )
        )
    return out


def parse_marks(text: str) -> EspMarks | None:
    """The VNIs of the output chain (both chains are always written together)."""
    rules = re.findall(
        r"udp dport (\d+) @th,96,24 (0x[0-9a-f]+|\d+) meta mark set meta mark \| (0x[0-9a-f]+)",
        text,
    )
    if "table ip " + NFT_TABLE not in text:
        return None
    if not rules:
        return EspMarks(frozenset())
    vnis = frozenset(int(v, 0) for _, v, _ in rules)
    return EspMarks(vnis, int(rules[0][0]), int(rules[0][2], 16))


def parse_xfrm_stat(text: str) -> dict[str, int]:
    stats = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


# ---- can this kernel do ESP at all? ------------------------------------------------------


def probe_esp() -> tuple[bool, str]:
    """Add an rfc4106 ESP state in a throwaway namespace (so the host's XFRM tables are never
    touched). Returns (ok, why-not). Needs root; without it the answer is (False, reason)."""
    ns = "snprobe-" + uuid.uuid4().hex[:8]
    x = IpXfrm(ns)
    rc, _, err = IpXfrm()._run(["ip", "netns", "add", ns])
    if rc != 0:
        return False, f"cannot create a probe namespace: {err.strip()}"
    try:
        key = os.urandom(20)
        state = XfrmState("198.51.100.1", "198.51.100.2", 0x100, 1, key)
        try:
            x.apply([XfrmStateAdd(state)])
        except KernelError as e:
            return False, (
                f"the kernel cannot do ESP with {AEAD_RFC4106} ({e.detail or e}): "
                "esp4/xfrm_user modules or the AES-GCM crypto are missing"
            )
        return True, ""
    finally:
        IpXfrm()._run(["ip", "netns", "del", ns])
