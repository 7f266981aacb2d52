"""Key records, derivation and SPI agreement (swarmnet.ipsec.keys)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmnet.ipsec import keys
from swarmnet.ipsec.keys import Key, KeySet

ips = st.ip_addresses(v=4).map(str)
materials = st.sampled_from([16, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n))


@given(materials, st.integers(0, 2**32 - 1), ips, ips)
def test_both_ends_derive_the_same_spi_and_key_and_the_spi_is_valid(m, kid, a, b) -> None:
    # Each end builds its own Key from the published record, as a node does.
    k1 = Key(kid, m, 1.0)
    k2 = Key.from_dict(k1.to_dict())
    assert keys.spi(k1, a, b) == keys.spi(k2, a, b)
    assert keys.sa_key(k1, a, b) == keys.sa_key(k2, a, b)
    assert 0x100 <= keys.spi(k1, a, b) < 2**32
    assert len(keys.sa_key(k1, a, b)) == len(m) + 4


def test_directions_and_keys_get_distinct_material() -> None:
    k = Key(1, b"\x01" * 16)
    k2 = Key(2, b"\x01" * 16)  # same material, new id: new SAs anyway
    a, b = "198.51.100.11", "198.51.100.12"
    assert keys.spi(k, a, b) != keys.spi(k, b, a)
    assert keys.sa_key(k, a, b) != keys.sa_key(k, b, a)
    assert keys.spi(k, a, b) != keys.spi(k2, a, b)
    assert keys.sa_key(k, a, b) != keys.sa_key(k2, a, b)


def test_known_vector_is_stable() -> None:
    # Pinned: a change here would break SA agreement between versions of the agent.
    k = Key(7, bytes(range(16)))
    assert keys.spi(k, "198.51.100.11", "198.51.100.12") == 4090276528
    assert keys.sa_key(k, "10.0.0.1", "10.0.0.2").hex()[:8] == "e8a9aea5"
    # created_at and tag do not enter the derivation
    assert keys.spi(Key(7, bytes(range(16)), 99.0, "x"), "198.51.100.11", "198.51.100.12") == (
        4090276528
    )


def test_key_material_is_never_in_repr_and_is_validated() -> None:
    k = keys.generate_key(3, 5.0)
    assert k.material.hex() not in repr(k)
    with pytest.raises(keys.KeyError_):
        Key(1, b"short")
    with pytest.raises(keys.KeyError_):
        KeySet(1, (k,), primary=4)
    with pytest.raises(keys.KeyError_):
        KeySet(1, (k, k), primary=3)
    ks = KeySet(2, (k, keys.generate_key(4, 6.0, 32)), 4)
    assert KeySet.from_dict(ks.to_dict()) == ks
    assert ks.primary_key.aes_len == 32


def test_a_new_sender_epoch_gives_new_spis_and_keys() -> None:
    k = Key(7, bytes(range(16)))
    a, b = "198.51.100.11", "198.51.100.12"
    assert keys.spi(k, a, b, 1) == 3498649650 != keys.spi(k, a, b)
    assert keys.sa_key(k, a, b, 1) != keys.sa_key(k, a, b, 0)
