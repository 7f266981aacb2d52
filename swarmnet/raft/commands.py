"""What every command of the replicated state shares: the error type that becomes an HTTP
error naming the field, name rules, and pure helpers over Docker-shaped service specs.
Pure (no clock, no randomness): it runs inside the state machine."""

from __future__ import annotations

import hashlib
import re
from typing import Any

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
TASK_TERMINAL = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
INGRESS_NAME = "ingress"
PUBLISHED_PORT_RANGE = (30000, 32767)  # Docker's dynamic range for PublishedPort 0


class CommandError(Exception):
    """A command refused; becomes an HTTP error naming the field at fault."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message

    def as_result(self) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


def check_name(name: Any, field: str = "Name") -> str:
    if not isinstance(name, str) or not name:
        raise CommandError(400, field, f"{field} is required")
    # fullmatch: with match(), "$" also matches before a trailing newline ("web\n").
    if not NAME_RE.fullmatch(name):
        raise CommandError(
            400,
            field,
            f"invalid {field} {name!r}: use 1-63 characters [a-zA-Z0-9_.-], starting with a letter or digit",
        )
    return name


def service_network_ids(spec: dict) -> list[str]:
    nets = (spec.get("TaskTemplate") or {}).get("Networks") or spec.get("Networks") or []
    return [n["Target"] for n in nets]


def ingress_id_for(cluster_id: str) -> str:
    """The ingress network's id: a pure function of the cluster id (25 base-16 chars)."""
    return hashlib.sha256(f"ingress:{cluster_id}".encode()).hexdigest()[:25]


def publishes_ingress(spec: dict) -> bool:
    ports = (spec.get("EndpointSpec") or {}).get("Ports") or []
    return any(p.get("PublishMode", "ingress") == "ingress" for p in ports)


def service_replicas(spec: dict) -> int:
    return int(((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", 1))
