"""One run at a time per output: a lock object ``<output>/_raysky.lock`` with an owner and a timeout.

The lock is a small JSON object: the owning run's id, host and pid, the command, when it was
taken and when its owner last refreshed it (``heartbeat_at``). Taking it is atomic on both
kinds of storage: a local lock is created with ``O_EXCL``; an S3 lock with a conditional
``PutObject`` (``If-None-Match: *``), which S3 and moto honour (pyarrow has no conditional
writes, so this one request goes through boto3, configured by the same AWS variables).

A live run refreshes its heartbeat every :data:`HEARTBEAT_S` seconds. A lock whose heartbeat is
older than the stale timeout, or whose owner ran on this host and no longer exists, belongs to
a run that died, and the next run takes it over, again
atomically (a local rename that only one process can win; an S3 ``If-Match`` on the stale
lock's ETag). Any other run gets :class:`OutputLocked`, naming the owner.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from raysky import storage

LOCK_NAME = "_raysky.lock"
LOCK_FORMAT = "raysky-lock/1"
HEARTBEAT_S = 30.0
"""How often a live run refreshes its lock."""
STALE_AFTER_S = 600.0
"""A lock not refreshed for this long (many missed heartbeats) is taken over by the next run."""


class OutputLocked(ValueError):
    """Another live run holds the output's lock."""


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _body(run_id: str, command: str, created: float) -> bytes:
    now = _now()
    return json.dumps({
        "format": LOCK_FORMAT, "run_id": run_id, "command": command,
        "host": socket.gethostname(), "pid": os.getpid(),
        "created_at": _iso(created), "created_at_s": created,
        "heartbeat_at": _iso(now), "heartbeat_at_s": now,
    }, indent=2).encode()


