"""When a node should renew its certificate (swarmkit ``ca/config.go`` RenewTLSConfig).

Renewal itself is a request like a join, minus the token: the node sends a new CSR over
its current mutual-TLS connection and the manager signs it for the node id and the role
*the store* holds now (so a promotion or demotion takes effect at the next renewal).
"""

from __future__ import annotations

import datetime as dt
import random

from swarmnet.pki.ca import DEFAULT_CONFIG, PKIConfig, _load_cert, _now


def needs_renewal(
    cert_pem: bytes,
    *,
    now: dt.datetime | None = None,
    fraction: float = DEFAULT_CONFIG.renew_upper_fraction,
) -> bool:
    """True once ``fraction`` of the certificate's lifetime has passed (or it has expired,
    or is not yet valid: a node whose clock jumped should ask again, not sit on it)."""
    cert = _load_cert(cert_pem)
    now = _now(now)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start or now >= end:
        return True
    return now >= start + (end - start) * fraction


def renewal_time(
    cert_pem: bytes, *, rng: random.Random, config: PKIConfig = DEFAULT_CONFIG
) -> dt.datetime:
    """When to renew: a random point between the lower and upper fractions of the lifetime
    (swarmkit calculateRandomExpiry), so that nodes spread their renewals."""
    cert = _load_cert(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    f = rng.uniform(config.renew_lower_fraction, config.renew_upper_fraction)
    return start + (end - start) * f


__all__ = ["needs_renewal", "renewal_time"]
