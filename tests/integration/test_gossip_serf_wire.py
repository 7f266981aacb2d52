"""The wire codec against the real peer: Debian's ``serf`` agent (serf 0.9.4, memberlist 0.2.2)
on loopback, before any protocol logic exists. We send our encoded ping and push/pull and
decode what serf answers, plain and with ``-encrypt``. No namespaces needed: serf binds
127.0.0.1 only, on free ports, and is killed at teardown whatever happens.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import pytest

from swarmnet.gossip import wire
from swarmnet.gossip.keyring import Keyring
from swarmnet.gossip.messages import (
    Ack,
    DecodeError,
    Err,
    NodeState,
    Ping,
    PushPull,
    bytes_to_ip,
    ip_to_bytes,
)

pytestmark = pytest.mark.serf

LOOPBACK = "127.0.0.1"
KEY = bytes(range(32))
STARTUP_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 5.0


def _ensure_serf() -> str:
    path = shutil.which("serf")
    if path:
        return path
    if os.geteuid() != 0:
        pytest.skip("serf is not installed and we are not root to install it")
    policy = subprocess.run(["apt-cache", "policy", "serf"], capture_output=True, text=True)
    if "Candidate: (none)" in policy.stdout or not policy.stdout.strip():
        pytest.skip("no serf package in the apt sources")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "serf"], check=True, env=env, capture_output=True)
    path = shutil.which("serf")
    assert path, "apt-get installed serf but it is not on PATH"
    return path


def _free_port() -> int:
    """A port free for both UDP and TCP (serf binds both on the same number)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((LOOPBACK, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((LOOPBACK, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


@dataclass
class Serf:
    port: int
    node: str
    keyring: Keyring | None


@contextlib.contextmanager
def run_serf(key: bytes | None) -> Iterator[Serf]:
    binary = _ensure_serf()
    port, rpc = _free_port(), _free_port()
    cmd = [binary, "agent", "-node", "s1", "-bind", f"{LOOPBACK}:{port}"]
    cmd += ["-rpc-addr", f"{LOOPBACK}:{rpc}", "-log-level", "debug"]
    if key is not None:
        cmd += ["-encrypt", base64.b64encode(key).decode()]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                assert proc.poll() is None, "serf exited during startup"
                try:
                    socket.create_connection((LOOPBACK, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            yield Serf(port, "s1", Keyring([key]) if key is not None else None)
            assert proc.poll() is None, "serf died while we talked to it"
        except BaseException:
            log.seek(0)
            print(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(REPLY_TIMEOUT_S)
    try:
        yield sock
    finally:
        sock.close()


def _ping(sock: socket.socket, serf: Serf, seq: int, keyring: Keyring | None) -> None:
    port = sock.getsockname()[1]
    msg = Ping(seq, serf.node, ip_to_bytes(LOOPBACK), port, "py-probe")
    sock.sendto(wire.encode_packet([msg], keyring=keyring), (LOOPBACK, serf.port))


def _first_ack(sock: socket.socket, keyring: Keyring | None) -> Ack:
    while True:
        buf, _ = sock.recvfrom(65536)
        for msg in wire.decode_packet(buf, keyring=keyring):
            if isinstance(msg, Ack):
                return msg


def _exchange(
    serf: Serf,
    msg: object,
    keyring: Keyring | None,
    compress: bool,
    reply_keyring: Keyring | None | str = "same",
) -> object:
    """One TCP exchange: we write, serf replies and closes."""
    recv_ring = keyring if reply_keyring == "same" else reply_keyring
    assert not isinstance(recv_ring, str)
    out = wire.encode_stream(msg, compress=compress, keyring=keyring)  # type: ignore[arg-type]
    with socket.create_connection((LOOPBACK, serf.port), timeout=REPLY_TIMEOUT_S) as conn:
        conn.sendall(out)
        decoder = wire.StreamDecoder(recv_ring)
        while (chunk := conn.recv(65536)) and decoder.feed(chunk) is None:
            pass
        return decoder.message if decoder.message is not None else decoder.eof()


def _check_push_pull_reply(reply: object, serf: Serf) -> None:
    assert isinstance(reply, PushPull)
    [state] = [s for s in reply.states if s.name == serf.node]
    assert state.state == NodeState.ALIVE
    assert bytes_to_ip(state.addr) == LOOPBACK and state.port == serf.port
    assert state.vsn == wire.DEFAULT_VSN  # what we advertise is what serf advertises
    assert state.meta[:1] == b"\xff"  # serf tags: 0xff + msgpack map
    assert reply.user_state[:1] == b"\x02"  # serf's messagePushPull
    serf_state = msgpack.unpackb(reply.user_state[1:], raw=True)
    assert {b"LTime", b"EventLTime", b"QueryLTime", b"StatusLTimes"} <= set(serf_state)
    assert serf.node.encode() in serf_state[b"StatusLTimes"]


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_udp_ping_gets_ack(udp: socket.socket, key: bytes | None) -> None:
    with run_serf(key) as serf:
        _ping(udp, serf, 41, serf.keyring)
        ack = _first_ack(udp, serf.keyring)
        assert ack.seq_no == 41
        # serf puts its Vivaldi coordinate in the ack: 0x01 + msgpack Coordinate.
        assert ack.payload and ack.payload[0] == 1
        assert b"Vec" in ack.payload


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "lzw"])
def test_push_pull_lists_serf_alive(key: bytes | None, compress: bool) -> None:
    with run_serf(key) as serf:
        reply = _exchange(serf, PushPull(join=False), serf.keyring, compress)
        _check_push_pull_reply(reply, serf)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_tcp_ping_gets_ack(key: bytes | None) -> None:
    with run_serf(key) as serf:
        reply = _exchange(serf, Ping(7, serf.node), serf.keyring, compress=True)
        assert reply == Ack(7, None)


def test_wrong_key_gets_no_answer(udp: socket.socket) -> None:
    with run_serf(KEY) as serf:
        wrong = Keyring([bytes(32)])
        # serf reads packets in order: if the wrong-key and plaintext pings were answered,
        # their acks would arrive before the ack of the good ping sent after them.
        _ping(udp, serf, 1, wrong)
        _ping(udp, serf, 2, None)
        _ping(udp, serf, 3, serf.keyring)
        assert _first_ack(udp, serf.keyring).seq_no == 3
        # Over TCP serf answers an errResp encrypted with *its* key: unreadable with ours.
        with pytest.raises(DecodeError) as exc:
            _exchange(serf, PushPull(join=False), wrong, compress=False)
        assert exc.value.reason == "decrypt_failed"
        # With the right key we can read that error: serf refuses a plaintext stream.
        err = _exchange(serf, PushPull(join=False), None, False, reply_keyring=serf.keyring)
        assert isinstance(err, Err) and "not encrypted" in err.error
