"""The LB suite in the VM lab (Debian's 6.1 kernel, where IPVS exists): the very scenario of
test_lb_nft.py (client ns -> node ns -> two backend namespaces with http servers), run inside
one guest as a script from this repository (the guest sees /work/main through its 9p root),
once with the IPVS backend and once with nftables.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmnet.lab import vm

SCENARIO = Path(__file__).with_name("test_lb_nft.py")
sys.path.insert(0, str(SCENARIO.parent))
import test_lb_nft  # noqa: E402  (the shared assertions)

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def lab() -> Iterator[dict]:
    if os.geteuid() != 0:
        pytest.skip("the vm lab needs root (network namespaces, taps)")
    try:
        vm.ensure_artefacts()
    except vm.ToolsUnavailable as e:
        pytest.skip(f"qemu or the Debian kernel package cannot be installed here: {e}")
    name = "sntest_" + secrets.token_hex(4)
    try:
        lab = vm.up(name, 1)
        rc, out, err = vm.exec_on(name, "h1", ["modprobe", "-a", "ip_vs", "ip_vs_rr", "veth"])
        assert rc == 0, err
        yield lab
    finally:
        vm.down(name)


@pytest.mark.parametrize("backend", ["ipvs", "nft"])
def test_vip_reaches_both_backends_then_only_the_remaining_one_in_vm(
    lab: dict, backend: str
) -> None:
    rc, out, err = vm.exec_on(
        lab["name"], "h1", [sys.executable, str(SCENARIO), "--backend", backend], 900
    )
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"rc={rc}\n--- out\n{out}\n--- err\n{err}"
    seen = json.loads(lines[-1])
    print(seen)
    test_lb_nft.check(seen)
    assert rc == 0, err
