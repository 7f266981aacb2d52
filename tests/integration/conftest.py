"""Fixtures for kernel tests: private network namespaces that are always removed.

Kernel tests never touch the root namespace: everything happens in ``sntest-<random>``
namespaces made here (or named with ``netns_name()`` and made by the code under test),
and every one of them is deleted at teardown, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest

NETNS_RUN_DIR = "/run/netns"
PREFIX = "sntest-"


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces)")


def _delete(name: str) -> None:
    if os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.fixture
def netns_name() -> Iterator[Callable[[], str]]:
    """A factory of fresh ``sntest-`` names, NOT created; whatever exists under those names
    at teardown is deleted (for namespaces the code under test creates)."""
    _require_root()
    names: list[str] = []

    def make() -> str:
        name = PREFIX + secrets.token_hex(4)  # 15 chars: also a valid link name
        names.append(name)
        return name

    try:
        yield make
    finally:
        for name in names:
            _delete(name)


@pytest.fixture
def netns(netns_name: Callable[[], str]) -> str:
    """A fresh, empty namespace (``lo`` down), deleted at teardown."""
    name = netns_name()
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


@contextlib.contextmanager
def netns_lab(prefix: str, **cfg: object) -> Iterator[str]:
    """A netns lab named ``<prefix><8 hex>`` (agents running, swarm formed), removed at exit,
    pass or fail, and checked gone. ``cfg``: LabConfig fields (hosts, managers...)."""
    if os.geteuid() != 0:
        pytest.skip("the netns lab needs root")
    from swarmnet.lab import netns
    from swarmnet.lab.netns import LabConfig

    name = f"{prefix}{secrets.token_hex(4)}"  # letters and digits only: no '-' in lab names
    try:
        netns.up(LabConfig(name=name, **cfg))  # type: ignore[arg-type]
        yield name
    finally:
        netns.down(name)  # idempotent: a test may have done it already
        left = netns.lab_namespaces(name)
        assert left == [], f"lab {name} left namespaces behind: {left}"
        assert not (netns.LAB_ROOT / name).exists(), f"lab {name} left its directory"


def vm_lab_name() -> str:
    """A fresh VM lab name, or a skip where the VM lab cannot run (no root; qemu or the
    Debian kernel package cannot be installed). The caller makes and removes the lab."""
    if os.geteuid() != 0:
        pytest.skip("the vm lab needs root (network namespaces, taps)")
    from swarmnet.lab import vm

    try:
        vm.ensure_artefacts()
    except vm.ToolsUnavailable as e:
        pytest.skip(f"qemu or the Debian kernel package cannot be installed here: {e}")
    return "sntest_" + secrets.token_hex(4)
