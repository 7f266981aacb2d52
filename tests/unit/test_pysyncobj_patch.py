"""pysyncobj 0.3.17 breaks socket.inet_ntop on Linux; importing our store must undo that."""

import socket


def test_inet_ntop_works_after_importing_the_store():
    import swarmnet.raft.store  # noqa: F401  (the import is the point)

    assert socket.inet_ntop(socket.AF_INET, b"\x0a\x00\x00\x02") == "10.0.0.2"
    assert socket.inet_ntop(socket.AF_INET6, b"\x00" * 15 + b"\x01") == "::1"