def _s3():
    import boto3  # only S3 locks need it; it reads AWS_ENDPOINT_URL(_S3) and AWS_REGION itself

    return boto3.client("s3")


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _precondition_failed(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412")


def _dead_here(lock: dict) -> bool:
    """True when the lock's owner ran on this host and its process is gone (killed, crashed)."""
    if lock.get("host") != socket.gethostname() or not isinstance(lock.get("pid"), int):
        return False
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class OutputLock:
    """The lock of one output, held by one run; use :func:`locked` rather than this directly."""

    def __init__(self, output: str, run_id: str, command: str = "score",
                 stale_after_s: float = STALE_AFTER_S):
        self.output = output
        self.uri = storage.join(output, LOCK_NAME)
        self.run_id = run_id
        self.command = command
        self.stale_after_s = stale_after_s
        self.created = _now()
        self._etag: str | None = None
        self.took_over: dict | None = None
        """The stale lock this run took over, if it did."""
        self.lost: OutputLocked | None = None
        """Set by the heartbeat when another run took the lock while this one stalled."""

    # -- storage primitives -------------------------------------------------------------------

    def _put_s3(self, data: bytes, **condition: str | None) -> bool:
        """Write the S3 lock only if ``condition`` (``IfNoneMatch`` or ``IfMatch``) holds,
        keeping its new ETag; False when S3 refuses the write because it does not hold."""
        bucket, key = _bucket_key(self.uri)
        try:
            self._etag = _s3().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def _create(self) -> bool:
        """Create the lock if there is none; False when one exists."""
        data = _body(self.run_id, self.command, self.created)
        if storage.is_s3(self.uri):
            return self._put_s3(data, IfNoneMatch="*")
        _fs, path = storage.resolve(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def _read(self) -> tuple[dict, str | None] | None:
        """The current lock and its S3 ETag, or None when there is none."""
        try:
            if storage.is_s3(self.uri):
                bucket, key = _bucket_key(self.uri)
                try:
                    answer = _s3().get_object(Bucket=bucket, Key=key)
                except Exception as exc:
                    if getattr(exc, "response", {}).get("Error", {}).get("Code") in (
                            "NoSuchKey", "404"):
                        return None
                    raise
                return json.loads(answer["Body"].read()), answer["ETag"]
            return json.loads(storage.read_bytes(self.uri)), None
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {}, None  # a damaged lock has no heartbeat: stale, so it is taken over

    def _take_over(self, etag: str | None) -> bool:
        """Replace a stale lock with ours; False when another run replaced it first."""
        if storage.is_s3(self.uri):
            return self._put_s3(_body(self.run_id, self.command, self.created), IfMatch=etag)
        _fs, path = storage.resolve(self.uri)
        # Only one process can rename the stale lock away; that one then creates its own.
        try:
            os.rename(path, f"{path}.stale-{uuid.uuid4().hex[:8]}")
        except FileNotFoundError:
            return False
        for name in os.listdir(os.path.dirname(path)):
            if name.startswith(f"{LOCK_NAME}.stale-"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(os.path.dirname(path), name))
        return self._create()

    # -- the protocol -------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, or take over a stale one; raise :class:`OutputLocked` otherwise."""
        for _attempt in range(3):  # the holder may release or another run may win in between
            if self._create():
                return
            current = self._read()
            if current is None:
                continue
            lock, etag = current
            age = _now() - float(lock.get("heartbeat_at_s") or 0.0)
            if age <= self.stale_after_s and not _dead_here(lock):
                raise OutputLocked(
                    f"{self.output} is in use by another raysky {lock.get('command', 'run')} "
                    f"(run {lock.get('run_id')}, host {lock.get('host')}, pid {lock.get('pid')}, "
                    f"last heartbeat {age:.0f}s ago); wait for it to finish, or, if that run is "
                    f"dead, delete {self.uri} (a lock without a heartbeat for "
                    f"{self.stale_after_s:.0f}s is taken over)")
            if self._take_over(etag):
                self.took_over = lock
                return
        raise OutputLocked(f"{self.output}: another run took the lock {self.uri} at the same time")

    def refresh(self) -> None:
        """Renew the heartbeat; raise :class:`OutputLocked` if another run has taken the lock."""
        data = _body(self.run_id, self.command, self.created)
        if storage.is_s3(self.uri):
            if not self._put_s3(data, IfMatch=self._etag):
                raise OutputLocked(f"{self.output}: lost the lock {self.uri} to another "
                                   "run (no heartbeat for too long)")
            return
        current = self._read()
        if current is None or current[0].get("run_id") != self.run_id:
            raise OutputLocked(f"{self.output}: lost the lock {self.uri} to another run")
        _fs, path = storage.resolve(self.uri)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)

    def check(self) -> None:
        """Raise the :class:`OutputLocked` error if the lock was lost during the run."""
        if self.lost is not None:
            raise self.lost

    def release(self) -> None:
        """Delete the lock if it is still ours."""
        current = self._read()
        if current is not None and current[0].get("run_id") == self.run_id:
            storage.delete(self.uri)


@contextlib.contextmanager
def locked(output: str, run_id: str, command: str = "score",
           stale_after_s: float = STALE_AFTER_S) -> Iterator[OutputLock]:
    """Hold the lock of ``output`` for the ``with`` block, refreshing it in the background.

    A heartbeat that finds the lock taken by another run (this run stalled past the timeout)
    stops refreshing; the run then fails when it next calls :meth:`OutputLock.check`.
    """
    lock = OutputLock(output, run_id, command, stale_after_s)
    lock.acquire()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(HEARTBEAT_S, stale_after_s / 4)):
            try:
                lock.refresh()
            except OutputLocked as exc:
                lock.lost = exc
                return
            except Exception:  # a failed refresh is retried at the next beat
                continue

    thread = threading.Thread(target=beat, name=f"raysky-lock-{run_id}", daemon=True)
    thread.start()
    try:
        yield lock
    finally:
        stop.set()
        thread.join(timeout=5)
        if lock.lost is None:
            lock.release()

