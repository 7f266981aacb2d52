"""The ESP plan as values, diff ordering, the fake XFRM and the text parsers."""

from __future__ import annotations

import errno

import pytest

from swarmnet.ipsec import keys, plan
from swarmnet.ipsec.keys import Key, KeySet
from swarmnet.kernel import xfrm
from swarmnet.kernel.errors import KernelError

A, B, C = "198.51.100.11", "198.51.100.12", "198.51.100.13"
K1, K2 = Key(1, b"\x01" * 16), Key(2, b"\x02" * 16)
CFG = plan.EspConfig()


def test_desired_states_and_policies() -> None:
    ks = KeySet(1, (K1, K2), primary=1)
    d = plan.desired(A, [B, C, A], [4096], ks)
    # per peer per key: one in, one out
    assert len(d.states) == 2 * 2 * 2
    assert {(s.src, s.dst) for s in d.states} == {(A, B), (B, A), (A, C), (C, A)}
    assert all(s.esn and s.replay_window == 64 and s.icv_bits == 128 for s in d.states)
    outs = {p.dst: p for p in d.policies if p.dir == "out"}
    ins = {p.src: p for p in d.policies if p.dir == "in"}
    assert set(outs) == set(ins) == {B, C}
    assert outs[B].spi == keys.spi(K1, A, B) and ins[B].spi is None
    assert all(p.mark == p.mask == CFG.mark and p.dport == 4789 for p in d.policies)
    assert d.marks.vnis == {4096}


def test_the_two_ends_plan_matching_sas() -> None:
    ks = KeySet(1, (K1,), 1)
    a, b = plan.desired(A, [B], [7], ks), plan.desired(B, [A], [7], ks)
    assert a.states == b.states  # the same SAs, keys included, on both hosts
    out_a = next(p for p in a.policies if p.dir == "out")
    assert (out_a.src, out_a.dst, out_a.spi) in {(s.src, s.dst, s.spi) for s in b.states}


def test_no_keys_no_peers_or_no_vnis_means_nothing_programmed() -> None:
    ks = KeySet(1, (K1,), 1)
    for d in (plan.desired(A, [B], [7], None), plan.desired(A, [], [7], ks),
              plan.desired(A, [B], [], ks)):  # fmt: skip
        assert not d.states and not d.policies and not d.marks.vnis


def test_diff_orders_make_before_break_and_converges() -> None:
    k = xfrm.FakeXfrm()
    v1 = plan.desired(A, [B], [7], KeySet(1, (K1,), 1))
    k.apply(plan.diff(v1, k.snapshot()))
    assert plan.diff(v1, k.snapshot()) == []
    # first op kinds: states, then policies, then marks
    kinds = [type(op).__name__ for op in k.applied]
    assert kinds == ["XfrmStateAdd"] * 2 + ["XfrmPolicyAdd"] * 2 + ["EspMarkSet"]
    for ks in (KeySet(2, (K1, K2), 1), KeySet(3, (K1, K2), 2), KeySet(4, (K2,), 2)):
        k.applied.clear()
        ops = plan.diff(plan.desired(A, [B], [7], ks), k.snapshot())
        k.apply(ops)
        kinds = [type(op).__name__ for op in ops]
        assert kinds == sorted(kinds, key=["XfrmStateAdd", "XfrmPolicyAdd", "EspMarkSet",
                                           "XfrmPolicyDel", "XfrmStateDel"].index)  # fmt: skip
        snap = k.snapshot()
        out = next(p for p in snap.policies.values() if p.dir == "out")
        assert (A, B, out.spi) in snap.states  # the out policy always points at an SA
    assert {s.spi for s in k.snapshot().states.values()} == {keys.spi(K2, A, B), keys.spi(K2, B, A)}
    # leaving the network: marks go before policies, then states
    ops = plan.diff(plan.desired(A, [], [], None), k.snapshot())
    assert [type(o).__name__ for o in ops] == ["EspMarkSet"] + ["XfrmPolicyDel"] * 2 + [
        "XfrmStateDel"
    ] * 2
    k.apply(ops)
    snap = k.snapshot()
    assert not snap.states and not snap.policies and snap.marks is None


def test_diff_leaves_foreign_objects_alone_and_replaces_a_wrong_key() -> None:
    k = xfrm.FakeXfrm()
    foreign = xfrm.XfrmState(A, C, 0x999, 1, b"\x09" * 20)
    k.apply([xfrm.XfrmStateAdd(foreign),
             xfrm.XfrmPolicyAdd(xfrm.XfrmPolicy(A, C, "out", 4789, 0, 0, 1, 0x999))])  # fmt: skip
    d = plan.desired(A, [B], [7], KeySet(1, (K1,), 1))
    k.apply(plan.diff(d, k.snapshot()))
    assert plan.diff(d, k.snapshot()) == []
    assert (A, C, 0x999) in k.snapshot().states
    # an SA with our SPI but other key material is replaced
    s = next(s for s in d.states if s.src == A)
    k.apply([xfrm.XfrmStateDel(*s.ident),
             xfrm.XfrmStateAdd(xfrm.XfrmState(s.src, s.dst, s.spi, s.reqid, b"\0" * 20))])  # fmt: skip
    ops = plan.diff(d, k.snapshot())
    assert ops == [xfrm.XfrmStateDel(*s.ident), xfrm.XfrmStateAdd(s)]


