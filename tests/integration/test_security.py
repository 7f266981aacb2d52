"""Issue 4 item 5 in the netns lab (1 manager + 2 workers, real agents): the node channel on
2377 is TLS with a pinned CA and client certificates; tokens, certificates and revocation
are enforced by the manager, and nothing secret crosses the underlay in the clear.

Probes run as separate Python processes inside a lab host's network namespace (``nsenter
--net``), speaking the node channel with ``swarmnet.pki`` contexts, and print one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import netns_lab

from swarmnet.api.client import APIError, Client
from swarmnet.lab import netns
from swarmnet.lab.netns import LabConfig

pytestmark = pytest.mark.kernel

TIMEOUT_S = 60.0

# The probe's shared part: `call(method, url, ctx, body)` -> (status or error name, text).
PROBE_PRELUDE = textwrap.dedent(
    """
    import http.client, json, ssl, sys, urllib.parse
    from pathlib import Path
    from swarmnet import pki

    def call(method, url, ctx, body=None):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=15)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if body is None else {"Content-Type": "application/json"}
            conn.request(method, u.path + (("?" + u.query) if u.query else ""), data, headers)
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        except (ssl.SSLError, ConnectionError, OSError) as e:
            return type(e).__name__, str(e)
        finally:
            conn.close()

    def done(**kw):
        print(json.dumps(kw))
    """
)


def wait_for(fn: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Lab:
    def __init__(self, name: str):
        self.name = name
        self.api = self.client("h1")

    def client(self, host: str) -> Client:
        return Client(host=netns.host_api(self.name, host), timeout_s=30.0)

    def ip_of(self, host: str) -> str:
        return LabConfig(name=self.name).host_ip(int(host[1:]))

    def data_dir(self, host: str) -> Path:
        return netns.lab_dir(self.name) / host / "data"

    def node_id(self, host: str) -> str:
        return json.loads((self.data_dir(host) / "node.json").read_text())["node_id"]

    def tokens(self) -> dict[str, str]:
        return self.api.get("/swarm")["JoinTokens"]

    def node_ids(self) -> set[str]:
        return {n["ID"] for n in self.api.get("/nodes")}

    def manager_log(self) -> str:
        return (netns.lab_dir(self.name) / "h1" / "agent.log").read_text(errors="replace")

    def probe(self, host: str, code: str, **args: str) -> dict:
        """Run prelude + ``code`` in ``host``'s namespace with ``args`` in the environment
        (PROBE_<NAME>); return the JSON it printed."""
        env = dict(os.environ, **{f"PROBE_{k.upper()}": v for k, v in args.items()})
        ns = Path("/run/netns") / netns.host_ns(self.name, host)
        r = subprocess.run(
            ["nsenter", f"--net={ns}", "--", sys.executable, "-c", PROBE_PRELUDE + code],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def url(self, path: str) -> str:
        return f"https://{self.ip_of('h1')}:2377{path}"

    def leave(self, host: str) -> None:
        c = self.client(host)
        if c.get("/info")["Swarm"]["LocalNodeState"] == "active":
            c.post("/swarm/leave", force="1")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with netns_lab("s", hosts=3) as name:
        yield Lab(name)


def test_files_are_private(lab: Lab):
    for host in ("h1", "h2"):
        d = lab.data_dir(host)
        assert (d.stat().st_mode & 0o777) == 0o700
        assert ((d / "node.json").stat().st_mode & 0o777) == 0o600
        certs = d / "certificates"
        assert (certs.stat().st_mode & 0o777) == 0o700
        assert ((certs / "swarm-node.key").stat().st_mode & 0o777) == 0o600
    raft = lab.data_dir("h1") / "raft"
    assert (raft.stat().st_mode & 0o777) == 0o700
    # The CA key is on the manager only.
    assert (lab.data_dir("h1") / "certificates" / "swarm-root-ca.key").exists()
    assert not (lab.data_dir("h2") / "certificates" / "swarm-root-ca.key").exists()


def test_wrong_token_is_refused(lab: Lab):
    good = lab.tokens()["Worker"]
    prefix, digest, secret = good.rsplit("-", 2)
    wrong = f"{prefix}-{digest}-{'0' * len(secret)}"
    before = lab.node_ids()
    # A well-behaved joiner: pins the CA with the (right) digest, then sends a wrong secret.
    out = lab.probe(
        "h2",
        """
import os
st, ca = call("GET", os.environ["PROBE_URL"] + "/cluster/ca", pki.ca_fetch_context())
ca = pki.verify_ca_against_token(ca.encode(), os.environ["PROBE_TOKEN"])
key, csr = pki.new_key_and_csr()
body = {"token": os.environ["PROBE_TOKEN"], "csr": csr.decode(), "hostname": "intruder",
        "addr": "198.51.100.99"}
