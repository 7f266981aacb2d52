"""A node's desired ESP state for its encrypted overlays, and the ops that reach it (pure).

Input: the local VTEP, the remote VTEPs it shares an encrypted network with, the VNIs of
the encrypted networks it is on, and the published ``KeySet``. Output: XFRM states,
policies and the VXLAN mark rules, as values (``desired``); ``diff`` turns a snapshot into
kernel ops in make-before-break order.

Choices (and why):
- ESP transport mode, ``rfc4106(gcm(aes))``, **128-bit ICV** (Docker uses 64: a forgery is
  2^32 times harder to get through, for 8 more bytes per packet).
- **Extended sequence numbers** (``flag esn``) with a replay window of 64 on every SA: the
  sequence number is 64 bits, so the 32-bit wrap that hits Docker's SAs on busy links
  (no ESN, replay window 0, no lifetimes) cannot happen, and replayed or reordered-beyond-64
  packets are dropped. Rotation still runs by time and by packet count (``rotation.py``):
  ESN removes the wrap, rotation bounds how much traffic one key protects.
- SAs: for every peer and every key of the set, one inbound (peer -> local) and one outbound
  (local -> peer) SA; the SPI and the per-SA key are derived (``keys.spi``, ``keys.sa_key``).
  Outbound SAs for non-primary keys are idle (their policy does not point at them) so that
  switching keys is one policy update.
- Policies, per peer, selecting VXLAN (udp dport 4789) *and* the mark bit:
  out ``local -> peer`` template ESP with the primary key's SPI pinned (the kernel then picks
  exactly that SA; verified in the VM lab); in ``peer -> local`` template ESP with the reqid
  and no SPI, so every installed key is accepted while keys overlap, and an unencrypted packet
  that carries the mark (cleartext VXLAN of an encrypted VNI) is dropped by the kernel
  (counted as XfrmInTmplMismatch).
- The mark: XFRM selectors cannot see the VNI. Like Docker (iptables ``-m bpf`` VNI match +
  MARK 0xD0C4E3), an nftables table marks VXLAN of encrypted VNIs (``@th,96,24`` = the VNI)
  with one bit (OR-ed in, so other users of the mark keep theirs), on output (a ``route``
  chain, which re-runs the XFRM lookup) and prerouting. VXLAN of unencrypted networks
  between the same two hosts carries no mark, matches no policy and stays plain VXLAN.

Ordering in ``diff``: new states, then policies (create/switch), then the mark rules, then
removals of policies and states. A new encrypted VNI is therefore never marked before its
policies exist (marked without a policy would mean cleartext), and an old key's SA goes only
after no policy points at it. What we own: states and policies whose reqid is ``cfg.reqid``
and the ``swarmnet_esp`` nftables table; nothing else is touched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from swarmnet.ipsec.keys import KeySet, SpiCollision, sa_key, spi
from swarmnet.kernel.xfrm_types import (
    EspMarks,
    EspMarkSet,
    XfrmOp,
    XfrmPolicy,
    XfrmPolicyAdd,
    XfrmPolicyDel,
    XfrmSnapshot,
    XfrmState,
    XfrmStateAdd,
    XfrmStateDel,
)

ESP_HEADER = 8  # SPI + sequence number
GCM_IV = 8
ESP_TRAILER = 2  # pad length + next header
VXLAN_OVERHEAD = 20 + 8 + 8 + 14  # outer IPv4 + UDP + VXLAN + inner Ethernet


@dataclass(frozen=True)
class EspConfig:
    """How SAs and policies look. Defaults are the documented choices above."""

    reqid: int = 0x534E  # "SN": marks our states and policies (ownership)
    mark: int = 0x01000000  # one bit; the policy matches (skb mark & mask) == mark
    port: int = 4789  # the VXLAN data port
    icv_bits: int = 128
    esn: bool = True
    replay_window: int = 64

    def __post_init__(self) -> None:
        if self.mark == 0 or self.mark & (self.mark - 1):
            raise ValueError(f"mark {self.mark:#x} must be a single bit")
        if self.esn and self.replay_window <= 0:
            raise ValueError("ESN needs a replay window > 0")


@dataclass(frozen=True)
class Desired:
    states: frozenset[XfrmState]
    policies: frozenset[XfrmPolicy]
    marks: EspMarks


def encrypted_mtu(underlay_mtu: int = 1500, icv_bits: int = 128) -> int:
    """The overlay MTU with VXLAN and ESP inside ``underlay_mtu``: the ESP payload plus its
    2-byte trailer is padded to 4 bytes. 1500 gives 1416 with a 128-bit ICV (1424 with 64,
    Docker's figure)."""
    room = underlay_mtu - 20 - ESP_HEADER - GCM_IV - icv_bits // 8  # payload + pad + trailer
    payload = room // 4 * 4 - ESP_TRAILER  # UDP + VXLAN + Ethernet + inner packet
    return payload - (VXLAN_OVERHEAD - 20)


def _check_spis(local: str, sas: Iterable[XfrmState]) -> None:
    """Every receiver's SPIs must be unique (the kernel's SA key is dst + spi + proto)."""
    seen: dict[tuple[str, int], tuple] = {}
    for s in sas:
        k = (s.dst, s.spi)
        if k in seen and seen[k] != (s.src, s.key):
            raise SpiCollision(s.dst, s.spi, seen[k][:1], (s.src,))
        seen[k] = (s.src, s.key)


def desired(
    local: str,
    peers: Iterable[str],
    vnis: Iterable[int],
    keyset: KeySet | None,
    cfg: EspConfig = EspConfig(),
    epochs: Mapping[str, int] | None = None,
) -> Desired:
    """The XFRM state for ``local``. ``keyset`` None (no keys yet) means nothing may be
    programmed, and the caller must not carry encrypted VNIs either (never fall back to
    cleartext): it gets no states, no policies and no marks. ``epochs`` maps a VTEP (the
    local one included) to its sender epoch (keys.py), 0 when absent."""
    ep = epochs or {}
    ipaddress.IPv4Address(local)
    peer_list = sorted({p for p in peers if p != local}, key=ipaddress.IPv4Address)
    vni_set = frozenset(vnis)
    if keyset is None or not peer_list or not vni_set:
        return Desired(frozenset(), frozenset(), EspMarks(frozenset(), cfg.port, cfg.mark))

    def sa(src: str, dst: str, key) -> XfrmState:
        return XfrmState(
            src, dst, spi(key, src, dst, ep.get(src, 0)), cfg.reqid,
            sa_key(key, src, dst, ep.get(src, 0)),
            cfg.icv_bits, cfg.esn, cfg.replay_window,
        )  # fmt: skip

    states: list[XfrmState] = []
    policies: list[XfrmPolicy] = []
    for peer in peer_list:
        for key in keyset.keys:
            states.append(sa(peer, local, key))
            states.append(sa(local, peer, key))
        out_spi = spi(keyset.primary_key, local, peer, ep.get(local, 0))
        policies.append(
            XfrmPolicy(local, peer, "out", cfg.port, cfg.mark, cfg.mark, cfg.reqid, out_spi)
        )
        policies.append(XfrmPolicy(peer, local, "in", cfg.port, cfg.mark, cfg.mark, cfg.reqid))
    _check_spis(local, [s for s in states if s.dst == local])
    for peer in peer_list:
        _check_spis(peer, [s for s in states if s.dst == peer])
    return Desired(frozenset(states), frozenset(policies), EspMarks(vni_set, cfg.port, cfg.mark))


def diff(want: Desired, have: XfrmSnapshot, cfg: EspConfig = EspConfig()) -> list[XfrmOp]:
    """Ops from ``have`` to ``want`` in make-before-break order (module docstring)."""
    want_states = {s.ident: s for s in want.states}
    adds: list[XfrmOp] = []
    state_dels: list[XfrmOp] = []
    for ident, s in sorted(want_states.items()):
        cur = have.states.get(ident)
        if cur is None:
            adds.append(XfrmStateAdd(s))
        elif (cur.reqid, cur.key_digest, cur.icv_bits, cur.esn, cur.aead) != (
            s.reqid, s.key_digest, s.icv_bits, s.esn, s.aead,
        ):  # fmt: skip
            # Same SPI, other content: cannot be changed in place. Rare (a foreign SA on our
            # SPI, or a corrupted one). Replacing it converges, but a re-created outbound SA
            # restarts at sequence 1 and the peer drops it as replays: the caller should
            # take a new sender epoch instead (keys.py) when it sees this for local -> peer.
            adds.append(XfrmStateDel(*ident))
            adds.append(XfrmStateAdd(s))
    for ident, cur in sorted(have.states.items()):
        if cur.reqid == cfg.reqid and ident not in want_states:
            state_dels.append(XfrmStateDel(*ident))

    want_pols = {p.ident: p for p in want.policies}
    pol_sets: list[XfrmOp] = [
        XfrmPolicyAdd(p) for i, p in sorted(want_pols.items()) if have.policies.get(i) != p
    ]
    pol_dels: list[XfrmOp] = [
        XfrmPolicyDel(p)
        for i, p in sorted(have.policies.items())
        if p.reqid == cfg.reqid and i not in want_pols
    ]
    have_vnis = have.marks.vnis if have.marks else frozenset()
    marks: list[XfrmOp] = []
    if have_vnis != want.marks.vnis or (
        have.marks is not None and (have.marks.port, have.marks.mark)
        != (want.marks.port, want.marks.mark)
    ):  # fmt: skip
        marks.append(EspMarkSet(want.marks))
    return adds + pol_sets + marks + pol_dels + state_dels


def sent_by_key(
    have: XfrmSnapshot, local: str, peers: Iterable[str], keyset: KeySet, epoch: int = 0
) -> dict[int, int]:
    """The most packets sent under any outbound SA of each key (its ``oseq``, 64 bits with
    ESN): what the agent reports as ``rotation.Counters``."""
    out: dict[int, int] = {}
    for key in keyset.keys:
        for peer in peers:
            if peer == local:
                continue
            cur = have.states.get((local, peer, spi(key, local, peer, epoch)))
            if cur is not None:
                out[key.key_id] = max(out.get(key.key_id, 0), cur.oseq, cur.packets)
    return out
