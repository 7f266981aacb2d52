"""The XFRM sub-boundary's vocabulary: ESP states, policies, the VXLAN mark rules, the ops
that change them and the snapshot that reads them back. Pure data (no I/O, no subprocess),
so that the planners (``swarmnet.ipsec.plan``) can import it and stay in the pure import
contract; the implementations (``IpXfrm``, ``FakeXfrm``) live in ``swarmnet.kernel.xfrm``.

Identity, as the kernel sees it:
- a state is ``(src, dst, spi)`` (the kernel's key is daddr + spi + proto esp);
- a policy is ``(src, dst, dir, dport, mark, mask)``: its selector, direction and mark.
  ``XfrmPolicyAdd`` has *update* semantics (``ip xfrm policy update``: create or replace),
  because switching the outbound key is a replace of the template's SPI, done in one step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

AEAD_RFC4106 = "rfc4106(gcm(aes))"
NFT_TABLE = "swarmnet_esp"


@dataclass(frozen=True)
class XfrmState:
    """One ESP transport-mode SA. ``key`` is the AES key followed by the 4-byte rfc4106 salt."""

    src: str
    dst: str
    spi: int
    reqid: int
    key: bytes = field(repr=False)  # never in a log line
    icv_bits: int = 128
    esn: bool = True
    replay_window: int = 64
    aead: str = AEAD_RFC4106

    @property
    def ident(self) -> tuple[str, str, int]:
        return (self.src, self.dst, self.spi)

    @property
    def key_digest(self) -> str:
        return key_digest(self.key)


def key_digest(key: bytes) -> str:
    """A short fingerprint of SA key material: snapshots compare keys without holding them."""
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True)
class XfrmPolicy:
    """``src -> dst proto udp dport D`` with ``mark/mask``, direction ``in`` or ``out``,
    template ESP transport with ``reqid`` (and, outbound, the pinned ``spi`` of the SA to use;
    inbound None: any SA of the reqid is accepted, which is what lets two keys overlap)."""

    src: str
    dst: str
    dir: str
    dport: int
    mark: int
    mask: int
    reqid: int
    spi: int | None = None

    @property
    def ident(self) -> tuple[str, str, str, int, int, int]:
        return (self.src, self.dst, self.dir, self.dport, self.mark, self.mask)


@dataclass(frozen=True)
class EspMarks:
    """The nftables rules: VXLAN (udp ``port``) of the VNIs in ``vnis`` gets ``mark`` OR-ed in."""

    vnis: frozenset[int] = frozenset()
    port: int = 4789
    mark: int = 0x01000000


@dataclass(frozen=True)
class StateInfo:
    """A state as read back, with its counters (what rotation and metrics need)."""

    src: str
    dst: str
    spi: int
    reqid: int
    aead: str
    icv_bits: int
    esn: bool
    replay_window: int
    key_digest: str
    packets: int = 0
    bytes: int = 0
    oseq: int = 0  # 64 bits with ESN (oseq-hi << 32 | oseq): packets sent under this SA
    seq: int = 0  # highest sequence number received
    integrity_failed: int = 0  # ICV failures (tampered packet or wrong key)
    replay: int = 0

    @property
    def ident(self) -> tuple[str, str, int]:
        return (self.src, self.dst, self.spi)


@dataclass
class XfrmSnapshot:
    states: dict[tuple[str, str, int], StateInfo] = field(default_factory=dict)
    policies: dict[tuple, XfrmPolicy] = field(default_factory=dict)
    marks: EspMarks | None = None  # None: no swarmnet_esp table
    stats: dict[str, int] = field(default_factory=dict)  # /proc/net/xfrm_stat


# ---- operations -----------------------------------------------------------------------


@dataclass(frozen=True)
class XfrmStateAdd:
    state: XfrmState


@dataclass(frozen=True)
class XfrmStateDel:
    src: str
    dst: str
    spi: int


@dataclass(frozen=True)
class XfrmPolicyAdd:
    """Create or replace (update semantics, see the module docstring)."""

    policy: XfrmPolicy


@dataclass(frozen=True)
class XfrmPolicyDel:
    policy: XfrmPolicy


@dataclass(frozen=True)
class EspMarkSet:
    """Replace the whole mark table atomically; empty ``vnis`` removes it."""

    marks: EspMarks


XfrmOp = XfrmStateAdd | XfrmStateDel | XfrmPolicyAdd | XfrmPolicyDel | EspMarkSet


class Xfrm(Protocol):
    def snapshot(self) -> XfrmSnapshot: ...

    def apply(self, ops: list[XfrmOp]) -> None:
        """In order; on the first failure KernelError naming the op (earlier ops stay)."""
        ...
