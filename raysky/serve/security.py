"""API-key authentication for the live endpoint, on by default.

Keys come from a secret file (``--api-keys-file`` / ``api_keys_file``, or the
``RAYSKY_API_KEYS_FILE`` variable naming one) or from ``RAYSKY_API_KEYS`` (comma separated), and
never travel in a ``runtime_env`` or the application's arguments: the Ray dashboard and state
API show both in plain text. ``raysky serve`` and ``run_server`` read the keys where they run and
hand the ingress replicas only their SHA-256 digests, which cannot be used to authenticate.
With ``serve deploy``, each ingress replica reads the keys from its own node.

An endpoint without keys refuses to start unless it is explicitly allowed to run
unauthenticated, and then logs a WARNING. Keys shorter than :data:`MIN_KEY_LENGTH` characters
are refused: a digest is only as hard to invert as the key is to guess.

Keys are compared as SHA-256 digests with :func:`hmac.compare_digest`, and every configured key
is compared on every request, so neither the position of a matching key nor the length of a
guess shows up in the response time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

API_KEYS_ENV = "RAYSKY_API_KEYS"
"""Environment variable holding the accepted API keys, comma separated."""
API_KEYS_FILE_ENV = "RAYSKY_API_KEYS_FILE"
"""Environment variable naming a file that holds the accepted API keys."""
MIN_KEY_LENGTH = 32
"""Shortest accepted key, in characters; ``secrets.token_urlsafe(32)`` gives 43."""
GENERATE_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"

logger = logging.getLogger(__name__)


class ApiKeyError(ValueError):
    """API keys missing, unreadable or too short; the message never contains a key."""


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """Split a key list on commas and line breaks, dropping blanks and ``#`` comment lines."""
    if not value:
        return ()
    lines = (line for line in value.splitlines() if not line.lstrip().startswith("#"))
    return tuple(key.strip() for line in lines for key in line.split(",") if key.strip())


def validate_api_keys(keys: Iterable[str], source: str = "API keys") -> tuple[str, ...]:
    """Return ``keys`` as a tuple, or raise :class:`ApiKeyError` if one is too short."""
    keys = tuple(keys)
    for number, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_LENGTH:
            raise ApiKeyError(
                f"{source}: key {number} of {len(keys)} has {len(key)} characters; keys need at "
                f"least {MIN_KEY_LENGTH} (generate one with: {GENERATE_HINT})")
    return keys


def read_api_keys_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Read and validate the keys in ``path`` (one per line or comma separated)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    keys = parse_api_keys(text)
    if not keys:
        raise ApiKeyError(f"the API key file {path} holds no keys")
    return validate_api_keys(keys, str(path))


def load_api_keys(api_keys_file: str | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The keys this process can see: from ``api_keys_file``, else the file named by
    ``RAYSKY_API_KEYS_FILE``, else ``RAYSKY_API_KEYS``; ``()`` when none is set."""
    environ = os.environ if environ is None else environ
    path = api_keys_file or environ.get(API_KEYS_FILE_ENV)
    if path:
        return read_api_keys_file(path)
    return validate_api_keys(parse_api_keys(environ.get(API_KEYS_ENV)), API_KEYS_ENV)


def key_digest(key: str) -> bytes:
    """The SHA-256 digest a key is compared by; what travels to the ingress replicas."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def require_keys_or_permission(digests: Sequence[bytes], allow_unauthenticated: bool,
                               where: str = "raysky serve") -> None:
    """Refuse to run without keys unless explicitly allowed; warn loudly when allowed."""
    if digests:
        return
    if not allow_unauthenticated:
        raise ApiKeyError(
            f"{where}: no API keys: put them in a file passed as --api-keys-file (Serve config: "
            f"api_keys_file, or the {API_KEYS_FILE_ENV} variable) or in {API_KEYS_ENV} on the "
            f"node, at least {MIN_KEY_LENGTH} characters each (generate one with: "
            f"{GENERATE_HINT}); to serve without authentication pass --allow-unauthenticated "
            "(Serve config: allow_unauthenticated: true)")
    logger.warning("%s: API-key authentication is OFF (allow_unauthenticated): anyone who can "
                   "reach the port can use the endpoint", where)


class ApiKeyChecker:
    """Checks ``Authorization: Bearer <key>`` headers against a fixed set of keys.

    An empty checker lets every request through; :func:`require_keys_or_permission` decides
    whether one may be used.
    """

    def __init__(self, keys: Iterable[str]):
        self._digests = tuple(key_digest(key) for key in keys)

    @classmethod
    def from_digests(cls, digests: Iterable[bytes]) -> ApiKeyChecker:
        """A checker over keys known only by their :func:`key_digest`."""
        checker = cls(())
        checker._digests = tuple(digests)
        return checker

    @property
    def digests(self) -> tuple[bytes, ...]:
        """The digests of the accepted keys."""
        return self._digests

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
        presented = key_digest(token)
        matched = False
        for digest in self._digests:
            # No early exit: the time taken must not depend on which key matched.
            matched |= hmac.compare_digest(presented, digest)
        return matched


def replica_checker(digests: Sequence[bytes] | None, api_keys_file: str | None,
                    allow_unauthenticated: bool,
                    environ: Mapping[str, str] | None = None) -> ApiKeyChecker:
    """The checker an ingress replica uses: the digests its deployer passed, or else the keys
    of this node (:func:`load_api_keys`), refusing to run without any unless allowed."""
    if digests is None:
        digests = tuple(key_digest(k) for k in load_api_keys(api_keys_file, environ))
    require_keys_or_permission(digests, allow_unauthenticated, "raysky ingress")
    return ApiKeyChecker.from_digests(digests)