st, text = call("POST", os.environ["PROBE_URL"] + "/cluster/join", pki.bootstrap_context(ca), body)
done(status=st, text=text)
""",
        url=lab.url(""),
        token=wrong,
    )
    assert out["status"] == 403, out
    assert "token" in json.loads(out["text"])["message"]
    assert lab.node_ids() == before


def test_wrong_ca_digest_is_refused_before_anything_is_sent(lab: Lab):
    lab.leave("h3")
    good = lab.tokens()["Worker"]
    prefix, digest, secret = good.rsplit("-", 2)
    wrong = f"{prefix}-{'1' * len(digest)}-{secret}"
    refusals = lab.manager_log().count("join refused")
    before = lab.node_ids()
    with pytest.raises(APIError) as e:
        lab.client("h3").post(
            "/swarm/join",
            {"RemoteAddrs": [f"{lab.ip_of('h1')}:2377"], "JoinToken": wrong},
        )
    assert e.value.status == 400, e.value
    assert "digest" in str(e.value) and "nothing was sent" in str(e.value)
    # The manager never saw a join attempt: the token did not leave h3.
    assert lab.manager_log().count("join refused") == refusals
    assert lab.node_ids() == before


def test_join_sends_no_plaintext(lab: Lab, tmp_path: Path):
    lab.leave("h3")
    pcap = tmp_path / "join.pcap"
    underlay = Path("/run/netns") / netns.underlay_ns(lab.name)
    dump = subprocess.Popen(
        [
            "nsenter",
            f"--net={underlay}",
            "--",
            "tcpdump",
            "-i",
            netns.BRIDGE,
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
            str(pcap),
            "tcp",
            "port",
            "2377",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert dump.stderr is not None
        line = dump.stderr.readline()  # "listening on br0 ..." once the capture runs
        assert "listening" in line, line
        token = lab.tokens()["Worker"]
        lab.client("h3").post(
            "/swarm/join", {"RemoteAddrs": [f"{lab.ip_of('h1')}:2377"], "JoinToken": token}
        )
        wait_for(lambda: lab.node_id("h3") in lab.node_ids(), "h3 back in the swarm")
        # A few assignment polls of h3 go by too.
        wait_for(lambda: pcap.exists() and pcap.stat().st_size > 2_000, "captured traffic")
    finally:
        dump.terminate()
        dump.wait(timeout=10)
    raw = pcap.read_bytes()
    assert b"SWMTKN" not in raw
    assert token.rsplit("-", 1)[1].encode() not in raw
    assert b"/cluster/" not in raw  # HTTP paths would be visible without TLS
    assert b"BEGIN CERTIFICATE REQUEST" not in raw


def test_client_without_certificate_gets_401(lab: Lab):
    out = lab.probe(
        "h2",
        """
import os
ctx = pki.bootstrap_context(Path(os.environ["PROBE_CA"]).read_bytes())  # verifies the server
st, text = call("GET", os.environ["PROBE_URL"], ctx)
st2, _ = call("GET", os.environ["PROBE_CAURL"], ctx)
done(status=st, text=text, ca_status=st2)
""",
        url=lab.url("/cluster/assignments?index=-1"),
        caurl=lab.url("/cluster/ca"),
        ca=str(lab.data_dir("h2") / "certificates" / "swarm-root-ca.crt"),
    )
    assert out["status"] == 401, out
    assert out["ca_status"] == 200, out  # the one public path


def test_certificate_from_another_ca_fails_the_handshake(lab: Lab):
    out = lab.probe(
        "h2",
        """
import os
other = pki.RootCA.generate("othercluster")
key, csr = pki.new_key_and_csr()
cert = pki.issue_node_cert(other, csr, "intruder", "worker", "othercluster")
# Do not verify the server (we want the SERVER's verdict on our certificate).
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
d = Path(os.environ["PROBE_TMP"])
(d / "c.pem").write_bytes(cert + key)
ctx.load_cert_chain(str(d / "c.pem"))
st, text = call("GET", os.environ["PROBE_URL"], ctx)
# Control: the same client with h2's own certificate is served.
ctx2 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx2.check_hostname = False
ctx2.verify_mode = ssl.CERT_NONE
certs = Path(os.environ["PROBE_CERTS"])
ctx2.load_cert_chain(str(certs / "swarm-node.crt"), str(certs / "swarm-node.key"))
st2, _ = call("GET", os.environ["PROBE_URL"], ctx2)
done(status=st, text=text, control=st2)
""",
        url=lab.url("/cluster/assignments?index=-1"),
        tmp=str(Path(os.environ.get("TMPDIR", "/tmp"))),
        certs=str(lab.data_dir("h2") / "certificates"),
    )
    assert out["control"] == 200, out
    assert not isinstance(out["status"], int), out  # no HTTP answer at all
    # TLS 1.3: the server verifies the client certificate after the client's side of the
    # handshake is done, so its verdict arrives as an alert or a closed connection on the
    # first read (http.client's RemoteDisconnected), never as an HTTP answer.
    assert out["status"] in (
        "SSLError",
        "SSLEOFError",
        "ConnectionResetError",
        "RemoteDisconnected",
    ), out


def test_removed_node_is_refused(lab: Lab):
    certs = lab.data_dir("h3") / "certificates"
    node_id = lab.node_id("h3")
    code = """
import os
certs = Path(os.environ["PROBE_CERTS"])
ca = pki.RootCA.load(certs).public()
cred = pki.NodeCredentials.load(certs)
ctx = pki.client_context(ca, cred.cert_pem, cred.key_pem)
st, text = call("GET", os.environ["PROBE_URL"], ctx)
done(status=st, text=text)
"""
    url = lab.url("/cluster/assignments?index=-1")
    netns.stop(lab.name, "h3")
    # h3's link is down: use its saved credentials from h2's namespace. They work...
    out = lab.probe("h2", code, url=url, certs=str(certs))
    assert out["status"] == 200, out
    lab.api.delete(f"/nodes/{node_id}", force="1")
    assert node_id not in lab.node_ids()
    # ...and after node rm they are refused.
    out = lab.probe("h2", code, url=url, certs=str(certs))
    assert out["status"] == 403, out
    assert "removed" in json.loads(out["text"])["message"]
