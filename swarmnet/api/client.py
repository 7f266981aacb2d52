"""A small synchronous client for the agent's HTTP API (CLI, lab, tests).

Synchronous on purpose: the CLI runs one request at a time and should start fast, so it
uses http.client over a unix or TCP socket rather than an event loop.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from urllib.parse import quote, urlencode

DEFAULT_HOST = "unix:///run/swarmnet/swarmnet.sock"
API_VERSION = "v1.51"  # what Docker 28.3-28.5 speaks; the server accepts any /v1.NN prefix


class APIError(Exception):
    """The agent answered with an error status; ``message`` is its one readable line."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{message} (HTTP {status})")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def host_from_env(explicit: str | None = None) -> str:
    return explicit or os.environ.get("SWARMNET_HOST") or DEFAULT_HOST


class Client:
    def __init__(self, host: str | None = None, timeout_s: float = 60.0):
        self.host = host_from_env(host)
        self.timeout_s = timeout_s

    def _conn(self) -> http.client.HTTPConnection:
        if self.host.startswith("unix://"):
            return _UnixHTTPConnection(self.host[len("unix://") :], self.timeout_s)
        if self.host.startswith("tcp://") or self.host.startswith("http://"):
            hostport = self.host.split("://", 1)[1].rstrip("/")
            h, _, p = hostport.rpartition(":")
            return http.client.HTTPConnection(h, int(p), timeout=self.timeout_s)
        raise ValueError(f"unsupported host {self.host!r}: use unix:///path or tcp://ip:port")

    def request(self, method: str, path: str, body: object = None, params: dict | None = None):
        url = f"/{API_VERSION}{path}"
        if params:
            url += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn = self._conn()
        try:
            try:
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise APIError(0, f"cannot reach the swarmnet agent at {self.host}: {e}") from e
        finally:
            conn.close()
        payload = None
        if raw:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
        if resp.status >= 400:
            msg = payload.get("message") if isinstance(payload, dict) else str(payload)
            raise APIError(resp.status, msg or resp.reason)
        return payload

    def get(self, path: str, **params):
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: object = None, **params):
        return self.request("POST", path, body=body if body is not None else {}, params=params or None)

    def delete(self, path: str, **params):
        return self.request("DELETE", path, params=params or None)


def q(name: str) -> str:
    """Quote an object name or ID for a path segment."""
    return quote(name, safe="")
