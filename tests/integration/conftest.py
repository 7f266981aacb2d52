"""Fixtures for kernel tests: private network namespaces that are always removed.

Kernel tests never touch the root namespace: everything happens in ``sntest-<random>``
namespaces made here (or named with ``netns_name()`` and made by the code under test),
and every one of them is deleted at teardown, pass or fail.
"""

from __future__ import annotations

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
