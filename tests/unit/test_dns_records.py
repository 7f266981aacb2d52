"""The embedded resolver's lookup rules (swarmnet.dns.records): pure, table-driven."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmnet.dns.records import (
    QTYPE_A,
    QTYPE_AAAA,
    TASK_TTL_S,
    VIP_TTL_S,
    Answer,
    EndpointMode,
    Rcode,
    Records,
    ServiceRecord,
    TaskRecord,
    records_from_assignment,
    resolve,
)

FRONT, BACK, OTHER = "net-front", "net-back", "net-other"


def _records() -> Records:
    return Records(
        services=[
            ServiceRecord(
                "web", EndpointMode.VIP, (FRONT, BACK), {FRONT: "10.0.1.2/24", BACK: "10.0.2.2"}
            ),
            ServiceRecord("db", EndpointMode.DNSRR, (BACK,)),
            ServiceRecord("secret", EndpointMode.VIP, (OTHER,), {OTHER: "10.0.9.2/24"}),
            ServiceRecord("empty", EndpointMode.DNSRR, (FRONT,)),
            ServiceRecord("pending", EndpointMode.VIP, (FRONT,), {}),
        ],
        tasks=[
            TaskRecord("t1", "web.1", "web", {FRONT: "10.0.1.10/24", BACK: "10.0.2.10/24"}),
            TaskRecord("t2", "web.2", "web", {FRONT: "10.0.1.9/24", BACK: "10.0.2.9/24"}),
            TaskRecord("d1", "db.1", "db", {BACK: "10.0.2.20/24"}),
            TaskRecord("d2", "db.2", "db", {BACK: "10.0.2.21/24"}),
            TaskRecord("s1", "secret.1", "secret", {OTHER: "10.0.9.5/24"}),
        ],
    )


R = _records()
FRONT_ONLY = (FRONT,)
BACK_ONLY = (BACK,)
BOTH = (FRONT, BACK)


@pytest.mark.parametrize(
    ("qname", "qtype", "nets", "want"),
    [
        # vip mode: the VIP of the first shared network, in the asker's order
        ("web", QTYPE_A, FRONT_ONLY, Answer(Rcode.NOERROR, ("10.0.1.2",), VIP_TTL_S)),
        ("web", QTYPE_A, BACK_ONLY, Answer(Rcode.NOERROR, ("10.0.2.2",), VIP_TTL_S)),
        ("web", QTYPE_A, (BACK, FRONT), Answer(Rcode.NOERROR, ("10.0.2.2",), VIP_TTL_S)),
        ("web", QTYPE_A, (OTHER, FRONT), Answer(Rcode.NOERROR, ("10.0.1.2",), VIP_TTL_S)),
        # tasks.X: every task IP on that network, sorted numerically (not as strings)
        (
            "tasks.web",
            QTYPE_A,
            FRONT_ONLY,
            Answer(Rcode.NOERROR, ("10.0.1.9", "10.0.1.10"), TASK_TTL_S),
        ),
        ("tasks.web", QTYPE_A, BOTH, Answer(Rcode.NOERROR, ("10.0.1.9", "10.0.1.10"), TASK_TTL_S)),
        (
            "tasks.web",
            QTYPE_A,
            BACK_ONLY,
            Answer(Rcode.NOERROR, ("10.0.2.9", "10.0.2.10"), TASK_TTL_S),
        ),
        # dnsrr: the service name gives the task IPs, and there is no VIP
        ("db", QTYPE_A, BACK_ONLY, Answer(Rcode.NOERROR, ("10.0.2.20", "10.0.2.21"), TASK_TTL_S)),
        (
            "tasks.db",
            QTYPE_A,
            BACK_ONLY,
            Answer(Rcode.NOERROR, ("10.0.2.20", "10.0.2.21"), TASK_TTL_S),
        ),
        # task names, short and with the task id
        ("web.1", QTYPE_A, FRONT_ONLY, Answer(Rcode.NOERROR, ("10.0.1.10",), TASK_TTL_S)),
        ("web.2.t2", QTYPE_A, BACK_ONLY, Answer(Rcode.NOERROR, ("10.0.2.9",), TASK_TTL_S)),
        ("db.2", QTYPE_A, BACK_ONLY, Answer(Rcode.NOERROR, ("10.0.2.21",), TASK_TTL_S)),
        # case-insensitive, trailing dot optional
        ("WEB.", QTYPE_A, FRONT_ONLY, Answer(Rcode.NOERROR, ("10.0.1.2",), VIP_TTL_S)),
        (
            "Tasks.Web.",
            QTYPE_A,
            FRONT_ONLY,
            Answer(Rcode.NOERROR, ("10.0.1.9", "10.0.1.10"), TASK_TTL_S),
        ),
        ("WEB.1.T1", QTYPE_A, FRONT_ONLY, Answer(Rcode.NOERROR, ("10.0.1.10",), TASK_TTL_S)),
        # known, but only on networks the asker does not share: NXDOMAIN, never forwarded
        ("db", QTYPE_A, FRONT_ONLY, Answer(Rcode.NXDOMAIN)),
        ("secret", QTYPE_A, BOTH, Answer(Rcode.NXDOMAIN)),
        ("tasks.secret", QTYPE_A, BOTH, Answer(Rcode.NXDOMAIN)),
        ("secret.1", QTYPE_A, BOTH, Answer(Rcode.NXDOMAIN)),
        ("web", QTYPE_A, (), Answer(Rcode.NXDOMAIN)),
        # AAAA (and other types) for a name in scope: NODATA, not NXDOMAIN
        ("web", QTYPE_AAAA, FRONT_ONLY, Answer(Rcode.NOERROR, (), VIP_TTL_S)),
        ("tasks.db", QTYPE_AAAA, BACK_ONLY, Answer(Rcode.NOERROR, (), TASK_TTL_S)),
        ("web.1", 15, FRONT_ONLY, Answer(Rcode.NOERROR, (), TASK_TTL_S)),  # MX
        ("secret", QTYPE_AAAA, FRONT_ONLY, Answer(Rcode.NXDOMAIN)),
        # in scope but no address yet: NODATA (no 0-task NXDOMAIN, Docker #37623)
        ("empty", QTYPE_A, FRONT_ONLY, Answer(Rcode.NOERROR, (), TASK_TTL_S)),
        ("tasks.empty", QTYPE_A, FRONT_ONLY, Answer(Rcode.NOERROR, (), TASK_TTL_S)),
        ("pending", QTYPE_A, FRONT_ONLY, Answer(Rcode.NOERROR, (), VIP_TTL_S)),
        # not ours: forward
        ("example.com", QTYPE_A, BOTH, Answer(Rcode.FORWARD)),
        ("tasks.nope", QTYPE_A, BOTH, Answer(Rcode.FORWARD)),
        ("web.7", QTYPE_A, BOTH, Answer(Rcode.FORWARD)),
        ("web.example.com", QTYPE_A, BOTH, Answer(Rcode.FORWARD)),
        ("", QTYPE_A, BOTH, Answer(Rcode.FORWARD)),
        (".", QTYPE_A, BOTH, Answer(Rcode.FORWARD)),
    ],
)
def test_resolve(qname: str, qtype: int, nets: tuple[str, ...], want: Answer) -> None:
    assert resolve(R, qname, qtype, nets) == want
    assert R.resolve(qname, qtype, list(nets)) == want


def test_first_network_with_addresses_wins_over_an_empty_one() -> None:
    r = Records(
        services=[ServiceRecord("api", EndpointMode.DNSRR, (FRONT, BACK))],
        tasks=[TaskRecord("a1", "api.1", "api", {BACK: "10.0.2.30"})],
    )
    assert resolve(r, "api", QTYPE_A, (FRONT, BACK)).a_records == ("10.0.2.30",)
    assert resolve(r, "api", QTYPE_A, (FRONT,)) == Answer(Rcode.NOERROR, (), TASK_TTL_S)


def test_tasks_of_a_service_missing_from_services_still_resolve() -> None:
    r = Records(tasks=[TaskRecord("x1", "orphan.1", "orphan", {FRONT: "10.0.1.50/24"})])
    assert resolve(r, "tasks.orphan", QTYPE_A, FRONT_ONLY).a_records == ("10.0.1.50",)
    assert resolve(r, "orphan.1", QTYPE_A, FRONT_ONLY).a_records == ("10.0.1.50",)
    assert resolve(r, "orphan", QTYPE_A, FRONT_ONLY).rcode is Rcode.FORWARD


def test_empty_table_forwards_everything() -> None:
    assert resolve(Records(), "web", QTYPE_A, FRONT_ONLY) == Answer(Rcode.FORWARD)
    assert len(Records()) == 0


@pytest.mark.parametrize("bad", ["not-an-ip", "10.0.0.300", "fd00::1"])
def test_bad_addresses_are_rejected_when_building(bad: str) -> None:
    with pytest.raises(ValueError):
        Records(tasks=[TaskRecord("t", "s.1", "s", {FRONT: bad})])


def test_records_from_assignment_dicts() -> None:
    r = records_from_assignment(
        services=[
            {
                "name": "web",
                "endpoint_mode": "vip",
                "networks": [FRONT],
                "vips": {FRONT: "10.0.1.2/24"},
            },
            {"name": "db", "endpoint_mode": "dnsrr", "networks": [FRONT]},
        ],
        tasks=[
            {
                "id": "t1",
                "name": "web.1",
                "service_name": "web",
                "networks": [{"network_id": FRONT, "address": "10.0.1.10/24"}],
            },
            {
                "id": "d1",
                "name": "db.1",
                "service_name": "db",
                "networks": [{"network_id": FRONT, "address": "10.0.1.20/24"}],
            },
        ],
    )
    assert resolve(r, "web", QTYPE_A, FRONT_ONLY).a_records == ("10.0.1.2",)
    assert resolve(r, "tasks.web", QTYPE_A, FRONT_ONLY).a_records == ("10.0.1.10",)
    assert resolve(r, "db", QTYPE_A, FRONT_ONLY).a_records == ("10.0.1.20",)
    assert resolve(r, "web.1.t1", QTYPE_A, FRONT_ONLY).a_records == ("10.0.1.10",)
    with pytest.raises(ValueError):
        records_from_assignment([{"name": "x", "endpoint_mode": "round-robin"}], [])


@given(
    qname=st.one_of(st.text(max_size=300), st.sampled_from(R.names()).map(str.upper)),
    qtype=st.integers(min_value=0, max_value=65535),
    nets=st.lists(st.sampled_from([FRONT, BACK, OTHER, "x"]), max_size=4),
)
def test_resolve_never_raises_and_answers_stay_in_scope(
    qname: str, qtype: int, nets: list[str]
) -> None:
    ans = resolve(R, qname, qtype, nets)
    assert isinstance(ans, Answer)
    if ans.rcode is not Rcode.NOERROR:
        assert ans.a_records == ()
    if qtype != QTYPE_A:
        assert ans.a_records == ()
    # Scoping: every address given out lies in a subnet of one of the asker's networks.
    prefixes = {FRONT: "10.0.1.", BACK: "10.0.2.", OTHER: "10.0.9."}
    for ip in ans.a_records:
        assert any(ip.startswith(prefixes[n]) for n in nets if n in prefixes), (qname, nets, ip)
