"""API-key authentication for the live endpoint.

Keys reach the ingress replicas through the ``RAYSKY_API_KEYS`` environment variable (a comma
separated list), never through the application's arguments, so they stay out of the Serve
config, ``serve status`` and the dashboard. ``run_server`` and ``raysky serve`` forward the
caller's keys into the ingress replica's ``runtime_env``; with ``serve deploy``, set the
variable on the cluster or in the ingress deployment's ``runtime_env``.

Keys are compared as SHA-256 digests with :func:`hmac.compare_digest`, and every configured key
is compared on every request, so neither the position of a matching key nor the length of a
guess shows up in the response time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping

API_KEYS_ENV = "RAYSKY_API_KEYS"
"""Environment variable holding the accepted API keys, comma separated."""


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """Split a comma-separated key list, dropping blanks; an empty result disables auth."""
    if not value:
        return ()
    return tuple(key.strip() for key in value.split(",") if key.strip())


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyChecker:
    """Checks ``Authorization: Bearer <key>`` headers against a fixed set of keys."""

    def __init__(self, keys: Iterable[str]):
        self._digests = tuple(_digest(key) for key in keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiKeyChecker:
        """Build the checker from ``RAYSKY_API_KEYS`` (absent or blank: auth disabled)."""
        environ = os.environ if environ is None else environ
        return cls(parse_api_keys(environ.get(API_KEYS_ENV)))

    @property
    def enabled(self) -> bool:
        """Whether any key is configured; without keys every request is let through."""
        return bool(self._digests)

    @property
    def num_keys(self) -> int:
        """How many keys are accepted."""
        return len(self._digests)

    def check(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries an accepted bearer token."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        presented = _digest(token)
        matched = False
        for digest in self._digests:
            # No early exit: the time taken must not depend on which key matched.
            matched |= hmac.compare_digest(presented, digest)
        return matched
