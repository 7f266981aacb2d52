"""Encrypted overlays: ESP between VTEPs (keys, plan, rotation; the kernel side is
``swarmnet.kernel.xfrm``). See plan.py for the design and rotation.py for the key schedule."""

from __future__ import annotations

import functools


class EspUnsupported(Exception):
    """This node's kernel cannot do ESP: encrypted networks are refused here, never carried in
    cleartext."""


@functools.lru_cache(maxsize=1)
def esp_support() -> tuple[bool, str]:
    """(ok, reason) from adding an rfc4106 SA in a throwaway namespace (needs root). Cached:
    modules do not disappear under a running agent."""
    from swarmnet.kernel.xfrm import probe_esp  # the kernel boundary runs the commands

    return probe_esp()


def kernel_supports_esp() -> bool:
    return esp_support()[0]


def require_esp(network: str) -> None:
    """Raise EspUnsupported with a message for the user if this kernel has no ESP."""
    ok, why = esp_support()
    if not ok:
        raise esp_unsupported(network, why)


def esp_unsupported(network: str, why: str) -> EspUnsupported:
    """The error a task on ``network`` fails with on a node without ESP (``service ps``)."""
    return EspUnsupported(
        f"network {network!r} is encrypted but this node's kernel cannot do IPsec ESP: {why}"
    )


def lab_main(argv: list[str] | None = None) -> int:
    """Entry point for the VM lab and the bench (``python -c 'from swarmnet.ipsec import
    lab_main; lab_main()' JSON``): programs one host from a JSON document
    ``{"local", "peers", "vnis", "keyset": KeySet.to_dict() | null, "epochs": {vtep: n},
    "cfg": {...}}`` through
    the real kernel boundary and prints a JSON summary (ops applied, bytes sent per key id,
    XFRM error counters). Not used by the agent, which will call plan/diff/apply itself."""
    import json
    import sys

    from swarmnet.ipsec import keys, plan
    from swarmnet.kernel import xfrm

    doc = json.loads((argv if argv is not None else sys.argv[1:])[0])
    cfg = plan.EspConfig(**doc.get("cfg", {}))
    ks = keys.KeySet.from_dict(doc["keyset"]) if doc.get("keyset") else None
    x = xfrm.IpXfrm()
    ops = []
    epochs = doc.get("epochs", {})
    if doc.get("apply", True):
        want = plan.desired(doc["local"], doc["peers"], doc["vnis"], ks, cfg, epochs)
        ops = plan.diff(want, x.snapshot(), cfg)
        x.apply(ops)
    snap = x.snapshot()
    epoch = epochs.get(doc["local"], 0)
    sent = plan.sent_by_key(snap, doc["local"], doc["peers"], ks, epoch) if ks else {}
    print(json.dumps({
        "ops": len(ops),
        "sent": {str(k): v for k, v in sent.items()},
        "states": len(snap.states),
        "policies": len(snap.policies),
        "vnis": sorted(snap.marks.vnis) if snap.marks else [],
        "failed": sum(s.integrity_failed for s in snap.states.values()),
        "stats": {k: v for k, v in snap.stats.items() if v},
    }))  # fmt: skip
    return 0