def test_spi_collision_is_detected(monkeypatch) -> None:
    monkeypatch.setattr(plan, "spi", lambda key, src, dst, epoch=0: 0x1000)
    with pytest.raises(keys.SpiCollision):
        plan.desired(A, [B, C], [7], KeySet(1, (K1,), 1))


def test_encrypted_mtu() -> None:
    assert plan.encrypted_mtu(1500, 64) == 1424  # Docker's figure
    assert plan.encrypted_mtu(1500, 128) == 1416
    assert plan.encrypted_mtu(9000, 128) == 8916


def test_fake_semantics() -> None:
    k = xfrm.FakeXfrm()
    s = xfrm.XfrmState(A, B, 0x100, 1, b"\x01" * 20)
    k.apply([xfrm.XfrmStateAdd(s)])
    with pytest.raises(KernelError) as e:
        k.apply([xfrm.XfrmStateAdd(s)])
    assert e.value.code == errno.EEXIST
    with pytest.raises(KernelError) as e:
        k.apply([xfrm.XfrmStateDel(A, B, 0x101)])
    assert e.value.is_not_found()
    with pytest.raises(KernelError) as e:
        k.apply([xfrm.XfrmStateAdd(xfrm.XfrmState(A, B, 0x10, 1, b"\x01" * 20))])
    assert e.value.code == errno.EINVAL
    k.count(A, B, 0x100, packets=5, oseq=5)
    assert k.snapshot().states[(A, B, 0x100)].oseq == 5
    assert repr(s).find("01010101") < 0


STATE_TEXT = """src 198.51.100.11 dst 198.51.100.12
\tproto esp spi 0x00001234(4660) reqid 7(0x00000007) mode transport
\treplay-window 0 seq 0x00000000 flag esn (0x10000000)
\taead rfc4106(gcm(aes)) 0x1111111111111111111111111111111111111111 (160 bits) 128
\tanti-replay esn context:
\t seq-hi 0x0, seq 0x0, oseq-hi 0x1, oseq 0x5
\t replay_window 64, bitmap-length 2
\t 00000000 00000000
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  840(bytes), 7(packets)
\t  add 2026-11-26 10:57:28 use -
\tstats:
\t  replay-window 0 replay 2 failed 3
"""

POLICY_TEXT = """src 198.51.100.1/32 dst 198.51.100.2/32 proto udp dport 4789
\tdir out priority 0 ptype main
\tmark 0x1000000/0x1000000
\ttmpl src 198.51.100.1 dst 198.51.100.2
\t\tproto esp spi 0x00000100 reqid 21326 mode transport
src 198.51.100.2/32 dst 198.51.100.1/32 proto udp dport 4789
\tdir in priority 0 ptype main
\tmark 0x1000000/0x1000000
\ttmpl src 198.51.100.2 dst 198.51.100.1
\t\tproto esp reqid 21326 mode transport
src 0.0.0.0/0 dst 0.0.0.0/0
\tsocket in priority 0 ptype main
"""


def test_parse_state_text_of_iproute2_6_1() -> None:
    (s,) = xfrm.parse_states(STATE_TEXT)
    assert (s.src, s.dst, s.spi, s.reqid) == (A, B, 0x1234, 7)
    assert s.esn and s.replay_window == 64 and s.icv_bits == 128
    assert s.aead == "rfc4106(gcm(aes))" and s.key_digest == xfrm.key_digest(b"\x11" * 20)
    assert (s.packets, s.bytes, s.oseq, s.integrity_failed, s.replay) == (7, 840, 2**32 + 5, 3, 2)


def test_parse_policy_text_and_commands_round_trip() -> None:
    out, inn = xfrm.parse_policies(POLICY_TEXT)
    assert out == xfrm.XfrmPolicy("198.51.100.1", "198.51.100.2", "out", 4789, 1 << 24,
                                  1 << 24, 0x534E, 0x100)  # fmt: skip
    assert inn.dir == "in" and inn.spi is None
    cmd = xfrm.policy_cmd(out, "update")
    assert "mark 0x1000000 mask 0x1000000" in cmd and "spi 0x00000100" in cmd
    assert "esn" in xfrm.state_cmd(xfrm.XfrmState(A, B, 0x100, 1, b"\x01" * 20))


def test_parse_marks_and_stat() -> None:
    text = (
        "table ip swarmnet_esp {\n\tchain output {\n\t\ttype route hook output priority mangle;"
        " policy accept;\n\t\tudp dport 4789 @th,96,24 0x1000 meta mark set meta mark |"
        " 0x01000000\n\t}\n}\n"
    )
    assert xfrm.parse_marks(text) == xfrm.EspMarks(frozenset({4096}), 4789, 1 << 24)
    assert xfrm.parse_marks("") is None
    assert "@th,96,24 4096" in xfrm.nft_script(xfrm.EspMarks(frozenset({4096})))
    assert xfrm.parse_xfrm_stat("XfrmInNoStates \t3\nXfrmInError 0\n") == {
        "XfrmInNoStates": 3, "XfrmInError": 0}  # fmt: skip
